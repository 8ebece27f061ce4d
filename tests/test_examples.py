"""The examples run as users run them (scripts, in subprocesses, on gloo) at tiny sizes.

Each asserts a finite, falling loss; the demo asserts that MQSP at SP=2 and one process agree.
"""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parent.parent / "examples"


def run(args: list[str], cwd: Path, timeout: float = 300) -> str:
    result = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{args[0]} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def train_losses(metrics_csv: Path) -> list[float]:
    with open(metrics_csv) as f:
        rows = [r for r in csv.DictReader(f) if r.get("train_loss")]
    return [float(r["train_loss"]) for r in sorted(rows, key=lambda r: int(r["step"]))]


# One batch seen again and again (overfit_batches) so that "the loss falls" is a property of the
# training, not of which batches came first.
TINY_RUN = ["--model.hidden_size=32", "--model.num_layers=1", "--model.lr=0.01", "--model.warmup_steps=1",
            "--trainer.max_steps=6", "--trainer.overfit_batches=1", "--trainer.val_check_interval=1", "--data.seq_len=128",
            "--data.tokenizer_vocab_size=2000"]


def assert_trains(losses: list[float], steps: int) -> None:
    assert len(losses) == steps and all(math.isfinite(x) for x in losses), losses
    assert losses[-1] < losses[0], losses


@pytest.mark.timeout(400)
def test_demo_curves_agree(tmp_path: Path) -> None:
    out = run([str(EXAMPLES / "demo.py"), "--steps", "6", "--seq-len", "256", "--out", str(tmp_path)], tmp_path, timeout=380)
    assert "AGREE:" in out.splitlines()[-1], out[-2000:]
    assert (tmp_path / "loss_curves.png").stat().st_size > 10_000


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("script", "positions"), [("bert_mlm", "max_position_embeddings"), ("gpt_causal", "max_positions")])
def test_language_model_example_trains(tmp_path: Path, script: str, positions: str) -> None:
    config = EXAMPLES / "configs" / f"{script}.yaml"
    run([str(EXAMPLES / f"{script}.py"), "fit", "--config", str(config), *TINY_RUN, f"--model.{positions}=128",
         f"--data.cache_dir={tmp_path / 'cache'}"], tmp_path)
    assert_trains(train_losses(tmp_path / "runs" / script / "csv" / "version_0" / "metrics.csv"), 6)
    assert (tmp_path / "runs" / script / "checkpoints" / "last.ckpt").exists()


@pytest.mark.timeout(300)
def test_long_range_retrieval_runs_both_settings(tmp_path: Path) -> None:
    steps = 40
    out = run([str(EXAMPLES / "long_range_retrieval.py"), "--length", "64", "--world-size", "2", "--steps", str(steps),
               "--batch-size", "8", "--val-samples", "8", "--out", str(tmp_path)], tmp_path)
    assert "MQSP (whole sequence)" in out and "local shard only" in out
    results = json.loads((tmp_path / "retrieval.json").read_text())
    for mode in ("mqsp", "local"):
        losses = results[mode]["train_losses"]
        assert len(losses) == steps and all(math.isfinite(x) for x in losses)
        # Fresh batches every step: compare the first and last quarters, not single steps.
        assert sum(losses[-10:]) < sum(losses[:10]), (mode, losses)


@pytest.mark.timeout(300)
def test_long_context_llama_example_trains(tmp_path: Path) -> None:
    """examples/llama_long.py: FSDP2 sharding, activation checkpointing with offload, the chunked loss, packed documents."""
    config = EXAMPLES / "configs" / "llama_long.yaml"
    run([str(EXAMPLES / "llama_long.py"), "fit", "--config", str(config), "--model.lr=0.01", "--model.warmup_steps=1",
         "--trainer.max_steps=6", "--trainer.overfit_batches=1", "--trainer.val_check_interval=1", "--data.seq_len=128",
         "--data.tokenizer_vocab_size=2000", f"--data.cache_dir={tmp_path / 'cache'}"], tmp_path)
    assert_trains(train_losses(tmp_path / "runs" / "llama_long" / "csv" / "version_0" / "metrics.csv"), 6)
    assert (tmp_path / "runs" / "llama_long" / "checkpoints" / "last.ckpt").is_file()  # the full state dict, one file
