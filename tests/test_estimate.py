"""The fake-tensor estimate of a training step's peak memory (lightning_mqsp/estimate.py) against a real step
measured by MemTracker on real gloo ranks (tiny BERT and Llama, a few thousand tokens), within 5%; and, through
benchmarks/estimate_memory.py, the fake run's counted bytes against the methods' analytic formulas."""

from __future__ import annotations

import multiprocessing
import sys
import warnings
import weakref
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

sys.path.append(str(Path(__file__).resolve().parents[1]))  # `benchmarks` is not installed: the root, after site-packages

import benchmarks.estimate_memory as estimate_memory
import lightning_mqsp.estimate as estimate
from benchmarks.estimate_memory import analytic_communication, counted_communication
from lightning_mqsp.estimate import (
    RECIPE_PROBE_LAYERS,
    Setup,
    StepMemory,
    estimate_training_step,
    extrapolated_memory,
    extrapolated_peak,
    measure_training_step,
)

#: Largest |estimate / measured - 1| accepted.
TOLERANCE = 0.05


def measured_peak(setup: Setup) -> int:
    """On every rank of the pool: a real training step's peak, measured by MemTracker."""
    torch.manual_seed(0)
    return measure_training_step(setup).peak_bytes


def _quiet_estimate_memory(setup: Setup) -> StepMemory:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Module is None")
        return estimate_training_step(setup)


def _quiet_estimate(setup: Setup) -> int:
    return _quiet_estimate_memory(setup).peak_bytes


@pytest.mark.parametrize(
    "method, precision",
    [("mqsp", "32-true"), ("mqsp", "bf16-mixed"), ("ring", "bf16-mixed"), ("megatron_sp", "32-true")],
)
def test_estimate_matches_a_real_two_rank_step(workers, method: str, precision: str) -> None:
    setup = Setup("tiny-bert", method, length=2048, world_size=2, precision=precision)
    estimate = _quiet_estimate(setup)
    for rank, measured in enumerate(workers(2).run(measured_peak, setup)):
        assert abs(estimate / measured - 1) <= TOLERANCE, f"rank {rank}: estimate {estimate:,} B, measured {measured:,} B"


def test_estimate_matches_a_real_single_device_step() -> None:
    setup = Setup("tiny-bert", "dense", length=2048, world_size=1, precision="32-true")
    estimate = _quiet_estimate(setup)
    measured = measured_peak(setup)
    assert abs(estimate / measured - 1) <= TOLERANCE, f"estimate {estimate:,} B, measured {measured:,} B"


def test_two_layer_extrapolation_matches_a_deeper_fake_run() -> None:
    setup = Setup("tiny-bert", "mqsp", length=4096, world_size=4, num_layers=None)
    deeper = Setup("tiny-bert", "mqsp", length=4096, world_size=4, num_layers=4)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Module is None")
        assert extrapolated_peak(setup) == estimate_training_step(setup).peak_bytes
        # Four layers from the (1, 2)-layer probes: the slope per layer is the same further down.
        shallow, two = (estimate_training_step(Setup("tiny-bert", "mqsp", 4096, 4, num_layers=n)).peak_bytes for n in (1, 2))
        assert shallow + 3 * (two - shallow) == estimate_training_step(deeper).peak_bytes


@pytest.mark.parametrize("recipe, length", [("checkpointed", 262144), ("full", 1048576)])
def test_recipe_extrapolation_matches_a_deeper_fake_run(recipe: str, length: int) -> None:
    """llama-8b's recipes over 8 ranks: the depth extrapolation from RECIPE_PROBE_LAYERS against an 8-layer fake run
    (from (1, 2) layers, a layer's recompute and the embedding and head gradients overlap differently, and the
    extrapolated peak came out 26% too high at this depth). The full recipe at a length where its peak is in a
    layer's backward, as at the lengths the searches find: at 262,144 it moves to the end of backward from 6 layers
    on (RECIPE_CHECK_LAYERS, which each search checks)."""
    setup = Setup("llama-8b", "mqsp", length, 8, recipe=recipe, attention_backend="triton", optimizer_foreach=False,
                  num_layers=8)
    # A fake run is one Python thread: the 8-layer run goes to a second process while this one runs the probes
    # (164 s one after the other for the full recipe on a slow 2-core host).
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        deeper_run = pool.submit(_quiet_estimate, setup)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Module is None")
            extrapolated, _ = extrapolated_memory(setup, RECIPE_PROBE_LAYERS)
        deeper = deeper_run.result()
    assert abs(extrapolated / deeper - 1) <= 0.01, f"extrapolated {extrapolated:,} B, 8-layer run {deeper:,} B"


