"""mqsp_attention on P gloo ranks against single-process float64 attention: outputs and dQ, dK, dV."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
import torch.distributed as dist

from lightning_mqsp import count_communication, mqsp_attention, shard_sequence
from lightning_mqsp.attention import communication_bytes
from lightning_mqsp.dropout import draw_seed, keep_mask
from reference import dropout_reference, relative_error, sdpa_reference

FP32_TOLERANCE = 1e-5
BF16_TOLERANCE = 2e-2


@dataclass(frozen=True)
class Case:
    world_size: int
    causal: bool = False
    layout: str = "contiguous"
    padding: str = "none"  # none | random | empty_shard (rank 1's keys all masked) | empty_rows
    heads: int = 4
    kv_heads: int = 4
    micro_q_size: int | None = None
    dtype: torch.dtype = torch.float32
    backend: str = "auto"
    batch: int = 2
    length: int = 64
    head_dim: int = 16

    def __str__(self) -> str:
        parts = [f"P{self.world_size}", "causal" if self.causal else "full", self.layout, self.padding,
                 f"H{self.heads}/{self.kv_heads}", f"c{self.micro_q_size}", str(self.dtype).split(".")[-1], self.backend]
        return "-".join(parts)


def make_inputs(case: Case, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    b, h, hk, n, d = case.batch, case.heads, case.kv_heads, case.length, case.head_dim
    inputs = {
        "q": torch.randn(b, h, n, d, generator=g).to(case.dtype),
        "k": torch.randn(b, hk, n, d, generator=g).to(case.dtype),
        "v": torch.randn(b, hk, n, d, generator=g).to(case.dtype),
        "dout": torch.randn(b, h, n, d, generator=g).to(case.dtype),
    }
    mask = torch.ones(b, n, dtype=torch.bool)
    if case.padding == "random":
        mask = torch.rand(b, n, generator=g) > 0.3
    elif case.padding == "empty_shard":  # every key rank 1 holds (in this layout) is masked for batch 0
        owned = shard_sequence(torch.arange(n), 0, 1, case.world_size, case.layout)
        mask[0, owned] = False
        mask[1] = torch.rand(n, generator=g) > 0.3
    elif case.padding == "empty_rows":  # batch 1 has no key at all; batch 0 masks key 0 (under causal, row 0 sees nothing)
        mask[1] = False
        mask[0, 0] = False
    if case.padding != "none":
        inputs["mask"] = mask
    return inputs


def reference_outputs(case: Case, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    q, k, v = (inputs[n].double().requires_grad_() for n in "qkv")
    out = sdpa_reference(q, k, v, causal=case.causal, key_padding_mask=inputs.get("mask"))
    out.backward(inputs["dout"].double())
    return {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}


def run_case(case: Case) -> dict[str, float]:
    """On every rank: this rank's shard through mqsp_attention against the reference's shard."""
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    inputs = make_inputs(case)
    expected = reference_outputs(case, inputs)
    shard = {name: shard_sequence(t, 1 if name == "mask" else 2, rank, world_size, case.layout) for name, t in inputs.items()}
    q, k, v = (shard[n].clone().requires_grad_() for n in "qkv")
    out = mqsp_attention(
        q, k, v, key_padding_mask=shard.get("mask"), causal=case.causal, layout=case.layout,
        micro_q_size=case.micro_q_size, backend=case.backend,
    )
    out.backward(shard["dout"])
    actual = {"out": out, "dq": q.grad, "dk": k.grad, "dv": v.grad}
    errors = {}
    for name, value in actual.items():
        assert value.dtype == case.dtype and torch.isfinite(value).all(), f"{name} is not finite or has the wrong dtype"
        errors[name] = relative_error(value, shard_sequence(expected[name], 2, rank, world_size, case.layout))
    return errors


CASES = [
    Case(1),
    Case(1, causal=True, padding="random", micro_q_size=5),
    Case(2),
    Case(2, causal=True),
    Case(2, causal=True, layout="zigzag"),
    Case(2, layout="zigzag", padding="random", micro_q_size=5),
    Case(2, causal=True, padding="random", micro_q_size=7),
    Case(2, causal=True, layout="zigzag", padding="empty_shard", micro_q_size=3),
    Case(2, padding="empty_shard"),
    Case(2, causal=True, padding="empty_rows", micro_q_size=4),
    Case(2, padding="empty_rows", layout="zigzag"),
    Case(2, heads=4, kv_heads=2, causal=True, layout="zigzag", padding="random"),
    Case(2, heads=4, kv_heads=1, micro_q_size=32),
    Case(2, micro_q_size=1, length=16),
    Case(2, causal=True, layout="zigzag", padding="random", backend="reference", micro_q_size=6),
    Case(2, heads=4, kv_heads=2, padding="empty_shard", backend="reference"),
    Case(2, causal=True, layout="zigzag", dtype=torch.bfloat16),
    Case(2, padding="random", heads=4, kv_heads=2, dtype=torch.bfloat16, backend="reference", micro_q_size=9),
    Case(4),
    Case(4, causal=True, layout="zigzag", padding="random", micro_q_size=3),
    Case(4, causal=True, padding="empty_shard", heads=4, kv_heads=2),
    Case(4, layout="zigzag", padding="empty_rows", dtype=torch.bfloat16),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_single_process_sdpa(workers, case: Case) -> None:
    errors_by_rank = workers(case.world_size).run(run_case, case)
    tolerance = FP32_TOLERANCE if case.dtype == torch.float32 else BF16_TOLERANCE
    for rank, errors in enumerate(errors_by_rank):
        for name, error in errors.items():
            assert error <= tolerance, f"rank {rank}: {name} relative error {error:.2e} > {tolerance:.0e}"


def test_runs_without_a_process_group() -> None:
    assert not dist.is_initialized()
    with count_communication() as counter:
        errors = run_case(Case(1, causal=True, padding="random", micro_q_size=7))
    assert max(errors.values()) <= FP32_TOLERANCE, errors
    assert counter.calls == {}  # one rank: no collective at all


def run_with_dropout(dropout_p: float, micro_q_size: int, causal: bool) -> dict[str, object]:
    rank, world_size = dist.get_rank(), dist.get_world_size()
    case = Case(world_size, causal=causal, layout="zigzag")
    inputs = make_inputs(case, seed=3)
    torch.manual_seed(1234)
    seed = draw_seed()
    keep = keep_mask(seed, case.heads, case.batch, torch.arange(case.length), torch.arange(case.length), dropout_p)
    q, k, v = (inputs[n].double().requires_grad_() for n in "qkv")
    expected_out = dropout_reference(q, k, v, keep, dropout_p, causal)
    expected_out.backward(inputs["dout"].double())
    expected = {"out": expected_out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}

    torch.manual_seed(1234)  # mqsp_attention draws the same seed on rank 0 and shares it
    shard = {n: shard_sequence(t, 2, rank, world_size, "zigzag") for n, t in inputs.items()}
    ql, kl, vl = (shard[n].clone().requires_grad_() for n in "qkv")
    out = mqsp_attention(ql, kl, vl, causal=causal, layout="zigzag", dropout_p=dropout_p, micro_q_size=micro_q_size)
    out.backward(shard["dout"])
    actual = {"out": out, "dq": ql.grad, "dk": kl.grad, "dv": vl.grad}
    return {n: relative_error(actual[n], shard_sequence(expected[n], 2, rank, world_size, "zigzag")) for n in actual}


@pytest.mark.parametrize("micro_q_size", [3, 32])
@pytest.mark.parametrize("causal", [False, True])
def test_dropout_matches_dense_reference_with_the_same_mask(workers, micro_q_size: int, causal: bool) -> None:
    for rank, errors in enumerate(workers(2).run(run_with_dropout, 0.3, micro_q_size, causal)):
        for name, error in errors.items():
            assert error <= FP32_TOLERANCE, f"rank {rank}: {name} relative error {error:.2e}"


def count_bytes(case: Case, backward: bool) -> tuple[dict[str, int], dict[str, int]]:
    rank, world_size = dist.get_rank(), dist.get_world_size()
    inputs = make_inputs(case)
    q, k, v = (shard_sequence(inputs[n], 2, rank, world_size, case.layout).requires_grad_() for n in "qkv")
    with count_communication() as counter:
        out = mqsp_attention(q, k, v, micro_q_size=case.micro_q_size, causal=case.causal)
        if backward:
            out.sum().backward()
    expected = communication_bytes(
        batch=case.batch, heads=case.heads, kv_heads=case.kv_heads, local_length=q.size(2), head_dim=case.head_dim,
        world_size=world_size, dtype=case.dtype, backward=backward,
    )
    return dict(counter.bytes_sent), expected


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("backward", [False, True])
def test_counted_bytes_match_the_analytic_formula(workers, world_size: int, backward: bool) -> None:
    case = Case(world_size, micro_q_size=5, causal=True)
    for counted, expected in workers(world_size).run(count_bytes, case, backward):
        assert counted == expected
    # DESIGN.md: forward all-gathers (P-1)/P * L * H * D query elements per rank.
    full = Case(world_size).batch * Case(world_size).heads * Case(world_size).length * Case(world_size).head_dim
    assert expected["all_gather"] >= (world_size - 1) / world_size * full * 4
