"""The fake-tensor estimate of a training step's peak memory against a real step measured by
MemTracker on real gloo ranks (tiny BERT, a few thousand tokens), within 5%; and the fake run's
counted bytes against the methods' analytic formulas."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the benchmarks/ folder is not installed

from benchmarks.estimate_memory import (
    Setup,
    analytic_communication,
    counted_communication,
    estimate_training_step,
    extrapolated_peak,
    measure_training_step,
)

#: Largest |estimate / measured - 1| accepted.
TOLERANCE = 0.05


def measured_peak(setup: Setup) -> int:
    """On every rank of the pool: a real training step's peak, measured by MemTracker."""
    torch.manual_seed(0)
    return measure_training_step(setup).peak_bytes


def _quiet_estimate(setup: Setup) -> int:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Module is None")
        return estimate_training_step(setup).peak_bytes


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


@pytest.mark.parametrize("method", ["mqsp", "dense", "rsa", "megatron_sp", "ring", "ulysses"])
def test_counted_bytes_under_the_fake_group_match_the_formula(method: str) -> None:
    setup = Setup("tiny-bert", method, length=1024, world_size=4, precision="bf16-mixed")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Module is None")
        counted = counted_communication(setup)
    assert counted == analytic_communication(setup, itemsize=2)


@pytest.mark.parametrize("recipe", ["sharded", "checkpointed", "full"])
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_recipe_estimates_match_real_two_rank_steps(workers, recipe: str, precision: str) -> None:
    """The training recipes of docs/scaling.md's Llama-8B table, on a tiny Llama: FSDP2 sharding over the gloo ranks,
    activation checkpointing, offload and the chunked loss measured for real, against the fake estimate."""
    setup = Setup("tiny-llama", "mqsp", length=2048, world_size=2, precision=precision, recipe=recipe)
    estimate = _quiet_estimate(setup)
    for rank, measured in enumerate(workers(2).run(measured_peak, setup)):
        assert abs(estimate / measured - 1) <= TOLERANCE, f"rank {rank}: estimate {estimate:,} B, measured {measured:,} B"


def test_the_gpu_kernels_footprint_is_estimated_from_their_fake_implementations() -> None:
    """attention_backend="triton" runs the Triton ops' fake implementations under FakeTensorMode (no GPU, no
    interpreter): the step's peak, which keeps no [rows, keys] tile nor GQA-expanded keys, is at most the CPU kernel's."""
    cpu, gpu = (_quiet_estimate(Setup("tiny-llama", "mqsp", 2048, 2, recipe="full", attention_backend=backend))
                for backend in ("cpu_flash", "triton"))
    assert 0 < gpu <= cpu
