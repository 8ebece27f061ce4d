"""Training steps of a Llama model with the full recipe: measured memory against the estimate, step time, tokens per
second and MFU.

    python benchmarks/train_step.py --preset 3b --length 65536 --out benchmarks/out/train_step_3b_64k.json
    python benchmarks/train_step.py --preset 3b --search --out benchmarks/out/train_step_3b_longest.json
    python benchmarks/train_step.py --dry-run --out /tmp/train_step.json      # tiny model, CPU, P = 1 (the suite runs it)

A Llama-architecture Hugging Face model built from its config with random weights (no download; presets ``tiny``,
``1b``, ``3b``, ``8b``: Llama 3.2 1B and 3B, Llama 3.1 8B, input and output embeddings untied) trains on random
tokens, one sequence of L tokens a step, in a Lightning ``Trainer`` with the full recipe of ``examples/llama_long.py``:
``MQSPFSDPStrategy`` over ``--devices`` ranks (P), activation checkpointing of every decoder layer, what it keeps and
the attention's queries offloaded to host memory, the attention's backward one group of key/value heads at a time,
MLPs and norms in tiles, the chunked causal-LM loss, bf16 compute on float32 master weights, and, for the models whose
AdamW state a GPU cannot hold (3b, 8b by default), the parameters, gradients and optimizer state in host memory
(``offload_parameters``). It reports:

- the device peak of the timed steps (``torch.cuda.max_memory_allocated`` and ``max_memory_reserved``; None on a CPU)
  and the memory estimator's prediction for the same configuration (:func:`memory_estimator`), and their ratio;
- host memory: the process's peak resident set and the pinned allocator's peak;
- step time (the median of the steps after ``--warmup``), tokens per second and MFU: the model's FLOPs per step as
  FPDT and ALST count them (:func:`model_flops_per_step`) over the step time and the GPU's dense bf16 peak
  (:data:`PEAK_FLOPS`, or ``--peak-flops``).

``--search`` finds the longest L that trains: doubling from ``--length``, then bisection to ``--granularity``, at most
``--max-tries`` tries, each in a fresh process (an out-of-memory error leaves the allocator and the host's pinned
memory in a state that would poison the next try); then the longest is measured again with ``--steps`` steps and the
estimate, beside the estimator's own longest L for the GPU's memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import lightning
import torch
import torch.distributed as dist
import transformers
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from transformers import LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))  # an uninstalled checkout imports lightning_mqsp and benchmarks from the root, after site-packages

from lightning_mqsp import MQSPFSDPStrategy, chunked_causal_lm_cross_entropy  # noqa: E402

#: Llama shapes (no download). 1b and 3b are Llama 3.2's, 8b Llama 3.1's; all untied here (the 8B's shape is), which
#: adds the output head's parameters to the smaller two.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"vocab_size": 1000, "hidden_size": 64, "intermediate_size": 172, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2},
    "1b": {"vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
           "num_attention_heads": 32, "num_key_value_heads": 8, "rope_theta": 500_000.0},
    "3b": {"vocab_size": 128256, "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28,
           "num_attention_heads": 24, "num_key_value_heads": 8, "rope_theta": 500_000.0},
    "8b": {"vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
           "num_attention_heads": 32, "num_key_value_heads": 8, "rope_theta": 500_000.0},
}
#: Presets whose float32 parameters, gradients and AdamW moments (16 bytes a parameter: 58 GB for 3b) leave too little
#: of an 80 GB GPU for activations: their parameters live in host memory unless ``--offload-parameters off``.
HOST_PARAMETER_PRESETS = ("3b", "8b")
#: Dense bf16 peak FLOP/s by a piece of the device's name, the first match wins (SXM H100 "NVIDIA H100 80GB HBM3").
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12),
)
#: Query rows gathered per micro-step, as the estimator assumes (micro_q_size = this / P).
GATHERED_ROWS = 32768


def llama_config(preset: str, length: int) -> LlamaConfig:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    return LlamaConfig(**PRESETS[preset], max_position_embeddings=length, tie_word_embeddings=False)


def model_flops_per_step(config: LlamaConfig, length: int) -> float:
    """Training FLOPs of a step on one sequence of ``length`` tokens, as FPDT and ALST count them: 2 per multiply-add,
    backward twice the forward, the recompute of checkpointing not counted; every matmul with a weight (the output
    head's included, the input embedding's lookup not), and attention's two [L, L] products, halved for causality."""
    heads, kv_heads, layers = config.num_attention_heads, config.num_key_value_heads, config.num_hidden_layers
    hidden, head_dim = config.hidden_size, config.hidden_size // config.num_attention_heads
    per_layer = hidden * head_dim * (2 * heads + 2 * kv_heads) + 3 * hidden * config.intermediate_size
    weights = 2 * length * (layers * per_layer + hidden * config.vocab_size)
    attention = layers * 2 * 2 * length * length * heads * head_dim / 2
    return 3 * (weights + attention)