@pytest.mark.parametrize("method", ["mqsp", "dense", "rsa", "megatron_sp", "ring", "ulysses"])
def test_counted_bytes_under_the_fake_group_match_the_formula(method: str) -> None:
    setup = Setup("tiny-bert", method, length=1024, world_size=4, precision="bf16-mixed")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Module is None")
        counted = counted_communication(setup)
    assert counted == analytic_communication(setup, itemsize=2)


@pytest.mark.parametrize("recipe", ["sharded", "checkpointed", "full", "host_parameters"])
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_recipe_estimates_match_real_two_rank_steps(workers, recipe: str, precision: str) -> None:
    """The training recipes of docs/scaling.md's Llama-8B table, on a tiny Llama: FSDP2 sharding over the gloo ranks,
    activation checkpointing, offload and the chunked loss measured for real, against the fake estimate."""
    setup = Setup("tiny-llama", "mqsp", length=2048, world_size=2, precision=precision, recipe=recipe)
    estimate = _quiet_estimate(setup)
    for rank, measured in enumerate(workers(2).run(measured_peak, setup)):
        assert abs(estimate / measured - 1) <= TOLERANCE, f"rank {rank}: estimate {estimate:,} B, measured {measured:,} B"


@pytest.mark.parametrize("world_size", [1, 2])
def test_parameters_in_host_memory_leave_the_device(world_size: int) -> None:
    """The host_parameters recipe against the full recipe, the same step: the float32 parameter shards and AdamW's two
    moments, there all the time, leave the device's peak (the unsharded bf16 copies a running layer gathers stay), and
    the host's peak holds them next to the offloaded activations: 12 bytes a parameter over P, not 16, as the gradient
    shards arrive only as backward frees the activations (a sum of the two peaks, which the estimator took before, would
    count them on top)."""
    setup = Setup("tiny-llama", "mqsp", length=16384, world_size=world_size, precision="bf16-mixed", recipe="full")
    full, on_host = (_quiet_estimate_memory(replace(setup, recipe=recipe)) for recipe in ("full", "host_parameters"))
    shard_bytes = 4 * sum(p.numel() for p in LlamaForCausalLM(setup.config()).parameters()) // world_size
    assert 3 * shard_bytes <= full.peak_bytes - on_host.peak_bytes <= 4 * shard_bytes
    assert 3 * shard_bytes <= on_host.host_peak_bytes - full.host_peak_bytes < 4 * shard_bytes


