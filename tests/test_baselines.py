"""The benchmark's attention methods on P gloo ranks against single-process float64 SDPA
(outputs and dQ, dK, dV), causal and not, each on shards in its own layout, and their counted
bytes against their analytic formulas."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch.distributed as dist

sys.path.append(str(Path(__file__).resolve().parents[1]))  # `benchmarks` is not installed: the root, after site-packages

from reference import relative_error, sdpa_reference

from benchmarks.baselines import METHODS
from benchmarks.baselines.common import Shape, local_shard, make_inputs
from lightning_mqsp import count_communication

TOLERANCE = 1e-5
SHAPE = dict(batch=2, heads=4, length=64, head_dim=16)


def method_errors(name: str, shape: Shape) -> dict[str, float]:
    """On every rank: this rank's out, dq, dk, dv from the method against the float64 reference's shard."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    layout = METHODS[name].layout(shape.causal)
    inputs = make_inputs(shape, seed=7)
    q, k, v = (inputs[n].double().requires_grad_() for n in "qkv")
    expected_out = sdpa_reference(q, k, v, causal=shape.causal)
    expected_out.backward(inputs["dout"].double())
    expected = {"out": expected_out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}

    ql, kl, vl = (local_shard(inputs[n], rank, world_size, layout).requires_grad_() for n in "qkv")
    out = METHODS[name].attention(ql, kl, vl, None, shape.causal)
    out.backward(local_shard(inputs["dout"], rank, world_size, layout))
    actual = {"out": out, "dq": ql.grad, "dk": kl.grad, "dv": vl.grad}
    return {n: relative_error(actual[n], local_shard(expected[n], rank, world_size, layout)) for n in actual}


def counted_bytes(name: str, shape: Shape) -> dict[str, int]:
    rank, world_size = dist.get_rank(), dist.get_world_size()
    layout = METHODS[name].layout(shape.causal)
    inputs = make_inputs(shape)
    q, k, v = (local_shard(inputs[n], rank, world_size, layout).requires_grad_() for n in "qkv")
    # A first call is not counted: MQSP checks a signature new to this worker across ranks (one row of int64s),
    # and whether this worker saw the shape before depends on how the suite was split between workers.
    METHODS[name].attention(q, k, v, None, shape.causal).sum().backward()
    with count_communication() as counter:
        METHODS[name].attention(q, k, v, None, shape.causal).sum().backward()
    return dict(counter.bytes_sent)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("world_size", [1, 2, 4])
@pytest.mark.parametrize("name", list(METHODS))
def test_method_matches_float64_sdpa(workers, name: str, world_size: int, causal: bool) -> None:
    shape = Shape(world_size=world_size, causal=causal, **SHAPE)
    for rank, errors in enumerate(workers(world_size).run(method_errors, name, shape)):
        for tensor, error in errors.items():
            assert error <= TOLERANCE, f"{name}, rank {rank} of {world_size}: {tensor} relative error {error:.2e}"


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("name", list(METHODS))
def test_counted_bytes_match_the_analytic_formula(workers, name: str, world_size: int, causal: bool) -> None:
    shape = Shape(world_size=world_size, causal=causal, **SHAPE)
    counted = workers(world_size).run(counted_bytes, name, shape)
    for rank, sent in enumerate(counted):
        # MQSP sends a row only to the ranks that see it: under a causal mask its ranks send different amounts.
        expected = METHODS[name].communication_bytes(shape, **({"rank": rank} if name.startswith("mqsp") else {}))
        assert sent == expected, f"{name}, rank {rank}: counted {sent}, formula {expected}"
