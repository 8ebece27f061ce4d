"""benchmarks/train_step.py: its main path on the CPU with the tiny model (the dry run), its FLOP count against a count
by hand, the search's bisection, and its errors for bad input."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch.distributed as dist
from torch import nn
from transformers import LlamaForCausalLM

sys.path.append(str(Path(__file__).resolve().parents[1]))  # `benchmarks` is not installed: the root, after site-packages

from benchmarks import train_step

#: The tiny preset's training FLOPs at L = 256, counted by hand. Weights a token meets (multiply-adds): per layer the
#: query and output projections 64 x 64 each, key and value 64 x 32 each (2 heads of 16), the MLP 3 x 64 x 172; the
#: output head 64 x 1000. Attention per layer: Q K^T and P V, 256 x 256 x 64 each, half of it under the causal mask.
TINY_WEIGHTS = 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 172) + 64 * 1000
TINY_FLOPS = 3 * (2 * 256 * TINY_WEIGHTS + 2 * (2 * 2 * 256 * 256 * 64) // 2)


def test_the_tiny_models_weights_are_the_hand_counts() -> None:
    """The hand count's weights are the model's: every nn.Linear of the tiny Llama (the input embedding is a lookup)."""
    model = LlamaForCausalLM(train_step.llama_config("tiny", 256))
    assert sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear)) == TINY_WEIGHTS == 154_624


def test_dry_run_trains_and_reports(tmp_path: Path) -> None:
    """Two steps of the full recipe on the tiny model, P = 1: every field of the JSON, the FLOPs as counted by hand,
    tokens per second and MFU from them and the median step time, the estimate made, the process group gone after."""
    out = tmp_path / "train_step.json"
    report = train_step.main(["--dry-run", "--steps", "1", "--warmup", "1", "--peak-flops", "1e12", "--out", str(out)])
    written = json.loads(out.read_text())
    assert written == json.loads(json.dumps(report))
    assert written["run"] | {"preset": "tiny", "length": 256, "devices": 1, "accelerator": "cpu", "mlp_tile": 64,
                             "head_groups": 2, "offload_parameters": False} == written["run"]
    assert len(written["step_seconds"]) == 2 and all(math.isfinite(loss) for loss in written["losses"])
    assert written["parameters"] == TINY_WEIGHTS + 1000 * 64 + 64 * (2 * 2 + 1)  # the embedding and the norms' weights
    assert written["model_flops_per_step"] == TINY_FLOPS
    step_time = written["step_seconds"][1]  # the median of the one timed step
    assert written["step_time_s"] == step_time
    assert written["tokens_per_s"] == pytest.approx(256 / step_time)
    assert written["mfu"] == pytest.approx(TINY_FLOPS / step_time / 1e12)
    assert written["device_peak_allocated_bytes"] is None and written["measured_over_estimate"] is None  # no device
    assert written["estimate_device_bytes"] > 0 and written["estimate_host_bytes"] > 0
    assert written["estimate_differs"] == {"mlp_tile": 4096, "loss_chunk": 4096}  # the dry run's tiles of 64
    assert written["host_rss_peak_bytes"] > 0 and written["host_pinned_peak_bytes"] == 0
    assert not dist.is_initialized()


@pytest.mark.parametrize(("fits_up_to", "start", "expected"), [(40_000, 8192, 36_864), (5000, 8192, 4096), (2000, 8192, 0)])
def test_search_doubles_then_bisects_to_the_longest_that_trains(fits_up_to: int, start: int, expected: int) -> None:
    longest, lengths = train_step.longest_length(lambda length: length <= fits_up_to, start, 4096, 2**20, max_tries=20)
    assert longest == expected == max([m for m in range(4096, 2**20 + 1, 4096) if m <= fits_up_to], default=0)
    assert all(length % 4096 == 0 for length in lengths) and len(lengths) == len(set(lengths))
    if start <= fits_up_to:  # doubled while it fit
        assert lengths[:3] == [8192, 16384, 32768]


def test_search_stops_after_its_tries() -> None:
    longest, lengths = train_step.longest_length(lambda length: length <= 40_000, 8192, 4096, 2**20, max_tries=3)
    assert lengths == [8192, 16384, 32768] and longest == 32768


@pytest.mark.parametrize("offload_parameters", [False, True])
def test_search_keeps_the_longest_tries_report(monkeypatch: pytest.MonkeyPatch, offload_parameters: bool) -> None:
    """Tries of one step without the estimate, after a warm-up step unless the parameters are in host memory (every
    step's device peak is then the same); the search's report is the longest successful try's."""
    seen: list[tuple[int, int, int, bool]] = []

    def fake_try(run: train_step.Run, timeout_s: float) -> dict[str, int] | None:
        seen.append((run.length, run.warmup, run.steps, run.estimate))
        return {"length": run.length} if run.length <= 20_000 else None

    monkeypatch.setattr(train_step, "measure_in_a_fresh_process", fake_try)
    run = train_step.Run("tiny", 4096, 1, "cpu", steps=3, warmup=1, mlp_tile=64, loss_chunk=64, head_groups=2, micro_q_size=None,
                         offload_parameters=offload_parameters, estimate=False, peak_flops=None)
    result = train_step.search(run, granularity=4096, limit=2**20, max_tries=10, timeout_s=5)
    warmup = 0 if offload_parameters else 1
    assert seen[:4] == [(length, warmup, 1, False) for length in (4096, 8192, 16384, 32768)]
    assert result["longest_length"] == 16384 and result["report"] == {"length": 16384}
    assert [(t["length"], t["trains"]) for t in result["tries"]] == [
        (4096, True), (8192, True), (16384, True), (32768, False), (24576, False), (20480, False)]
    assert result["stopped"] is None


def test_search_ends_at_a_time_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """A try that runs past its time says nothing about memory: the search ends there, with the longest so far and the
    time-out named."""
    def fake_try(run: train_step.Run, timeout_s: float) -> dict[str, int]:
        if run.length > 10_000:
            raise train_step.TimedOut(f"L = {run.length:,} ran past {timeout_s:.0f} s")
        return {"length": run.length}

    monkeypatch.setattr(train_step, "measure_in_a_fresh_process", fake_try)
    run = train_step.Run("tiny", 4096, 1, "cpu", steps=1, warmup=0, mlp_tile=64, loss_chunk=64, head_groups=2, micro_q_size=None,
                         offload_parameters=True, estimate=False, peak_flops=None)
    result = train_step.search(run, granularity=4096, limit=2**20, max_tries=10, timeout_s=5)
    assert result["longest_length"] == 8192 and result["stopped"] == "L = 16,384 ran past 5 s"


@pytest.mark.parametrize(("argv", "says"), [
    (["--dry-run", "--length", "255"], "give a multiple of 2, e.g. --length 254"),
    (["--accelerator", "cpu", "--preset", "70b"], "unknown preset '70b': choose one of tiny, 1b, 3b, 8b"),
    (["--dry-run", "--head-groups", "3"], "--head-groups 3 does not divide the 2 key/value heads of tiny"),
    (["--dry-run", "--search", "--granularity", "255"], "--granularity 255 does not split over P = 1 ranks in the zigzag layout"),
])
def test_bad_input_names_the_fix(argv: list[str], says: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        train_step.main(argv)
    assert says in capsys.readouterr().err