class _CopiesOnHost(estimate._HostMemory):
    """What ``offload.to_host`` does on a GPU, on this CPU: a tensor not in host memory yet copied into a new host tensor
    of its own size (on a CPU it keeps the tensor itself), the copies' live bytes followed until backward frees them,
    and read back as they are. A copy is told by its id (views of an offloaded query are in host memory too)."""

    def __init__(self) -> None:
        super().__init__()
        self.copies: dict[int, int] = {}  # id of a copy -> the id of its storage, shared by its views

    def to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        if not tensor.is_floating_point() or self.on_host(tensor):
            return tensor
        copy = torch.empty(tensor.size(), dtype=tensor.dtype, layout=tensor.layout).copy_(tensor)
        nbytes = copy.untyped_storage().nbytes()
        self.bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.bytes)
        weakref.finalize(copy, self._release, nbytes)
        self.copies[id(copy)] = copy.untyped_storage().data_ptr()
        weakref.finalize(copy, self.copies.pop, id(copy))
        return copy

    def to_device(self, tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
        return tensor.to(device)

    def on_host(self, tensor: torch.Tensor) -> bool:
        return tensor.untyped_storage().data_ptr() in self.copies.values()


def measured_host_peak(setup: Setup) -> int:
    """On every rank of the pool: the peak host memory of a real step whose offload copies as save_on_cpu does."""
    torch.manual_seed(0)
    offload = estimate._HostMemory
    estimate._HostMemory = _CopiesOnHost  # type: ignore[misc]
    try:
        return measure_training_step(setup).host_peak_bytes
    finally:
        estimate._HostMemory = offload  # type: ignore[misc]  (the pool's processes serve other tests too)


def test_offloaded_host_memory_matches_a_real_two_rank_step(workers) -> None:
    """The host memory column of docs/scaling.md: the estimate's offloaded bytes against the live bytes of real
    copies (the chunked loss saves views of the hidden states: each is copied at its own size, not its storage's).
    8192 tokens per rank: two chunks of the loss and two tiles of each MLP."""
    setup = Setup("tiny-llama", "mqsp", length=16384, world_size=2, precision="bf16-mixed", recipe="full")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Module is None")
        estimate = estimate_training_step(setup).host_peak_bytes
    for rank, measured in enumerate(workers(2).run(measured_host_peak, setup)):
        assert measured > 0 and abs(estimate / measured - 1) <= TOLERANCE, (
            f"rank {rank}: estimate {estimate:,} B, measured {measured:,} B")


def test_the_gpu_kernels_footprint_is_estimated_from_their_fake_implementations() -> None:
    """attention_backend="triton" runs the Triton ops' fake implementations under FakeTensorMode (no GPU, no
    interpreter): the step's peak, which keeps no [rows, keys] tile nor GQA-expanded keys, is at most the CPU kernel's."""
    cpu, gpu = (_quiet_estimate(Setup("tiny-llama", "mqsp", 2048, 2, recipe="full", attention_backend=backend))
                for backend in ("cpu_flash", "triton"))
    assert 0 < gpu <= cpu


def test_the_recipe_table_says_which_cells_were_not_estimated_and_which_commit_made_each() -> None:
    """A run that searches some cells keeps the others from the last run: the table must not pass them off as one run's."""
    row = {"length": 1024 * 8, "peak_bytes": 79 * 10**9, "host_bytes": 10**9, "attention_share": 0.1}
    table = {recipe: {"8": row | {"commit": "aaaaaaa"}} for recipe in estimate_memory.RECIPES}
    table["full"]["1"] = {"length": 0, "peak_bytes": 10**11, "commit": "bbbbbbb"}
    results = {"settings": {"model": "llama-8b", "precision": "bf16-mixed", "budget_gb": 80, "command": "python x"}, "recipes": table}
    text = estimate_memory.recipe_markdown(results)
    full_row = next(line for line in text.splitlines() if line.startswith("| MQSP full recipe ("))
    assert full_row.endswith("| does not fit | 8,192 | not estimated |")
    assert "aaaaaaa: ddp P=8," in text and "bbbbbbb: full P=1." in text


@pytest.mark.parametrize("shape", ["affine", "steeper beyond a kink", "convex", "concave"])
def test_the_length_search_finds_the_longest_fitting_length_in_few_estimates(shape: str) -> None:
    """Each estimate of the 8B search is a long fake run: the search must bracket the longest fitting length (a
    multiple of the step) to 2% with few of them, whichever way the peak bends."""
    step, budget = 32 * 1024, 80 * 10**9
    curves = {
        "affine": lambda length: 3e9 + 6e3 * length,
        "steeper beyond a kink": lambda length: 3e9 + 4e3 * length + 3e3 * max(0, length - 8_000_000),
        "convex": lambda length: 3e9 + 1e3 * length + 4e-4 * length**2,
        "concave": lambda length: 3e9 + 2e6 * length**0.5 + 1e3 * length,
    }
    calls: list[int] = []

    def peak(length: int) -> int:
        calls.append(length)
        return int(curves[shape](length))

    found = estimate_memory.longest_fitting_length(peak, budget, step)
    longest = max(n * step for n in range(1, 2000) if curves[shape](n * step) <= budget)  # by brute force
    assert curves[shape](found) <= budget and found <= longest <= found * 1.02
    assert len(calls) <= {"affine": 5}.get(shape, 10), calls
    assert estimate_memory.longest_fitting_length(peak, 1, step) == 0