def peak_flops(device_name: str) -> float | None:
    """The device's dense bf16 peak from :data:`PEAK_FLOPS`; None for a device not in it (give ``--peak-flops``)."""
    return next((flops for piece, flops in PEAK_FLOPS if piece in device_name), None)


def memory_estimator() -> ModuleType:
    """The memory estimator's module: the one place this benchmark names it (it is moving into the package)."""
    import benchmarks.estimate_memory as estimator

    return estimator


def _estimator_setup(
    preset: str, length: int, world_size: int, offload_parameters: bool, on_gpu: bool, micro_q_size: int | None = None,
) -> Any:
    """The estimator's description of this run: the full recipe (host parameters with ``offload_parameters``), bf16
    mixed precision, the Triton kernels' footprint on a GPU and the fused AdamW's (one parameter at a time). The
    estimator's full recipe has its own tiles, loss chunks and head groups (:func:`estimate_assumes`)."""
    estimator = memory_estimator()
    name = f"train-step-{preset}"
    estimator.MODELS[name] = lambda full_length: llama_config(preset, full_length)
    return estimator.Setup(name, "mqsp", length, world_size, "bf16-mixed", recipe="host_parameters" if offload_parameters else "full",
                           attention_backend="triton" if on_gpu else "cpu_flash", optimizer_foreach=not on_gpu,
                           micro_q_size=micro_q_size)


def estimate_assumes(preset: str) -> dict[str, int]:
    """The sizes the estimator's full recipe runs with: a run with others is estimated as if it had these."""
    estimator = memory_estimator()
    return {"mlp_tile": estimator.MLP_TILE, "loss_chunk": estimator.LOSS_CHUNK, "head_groups": PRESETS[preset]["num_key_value_heads"]}


def estimated_memory(
    preset: str, length: int, world_size: int, offload_parameters: bool, on_gpu: bool, micro_q_size: int | None = None,
) -> tuple[int, int]:
    """(device, host) peak bytes a rank of this run needs, by the estimator: fake runs, extrapolated to full depth."""
    estimator = memory_estimator()
    setup = _estimator_setup(preset, length, world_size, offload_parameters, on_gpu, micro_q_size)
    return estimator.extrapolated_memory(setup, estimator.RECIPE_PROBE_LAYERS)


def estimated_longest_length(preset: str, world_size: int, offload_parameters: bool, budget_bytes: int) -> int:
    """The estimator's longest L for a GPU of ``budget_bytes`` (to its 2% tolerance)."""
    setup = _estimator_setup(preset, 1024, world_size, offload_parameters, on_gpu=True)
    return memory_estimator().recipe_max_length(setup.model, setup.recipe, world_size, budget_bytes, setup.precision)["length"]


class RandomTokens(Dataset):
    """``samples`` sequences of ``length`` random tokens (the same on every rank: the strategy shards the sequence)."""

    def __init__(self, samples: int, length: int, vocab_size: int) -> None:
        self.samples, self.length, self.vocab_size = samples, length, vocab_size

    def __len__(self) -> int:
        return self.samples

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        tokens = torch.randint(0, self.vocab_size, (self.length,), generator=torch.Generator().manual_seed(index))
        return {"input_ids": tokens, "position_ids": torch.arange(self.length), "labels": tokens}


class LlamaStep(LightningModule):
    """Next-token prediction with the chunked loss from the final hidden states (no [L, vocabulary] logits)."""

    def __init__(self, config: LlamaConfig, loss_chunk: int, fused_optimizer: bool) -> None:
        super().__init__()
        self.model = LlamaForCausalLM(config)
        self.loss_chunk, self.fused_optimizer = loss_chunk, fused_optimizer

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        hidden = self.model.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).last_hidden_state
        return chunked_causal_lm_cross_entropy(hidden, self.model.lm_head, batch["labels"], chunk_size=self.loss_chunk)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # fused: one kernel over every parameter on the GPU, without foreach's temporaries the size of all of them.
        return torch.optim.AdamW(self.parameters(), lr=1e-5, fused=self.fused_optimizer or None)


class StepTimer(Callback):
    """Each training step's wall time (the device synchronised at both ends) and loss; the device's peak counters
    reset when training starts, so that they count the steps, not the model's setup."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.losses: list[float] = []
        self._started = 0.0

    def _synchronize(self, pl_module: LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._synchronize(pl_module)
        self._started = time.perf_counter()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._synchronize(pl_module)
        self.seconds.append(time.perf_counter() - self._started)
        self.losses.append(float(outputs["loss"]))


@dataclasses.dataclass(frozen=True)
class Run:
    """One measurement: the model, the length, the recipe's sizes and the machine."""

    preset: str
    length: int
    devices: int
    accelerator: str  # "cuda" or "cpu"
    steps: int
    warmup: int
    mlp_tile: int
    loss_chunk: int
    head_groups: int
    micro_q_size: int | None  # None: GATHERED_ROWS / P query rows, as the estimator assumes (fewer on a short L)
    offload_parameters: bool
    estimate: bool
    peak_flops: float | None  # None: from PEAK_FLOPS by the device's name

    @property
    def tokens_per_step(self) -> int:
        return self.length  # one sequence a step, split over the P ranks

    @property
    def micro_q_rows(self) -> int:
        return self.micro_q_size or max(1, min(self.length, GATHERED_ROWS) // self.devices)


def check(run: Run) -> None:
    """Errors a run would meet late, named with their fix."""
    if run.preset not in PRESETS:
        raise ValueError(f"unknown preset {run.preset!r}: choose one of {', '.join(PRESETS)}")
    if run.length <= 0 or run.length % (2 * run.devices):
        multiple = 2 * run.devices
        fix = max(multiple, run.length // multiple * multiple)
        raise ValueError(f"--length {run.length} does not split over P = {run.devices} ranks in the zigzag layout (2P = {multiple} "
                         f"chunks): give a multiple of {multiple}, e.g. --length {fix}")
    kv_heads = PRESETS[run.preset]["num_key_value_heads"]
    if kv_heads % run.head_groups:
        raise ValueError(f"--head-groups {run.head_groups} does not divide the {kv_heads} key/value heads of {run.preset}: "
                         f"give a divisor of {kv_heads}")
    if run.steps < 1 or run.warmup < 0:
        raise ValueError(f"--steps must be at least 1 and --warmup at least 0, got {run.steps} and {run.warmup}")


def measure(run: Run) -> dict[str, Any]:
    """Train ``run.warmup + run.steps`` steps and report; the estimate is made first (it needs a process without a
    process group), and the process group the Trainer made is destroyed after (the process may go on)."""
    check(run)
    on_gpu = run.accelerator == "cuda"
    config = llama_config(run.preset, run.length)
    estimate = None
    if run.estimate:
        estimate = estimated_memory(run.preset, run.length, run.devices, run.offload_parameters, on_gpu, run.micro_q_rows)
    strategy = MQSPFSDPStrategy(
        sequence_parallel_size=run.devices, micro_q_size=run.micro_q_rows, attention_backend="triton" if on_gpu else "auto",
        activation_checkpointing=True, offload_activations=True, mlp_tile_size=run.mlp_tile, attention_head_groups=run.head_groups,
        mixed_precision=True, offload_parameters=run.offload_parameters,
    )
    timer = StepTimer()
    trainer = Trainer(strategy=strategy, accelerator=run.accelerator, devices=run.devices, precision="bf16-mixed",
                      max_steps=run.warmup + run.steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=[timer])
    torch.manual_seed(0)
    module = LlamaStep(config, run.loss_chunk, fused_optimizer=on_gpu and not run.offload_parameters)
    parameters = sum(p.numel() for p in module.parameters())
    data = DataLoader(RandomTokens(run.warmup + run.steps, run.length, config.vocab_size), batch_size=1)
    trainer.fit(module, data)
    report = _report(run, config, parameters, timer, estimate, trainer.global_rank)
    if dist.is_initialized():
        dist.destroy_process_group()
    return report


def _report(
    run: Run, config: LlamaConfig, parameters: int, timer: StepTimer, estimate: tuple[int, int] | None, rank: int,
) -> dict[str, Any]:
    on_gpu = run.accelerator == "cuda"
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    device_name = torch.cuda.get_device_name(device) if on_gpu else "cpu"
    step_time = statistics.median(timer.seconds[run.warmup:])
    flops = model_flops_per_step(config, run.length)
    peak = run.peak_flops if run.peak_flops is not None else peak_flops(device_name)
    allocated = torch.cuda.max_memory_allocated(device) if on_gpu else None
    pinned = torch.cuda.host_memory_stats().get("allocated_bytes.peak") if on_gpu else 0
    return {
        "date": datetime.date.today().isoformat(), "device": device_name, "rank": rank,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "lightning": lightning.__version__},
        "run": dataclasses.asdict(run),
        "parameters": parameters, "micro_q_size": run.micro_q_rows,
        "step_seconds": timer.seconds, "losses": timer.losses,
        "step_time_s": step_time, "tokens_per_s": run.tokens_per_step / step_time,
        "model_flops_per_step": flops, "peak_flops": peak, "mfu": None if peak is None else flops / step_time / (peak * run.devices),
        "device_peak_allocated_bytes": allocated,
        "device_peak_reserved_bytes": torch.cuda.max_memory_reserved(device) if on_gpu else None,
        **_estimate_fields(run, allocated, estimate),
        "host_rss_peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux counts KiB
        "host_pinned_peak_bytes": pinned,
    }


def _estimate_fields(run: Run, allocated: int | None, estimate: tuple[int, int] | None) -> dict[str, Any]:
    assumed = estimate_assumes(run.preset)
    return {
        # The sizes where the run differs from what the estimator assumes (empty: the estimate is of this very run).
        "estimate_differs": {name: value for name, value in assumed.items() if dataclasses.asdict(run)[name] != value},
        "estimate_device_bytes": None if estimate is None else estimate[0],
        "estimate_host_bytes": None if estimate is None else estimate[1],
        "measured_over_estimate": None if estimate is None or allocated is None else allocated / estimate[0],
    }


#: How a try that ran out of device or host memory ends (anything else is a failure to report, not a length too long).
_OUT_OF_MEMORY = ("OutOfMemoryError", "out of memory", "CUDA error: out of memory", "cudaErrorMemoryAllocation")


def longest_length(trains: Callable[[int], bool], start: int, granularity: int, limit: int, max_tries: int) -> tuple[int, list[int]]:
    """The longest multiple of ``granularity`` up to ``limit`` for which ``trains`` holds (0: not even ``start``), and the
    lengths tried: ``start``, doubled while it trains, then bisection between the longest that trained and the shortest
    that did not, at most ``max_tries`` tries (then the longest found so far)."""
    tried: list[int] = []

    def attempt(length: int) -> bool:
        tried.append(length)
        return trains(length)

    fits, fails = 0, limit + granularity
    length = start
    while length <= limit and len(tried) < max_tries:
        if not attempt(length):
            fails = length
            break
        fits, length = length, 2 * length
    while fails - fits > granularity and len(tried) < max_tries:
        middle = (fits + fails) // 2 // granularity * granularity
        if attempt(middle):
            fits = middle
        else:
            fails = middle
    return fits, tried


def _argv(run: Run) -> list[str]:
    """The command-line arguments that make ``run`` again (in a fresh process)."""
    return ["--preset", run.preset, "--length", str(run.length), "--devices", str(run.devices), "--accelerator", run.accelerator,
            "--steps", str(run.steps), "--warmup", str(run.warmup), "--mlp-tile", str(run.mlp_tile), "--loss-chunk", str(run.loss_chunk),
            "--head-groups", str(run.head_groups), *([] if run.micro_q_size is None else ["--micro-q-size", str(run.micro_q_size)]),
            "--offload-parameters", "on" if run.offload_parameters else "off", *([] if run.estimate else ["--no-estimate"]),
            *([] if run.peak_flops is None else ["--peak-flops", str(run.peak_flops)])]


class TimedOut(Exception):
    """A try ran past its time: that says nothing about its memory, so a search ends there."""


def measure_in_a_fresh_process(run: Run, timeout_s: float) -> dict[str, Any] | None:
    """``measure(run)`` in a new process: its report, or None when it ran out of memory (device or host). Raises
    :class:`TimedOut` past ``timeout_s`` (the process and its ranks killed), and RuntimeError on any other failure,
    with the end of what the process printed."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "report.json"
        # A session of its own: at P > 1 the try starts its ranks, and a time-out must stop them all with it.
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *_argv(run), "--out", str(out)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            stdout, stderr = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired as error:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise TimedOut(f"L = {run.length:,} ran past {timeout_s:.0f} s") from error
        if proc.returncode == 0:
            return json.loads(out.read_text())
    said = stdout[-2000:] + stderr[-4000:]
    if proc.returncode == -signal.SIGKILL or any(sign in said for sign in _OUT_OF_MEMORY):  # SIGKILL: the host's OOM killer
        return None
    raise RuntimeError(f"L = {run.length:,} failed for a reason other than memory (exit {proc.returncode}):\n{said}")


def search(run: Run, granularity: int, limit: int, max_tries: int, timeout_s: float) -> dict[str, Any]:
    """The longest L that trains (:func:`longest_length`, each try in a fresh process, without the estimate), with the
    report of its try and the estimate for it. A try that times out ends the search: the longest so far is then a
    bound set by time, not memory (``stopped``)."""
    # With the parameters and AdamW state in host memory every step's device peak is the same: one step proves a
    # length. On the device, AdamW's moments appear in the first step's optimizer step: the second step peaks higher.
    warmup = 0 if run.offload_parameters else 1
    tries: list[dict[str, Any]] = []
    reports: dict[int, dict[str, Any]] = {}

    def trains(length: int) -> bool:
        report = measure_in_a_fresh_process(dataclasses.replace(run, length=length, steps=1, warmup=warmup, estimate=False), timeout_s)
        tries.append({"length": length, "trains": report is not None})
        print(f"[train_step] L = {length:,}: {'trains' if report is not None else 'out of memory'}", flush=True)
        if report is not None:
            reports[length] = report
        return report is not None

    stopped = None
    try:
        longest_length(trains, run.length, granularity, limit, max_tries)
    except TimedOut as error:
        stopped = str(error)
        print(f"[train_step] {stopped}: the search ends at the longest L so far", flush=True)
    longest = max(reports, default=0)
    report = reports.get(longest)
    if report is not None and run.estimate:
        longest_run = dataclasses.replace(run, length=longest)
        estimate = estimated_memory(run.preset, longest, run.devices, run.offload_parameters, run.accelerator == "cuda",
                                    longest_run.micro_q_rows)
        report.update(_estimate_fields(longest_run, report["device_peak_allocated_bytes"], estimate))
    return {"longest_length": longest, "stopped": stopped, "tries": tries, "report": report}


def table(report: dict[str, Any]) -> list[str]:
    """The report's figures, one a line."""
    def size(value: int | None) -> str:
        if value is None:
            return "-"
        return f"{value / 1e9:.2f} GB" if value >= 1e9 else f"{value / 1e6:.1f} MB"

    def number(value: float | None, form: str) -> str:
        return "-" if value is None else format(value, form)

    run = report["run"]
    rows = [
        ("model", f"{run['preset']} ({report['parameters'] / 1e6:,.1f}M parameters), L = {run['length']:,}, P = {run['devices']}, "
                  f"{report['device']}"),
        ("recipe", f"checkpointing, offload, tiles {run['mlp_tile']}, loss chunks {run['loss_chunk']}, head groups "
                   f"{run['head_groups']}, micro_q_size {report['micro_q_size']}, parameters on the "
                   f"{'host' if run['offload_parameters'] else 'device'}"),
        ("step time (median)", f"{report['step_time_s']:.3f} s over {len(report['step_seconds']) - run['warmup']} steps"),
        ("tokens per second", f"{report['tokens_per_s']:,.0f}"),
        ("model FLOPs per step", f"{report['model_flops_per_step']:.3e}"),
        ("MFU", number(report["mfu"] and 100 * report["mfu"], ".1f") + (" %" if report["mfu"] is not None else "")),
        ("device peak allocated", size(report["device_peak_allocated_bytes"])),
        ("device peak reserved", size(report["device_peak_reserved_bytes"])),
        ("estimate (device, host)", f"{size(report['estimate_device_bytes'])}, {size(report['estimate_host_bytes'])}"
                                    + (f", as if {report['estimate_differs']}" if report["estimate_differs"] else "")),
        ("measured / estimate", number(report["measured_over_estimate"], ".3f")),
        ("host RSS peak, pinned peak", f"{size(report['host_rss_peak_bytes'])}, {size(report['host_pinned_peak_bytes'])}"),
    ]
    return [f"{name:<28} {value}" for name, value in rows]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="3b", help=f"one of {', '.join(PRESETS)}")
    parser.add_argument("--length", type=int, default=None,
                        help="tokens a sequence (with --search: where the doubling starts); default 32768, 256 with --dry-run")
    parser.add_argument("--devices", type=int, default=1, help="ranks, all sequence parallel (P)")
    parser.add_argument("--accelerator", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--steps", type=int, default=3, help="timed steps, after the warm-up")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--mlp-tile", type=int, default=None, help="tokens a tile of MLPs and norms (default: the estimator's)")
    parser.add_argument("--loss-chunk", type=int, default=None, help="tokens a chunk of the loss (default: the estimator's)")
    parser.add_argument("--head-groups", type=int, default=None, help="groups of key/value heads (default: one head a group)")
    parser.add_argument("--micro-q-size", type=int, default=None, help=f"query rows a micro-step (default {GATHERED_ROWS} / P)")
    parser.add_argument("--offload-parameters", choices=["auto", "on", "off"], default="auto",
                        help=f"auto: on for {', '.join(HOST_PARAMETER_PRESETS)}")
    parser.add_argument("--no-estimate", action="store_true", help="skip the memory estimator")
    parser.add_argument("--peak-flops", type=float, default=None, help="the device's dense bf16 FLOP/s (default: from its name)")
    parser.add_argument("--search", action="store_true", help="find the longest L that trains (fresh process a try)")
    parser.add_argument("--granularity", type=int, default=8192, help="--search: lengths are multiples of this")
    parser.add_argument("--limit", type=int, default=4 * 2**20, help="--search: the longest L tried")
    parser.add_argument("--max-tries", type=int, default=10, help="--search: tries at most")
    parser.add_argument("--try-timeout", type=float, default=1800, help="--search: seconds a try may take")
    parser.add_argument("--estimate-longest", type=float, default=None, metavar="GB",
                        help="only the estimator's longest L for a device of this many GB (a CPU computation, no GPU needed)")
    parser.add_argument("--dry-run", action="store_true", help="the tiny model on the CPU, P = 1, tiles of 64 (the suite's run)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "train_step.json")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.preset, args.accelerator, args.devices = "tiny", "cpu", 1
        args.length, args.mlp_tile, args.loss_chunk = args.length or 256, args.mlp_tile or 64, args.loss_chunk or 64
    args.length = args.length or 32768
    if args.preset not in PRESETS:
        parser.error(f"unknown preset {args.preset!r}: choose one of {', '.join(PRESETS)}")
    offload_parameters = args.offload_parameters == "on" or (args.offload_parameters == "auto" and args.preset in HOST_PARAMETER_PRESETS)
    if args.estimate_longest is not None:
        budget = int(args.estimate_longest * 1e9)
        result = {"preset": args.preset, "devices": args.devices, "offload_parameters": offload_parameters, "budget_bytes": budget,
                  "estimated_longest_length": estimated_longest_length(args.preset, args.devices, offload_parameters, budget)}
        print(f"the estimator's longest L for {args.preset} at {args.estimate_longest:g} GB: {result['estimated_longest_length']:,}")
        _write(args.out, result)
        return result
    if args.accelerator == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --dry-run (or --accelerator cpu) on a CPU")
    estimator = memory_estimator()
    run = Run(
        preset=args.preset, length=args.length, devices=args.devices, accelerator=args.accelerator, steps=args.steps,
        warmup=args.warmup, mlp_tile=args.mlp_tile or estimator.MLP_TILE, loss_chunk=args.loss_chunk or estimator.LOSS_CHUNK,
        head_groups=args.head_groups or PRESETS[args.preset]["num_key_value_heads"],
        micro_q_size=args.micro_q_size,
        offload_parameters=offload_parameters, estimate=not args.no_estimate, peak_flops=args.peak_flops,
    )
    try:
        check(run)
    except ValueError as error:
        parser.error(str(error))
    if args.search and args.granularity % (2 * run.devices):
        parser.error(f"--granularity {args.granularity} does not split over P = {run.devices} ranks in the zigzag layout: give a "
                     f"multiple of {2 * run.devices}")
    if args.search:
        result = search(run, args.granularity, args.limit, args.max_tries, args.try_timeout)
        print(f"longest L that trains: {result['longest_length']:,}" + (f" ({result['stopped']})" if result["stopped"] else ""), flush=True)
        report = result["report"]
    else:
        result = report = measure(run)
    if report is not None and report["rank"] == 0:
        print("\n".join(table(report)), flush=True)
    if result.get("rank", 0) == 0:
        _write(args.out, result)
    return result


def _write(path: Path, result: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
