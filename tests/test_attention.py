"""mqsp_attention on P gloo ranks against single-process float64 attention: outputs and dQ, dK, dV."""

from __future__ import annotations

from dataclasses import dataclass, fields

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from packaging.version import Version
from reference import dense_attention, dropout_reference, relative_error, sdpa_reference
from torch.multiprocessing.reductions import StorageWeakRef

from lightning_mqsp import attention, comm, count_communication, mqsp_attention, offload, shard_sequence
from lightning_mqsp.attention import DEVICE_STEP_BYTES, _Route, _route, auto_micro_q_size, communication_bytes, step_bytes_per_gathered_row
from lightning_mqsp.backends import cpu_flash
from lightning_mqsp.dropout import keep_mask
from lightning_mqsp.visibility import Window

FP32_TOLERANCE = 1e-5
BF16_TOLERANCE = 2e-2
FP64_TOLERANCE = 1e-12


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
    window: tuple[int | None, int | None] | None = None
    documents: bool = False
    softcap: float | None = None
    batch: int = 2
    length: int = 64
    head_dim: int = 16
    head_groups: int = 1
    offload_queries: bool = False

    def __str__(self) -> str:
        parts = [f"P{self.world_size}", "causal" if self.causal else "full", self.layout, self.padding,
                 f"H{self.heads}/{self.kv_heads}", f"c{self.micro_q_size}", str(self.dtype).split(".")[-1], self.backend]
        extras = [f"window{self.window}" if self.window else "", "documents" if self.documents else "",
                  f"softcap{self.softcap}" if self.softcap else "", f"groups{self.head_groups}" if self.head_groups > 1 else "",
                  "offload" if self.offload_queries else ""]
        return "-".join(parts + [e for e in extras if e])


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
    if case.documents:  # packed documents of random lengths, crossing shard boundaries; ids ascend
        starts = (torch.rand(b, n, generator=g) < 0.08).long()
        starts[:, 0] = 0
        inputs["documents"] = starts.cumsum(dim=1)
    return inputs


def reference_outputs(case: Case, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    q, k, v = (inputs[n].double().clone().requires_grad_() for n in "qkv")
    out = sdpa_reference(q, k, v, causal=case.causal, key_padding_mask=inputs.get("mask"), window=case.window,
                         documents=inputs.get("documents"), softcap=case.softcap)
    out.backward(inputs["dout"].double())
    return {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}


def run_case(case: Case) -> dict[str, float]:
    """On every rank: this rank's shard through mqsp_attention against the reference's shard."""
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    inputs = make_inputs(case)
    expected = reference_outputs(case, inputs)
    shard = {name: shard_sequence(t, 1 if name in ("mask", "documents") else 2, rank, world_size, case.layout)
             for name, t in inputs.items()}
    q, k, v = (shard[n].clone().requires_grad_() for n in "qkv")
    out = mqsp_attention(
        q, k, v, key_padding_mask=shard.get("mask"), causal=case.causal, layout=case.layout, window=case.window,
        document_ids=shard.get("documents"), softcap=case.softcap, micro_q_size=case.micro_q_size, backend=case.backend,
        head_groups=case.head_groups, offload_queries=case.offload_queries,
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
    Case(1, window=(6, 2), documents=True, padding="random"),
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
    Case(2, causal=True, layout="zigzag", padding="random", dtype=torch.float64, micro_q_size=5),
    # Sliding windows (causal as in Mistral, symmetric as in ModernBERT), documents, soft-capping, on both CPU backends.
    Case(2, causal=True, layout="zigzag", window=(9, None), padding="random", micro_q_size=5),
    Case(2, layout="contiguous", window=(5, 5), heads=4, kv_heads=2),
    Case(2, causal=True, layout="zigzag", documents=True, micro_q_size=6),
    Case(2, layout="zigzag", documents=True, padding="random", window=(7, 7), backend="reference"),
    Case(2, causal=True, layout="zigzag", window=(11, None), documents=True, softcap=3.0, kv_heads=2),
    Case(3, causal=True, layout="zigzag", window=(4, None), documents=True, length=66, micro_q_size=4),
    Case(4),
    Case(4, causal=True, layout="zigzag", padding="random", micro_q_size=3),
    Case(4, causal=True, padding="empty_shard", heads=4, kv_heads=2),
    Case(4, layout="zigzag", padding="empty_rows", dtype=torch.bfloat16),
    Case(4, causal=True, layout="zigzag", window=(13, None), documents=True, padding="random", micro_q_size=5),
    # Rank 0's keys see the second-chunk rows of ranks 0, 2 and 3 but not 1's: a route with a gap.
    Case(4, causal=True, layout="zigzag", window=(40, None), micro_q_size=3, backend="reference"),
    # The backward over groups of heads (float32 accumulating in place, bf16 through group accumulators), queries offloaded.
    Case(1, causal=True, heads=4, kv_heads=2, head_groups=2, offload_queries=True, padding="random", dtype=torch.bfloat16),
    Case(1, window=(6, 2), heads=4, kv_heads=4, head_groups=4, documents=True),
    Case(2, causal=True, layout="zigzag", heads=4, kv_heads=2, head_groups=2, padding="random", micro_q_size=5),
    Case(2, heads=4, kv_heads=4, head_groups=4, offload_queries=True, dtype=torch.bfloat16, micro_q_size=7),
    Case(2, causal=True, heads=4, kv_heads=2, head_groups=2, offload_queries=True, backend="reference", micro_q_size=6),
    Case(4, causal=True, layout="zigzag", heads=4, kv_heads=2, head_groups=2, documents=True, offload_queries=True, micro_q_size=3),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_single_process_attention(workers, case: Case) -> None:
    errors_by_rank = [run_case(case)] if case.world_size == 1 else workers(case.world_size).run(run_case, case)
    tolerance = {torch.float32: FP32_TOLERANCE, torch.bfloat16: BF16_TOLERANCE, torch.float64: FP64_TOLERANCE}[case.dtype]
    for rank, errors in enumerate(errors_by_rank):
        for name, error in errors.items():
            assert error <= tolerance, f"rank {rank}: {name} relative error {error:.2e} > {tolerance:.0e}"


NUMERICS_SHAPE = (1, 2, 512, 32)  # at P = 4 each rank holds 128 rows: 8 micro-steps of 16


def squared_errors_against_float64(dtype: str, causal: bool) -> dict[str, tuple[float, float]]:
    """This rank's (sum of squared differences, sum of squared float64 values) of out, dq, dk, dv: the inputs rounded
    to ``dtype`` once, the reference float64 attention of those rounded inputs. Alone without a process group."""
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    generator = torch.Generator().manual_seed(0)
    full = {name: torch.randn(NUMERICS_SHAPE, generator=generator).to(getattr(torch, dtype)) for name in ("q", "k", "v", "dout")}
    q64, k64, v64 = (full[name].double().requires_grad_() for name in ("q", "k", "v"))
    positions = torch.arange(NUMERICS_SHAPE[2])
    expected = dense_attention(q64, k64, v64, (positions[None, :] <= positions[:, None])[None, None] if causal else None)
    expected.backward(full["dout"].double())
    layout = "zigzag" if causal else "contiguous"

    def shard(x: torch.Tensor) -> torch.Tensor:
        return shard_sequence(x, 2, rank, world_size, layout)

    q, k, v = (shard(full[name]).requires_grad_() for name in ("q", "k", "v"))
    out = mqsp_attention(q, k, v, causal=causal, layout=layout, micro_q_size=16)
    out.backward(shard(full["dout"]))
    pairs = {"out": (out.detach(), expected), "dq": (q.grad, q64.grad), "dk": (k.grad, k64.grad), "dv": (v.grad, v64.grad)}
    return {name: (float((actual.double() - shard(ref.detach())).square().sum()), float(shard(ref.detach()).square().sum()))
            for name, (actual, ref) in pairs.items()}


def _norm_errors(per_rank: list[dict[str, tuple[float, float]]]) -> dict[str, float]:
    """||actual - float64|| / ||float64|| over the whole sequence, from every rank's sums."""
    return {name: (sum(r[name][0] for r in per_rank) / sum(r[name][1] for r in per_rank)) ** 0.5 for name in per_rank[0]}


@pytest.mark.parametrize("causal", [False, True], ids=["no mask", "causal zigzag"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_error_does_not_grow_with_the_number_of_ranks(workers, dtype: str, causal: bool) -> None:
    """The merge of partial results and the accumulation of the gradients stay in float32 whatever the input dtype:
    at P = 4 (8 micro-steps a rank) the output's and every gradient's error against float64 is within 1.1x of one
    process's. A merge or accumulator that rounds to bfloat16 per step would grow it with P
    (``benchmarks/numerics.py`` measures P = 1..16 against ring attention and Ulysses)."""
    alone = _norm_errors([squared_errors_against_float64(dtype, causal)])
    four = _norm_errors(workers(4).run(squared_errors_against_float64, dtype, causal))
    for name in alone:
        assert four[name] <= 1.1 * alone[name], f"{name}: {four[name]:.3e} at P = 4 against {alone[name]:.3e} alone"


def test_runs_without_a_process_group() -> None:
    assert not dist.is_initialized()
    with count_communication() as counter:
        errors = run_case(Case(1, causal=True, padding="random", micro_q_size=7))
    assert max(errors.values()) <= FP32_TOLERANCE, errors
    assert counter.calls == {}  # one rank: no collective at all


def run_with_dropout(dropout_p: float, micro_q_size: int, causal: bool) -> dict[str, float]:
    rank, world_size = dist.get_rank(), dist.get_world_size()
    case = Case(world_size, causal=causal, layout="zigzag")
    inputs = make_inputs(case, seed=3)
    torch.manual_seed(1234)  # what rank 0 draws below
    seed = torch.randint(0, 2**31 - 1, (1,))
    keep = keep_mask(seed, case.heads, case.batch, torch.arange(case.length), torch.arange(case.length), dropout_p)
    q, k, v = (inputs[n].double().requires_grad_() for n in "qkv")
    expected_out = dropout_reference(q, k, v, keep, dropout_p, causal)
    expected_out.backward(inputs["dout"].double())
    expected = {"out": expected_out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}

    torch.manual_seed(1234 + rank)  # the ranks' generators differ: the group must use one seed, rank 0's
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


def count_bytes(case: Case, backward: bool) -> tuple[dict[str, int], dict[str, int], dict[str, int], dict[str, int]]:
    """Bytes of a first call (which checks its new signature) and of a second, identical call."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    inputs = make_inputs(case)
    counts = []
    for _ in range(2):
        q, k, v = (shard_sequence(inputs[n], 2, rank, world_size, case.layout).requires_grad_() for n in "qkv")
        with count_communication() as counter:
            out = mqsp_attention(q, k, v, micro_q_size=case.micro_q_size, causal=case.causal, layout=case.layout,
                                 head_groups=case.head_groups)
            if backward:
                out.sum().backward()
        counts.append(dict(counter.bytes_sent))
    expected = [communication_bytes(
        batch=case.batch, heads=case.heads, kv_heads=case.kv_heads, local_length=q.size(2), head_dim=case.head_dim,
        world_size=world_size, dtype=case.dtype, backward=backward, include_check=check, causal=case.causal, layout=case.layout,
        micro_q_size=case.micro_q_size, rank=rank, head_groups=case.head_groups, aligned_rows=False,  # cpu_flash
    ) for check in (True, False)]
    return counts[0], counts[1], *expected


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("backward", [False, True])
def test_counted_bytes_match_the_analytic_formula(workers, world_size: int, backward: bool) -> None:
    # A signature no other test uses (batch 1, this micro_q_size), so that the first call here is the first ever.
    case = Case(world_size, micro_q_size=5 if backward else 6, causal=True, batch=1, heads=4, head_dim=16)
    for rank, (first, repeated, expected_first, expected) in enumerate(workers(world_size).run(count_bytes, case, backward)):
        assert repeated == expected  # a repeated signature sends no check
        assert first == expected_first
        assert first["all_gather"] == expected.get("all_gather", 0) + (world_size - 1) * 20 * 8  # one int64 row of metadata
        # Written out from the algorithm (causal, contiguous): rank r's rows are seen by the keys of ranks 0..r
        # and its keys see the rows of ranks r..P-1; nothing travels between the other pairs. Forward sends
        # its l local queries (fp32, D=16) to each rank that sees them and returns partial outputs plus two
        # statistics (D+2 floats) to each rank it saw; backward re-sends queries and output gradients (2D)
        # with three statistics the same way (cpu_flash's rows are not padded), and returns the partial dQ (D).
        rows = 1 * 4 * (64 // world_size)
        sent_rows, returned_rows = (16, 18) if not backward else (16 + 32 + 3, 18 + 16)
        assert expected == {"all_to_all": rows * 4 * (rank * sent_rows + (world_size - 1 - rank) * returned_rows)}


def test_counted_bytes_without_a_mask_are_the_dense_formula(workers) -> None:
    """Without a mask every rank sees every row: queries (and output gradients) all-gathered, (P-1) x l rows a rank,
    partial outputs back by all-to-all, partial query gradients by reduce-scatter."""
    case = Case(4, micro_q_size=7, causal=False, batch=1, heads=4, head_dim=16)
    rows = 3 * 4 * 16
    for _, repeated, _, expected in workers(4).run(count_bytes, case, True):
        dense = {"all_gather": rows * (16 + 32 + 3) * 4, "all_to_all": rows * 18 * 4, "reduce_scatter": rows * 16 * 4}
        assert repeated == expected == dense


@pytest.mark.parametrize("causal", [False, True], ids=["no mask", "causal zigzag"])
def test_counted_bytes_with_head_groups_match_the_formula(workers, causal: bool) -> None:
    """Two head groups: the backward's steps take twice the rows of half the heads. Zigzag steps that wide see more
    ranks' rows than half as wide ones would, so the formula walks the wider steps: it matches a counted call, and
    without a mask it is the same bytes as one group."""
    case = Case(4, micro_q_size=3, causal=causal, layout="zigzag" if causal else "contiguous", batch=1, heads=4, kv_heads=2,
                head_groups=2, head_dim=16)
    for rank, (first, repeated, expected_first, expected) in enumerate(workers(4).run(count_bytes, case, True)):
        assert repeated == expected and first == expected_first
        if not causal:
            assert expected == communication_bytes(batch=1, heads=4, kv_heads=2, local_length=16, head_dim=16, world_size=4,
                                                   dtype=torch.float32, micro_q_size=3, rank=rank, aligned_rows=False)


def all_gathers_by_pass() -> tuple[int, int]:
    """comm.all_gather calls of the micro-steps of an unmasked forward, then of its backward (3 each); the check of
    the call's signature across ranks is an all-gather too, not counted."""
    calls = [0]
    original = comm.all_gather

    def counted(x: torch.Tensor, group: dist.ProcessGroup | None, what: str = "") -> comm.Pending:
        calls[0] += "gather of queries" in what or "query gather" in what
        return original(x, group, what)

    comm.all_gather = counted
    try:
        q, k, v = (torch.randn(1, 2, 9, 8, requires_grad=True) for _ in range(3))
        out = mqsp_attention(q, k, v, micro_q_size=3)
        forward = calls[0]
        out.sum().backward()
        return forward, calls[0] - forward
    finally:
        comm.all_gather = original


def test_on_gloo_the_forward_gathers_by_exchange_and_the_backward_all_gathers(workers) -> None:
    """gloo's all-to-all costs less than its all-gather (the forward's query gathers use it), but it holds a copy of the
    rows for every rank: the backward, whose step buffers set the peak, keeps the all-gather. (The bytes counted are the
    same, ``test_counted_bytes_without_a_mask_are_the_dense_formula``.)"""
    for forward, backward in workers(2).run(all_gathers_by_pass):
        assert (forward, backward) == (0, 3)


def backward_step_layouts() -> tuple[list[bool], list[bool]]:
    """For each cpu_flash backward kernel call of a causal P=2 backward, whether its output gradient is stored
    sequence-major; for each query-gradient return, whether the backend's dQ goes to the collective as it is."""
    kernel_layouts: list[bool] = []
    sent_as_is: list[bool] = []
    flash_backward, reduce_scatter, exchange = cpu_flash._flash_backward, comm.reduce_scatter, comm.exchange

    def recording_kernel(dout: torch.Tensor, *args, **kwargs):
        kernel_layouts.append(dout.transpose(1, 2).is_contiguous())
        return flash_backward(dout, *args, **kwargs)

    def recording(collective):
        def call(x: torch.Tensor, *args, **kwargs) -> comm.Pending:
            if "query gradients" in str(args[-1]):
                sent_as_is.append(x.is_contiguous())
            return collective(x, *args, **kwargs)
        return call

    cpu_flash._flash_backward, comm.reduce_scatter, comm.exchange = recording_kernel, recording(reduce_scatter), recording(exchange)
    try:
        q, k, v = (torch.randn(1, 4, 32, 16, requires_grad=True) for _ in range(3))
        mqsp_attention(q, k, v, causal=True, layout="zigzag", micro_q_size=8, backend="cpu_flash").sum().backward()
    finally:
        cpu_flash._flash_backward, comm.reduce_scatter, comm.exchange = flash_backward, reduce_scatter, exchange
    return kernel_layouts, sent_as_is


def test_the_backward_steps_hand_over_their_rows_without_copies(workers) -> None:
    """aten's CPU flash backward copies an output gradient not stored [B, M, H, D]; a collective copies a non-contiguous
    input: the gathered output gradients are joined sequence-major and dQ is sent in the order the backend stores it."""
    for kernel_layouts, sent_as_is in workers(2).run(backward_step_layouts):
        assert kernel_layouts and all(kernel_layouts)
        assert sent_as_is and all(sent_as_is)


def output_layout() -> tuple[bool, bool]:
    q, k, v = (torch.randn(1, 4, 8, 16, requires_grad=True) for _ in range(3))
    out = mqsp_attention(q, k, v, causal=True, micro_q_size=3)
    out.sum().backward()
    sequence_major = out.transpose(1, 2)
    return sequence_major.is_contiguous(), sequence_major.reshape(1, 8, 64).data_ptr() == out.data_ptr()


def test_the_output_is_sequence_major_so_the_usual_transpose_is_free(workers) -> None:
    """Stored [B, S, H, D] as CUDA's flash SDPA returns it, even for contiguous [B, H, S, D] queries: a model's
    transpose(1, 2).reshape(B, S, H*D) copies nothing, and the output projection saves the tensor attention saves
    anyway, not a second copy."""
    for contiguous, shared in [output_layout(), *workers(2).run(output_layout)]:  # one rank, and two
        assert contiguous and shared


def kept_for_backward(local_length: int) -> tuple[int, bool, int]:
    """Two causal calls with packed documents, as two layers of one batch make them: the bytes the first keeps for its
    backward (distinct storages of its saved tensors and masks), whether the two share one copy of every rank's
    document ids, and how many times they were all-gathered."""
    q, k, v = (torch.randn(1, 2, local_length, 8, requires_grad=True) for _ in range(3))
    document_ids = (torch.arange(local_length) * 3 // local_length).expand(1, -1)
    all_gather, gathers = comm.all_gather, []

    def counted(x, group, what, *args, **kwargs):
        gathers.append(what)
        return all_gather(x, group, what, *args, **kwargs)

    comm.all_gather = counted
    try:
        first, second = (mqsp_attention(q, k, v, causal=True, document_ids=document_ids, micro_q_size=4) for _ in range(2))
    finally:
        comm.all_gather = all_gather
    masks = first.grad_fn.masks
    kept = [*first.grad_fn.saved_tensors, *(getattr(masks, field.name) for field in fields(masks))]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in kept if isinstance(t, torch.Tensor)}
    return sum(storages.values()), second.grad_fn.masks.documents is masks.documents, sum("document ids" in w for w in gathers)


def test_what_a_layer_keeps_for_backward_does_not_grow_with_the_number_of_ranks(workers) -> None:
    """At one local length, a layer keeps the same bytes for its backward at P = 2 and P = 4 but for the one copy of
    every rank's document ids that all layers share: no positions of the whole sequence (they would be 8 bytes a token
    of it, a layer), and document ids gathered once."""
    local_length = 32
    kept = {p: workers(p).run(kept_for_backward, local_length) for p in (2, 4)}
    for results in kept.values():
        assert all(shared and gathers == 1 for _, shared, gathers in results)
    documents = {p: p * local_length * 8 for p in kept}  # [P, B = 1, l] int64
    besides_documents = {p: {kept_bytes - documents[p] for kept_bytes, _, _ in results} for p, results in kept.items()}
    assert len(besides_documents[2]) == 1 and besides_documents[2] == besides_documents[4]


@pytest.mark.parametrize("case", [
    Case(1, causal=True, window=(6, None), documents=True, padding="random"),
    Case(1, window=(4, 9), heads=4, kv_heads=2, dtype=torch.bfloat16),
    Case(1, causal=True, layout="zigzag", softcap=2.0, backend="reference"),
], ids=str)
def test_one_rank_runs_the_kernel_in_blocks_of_rows(monkeypatch: pytest.MonkeyPatch, case: Case) -> None:
    """P = 1 calls the kernel on blocks of query rows (forward's float32 out and backward's float32 dQ exist for one block
    at a time): 5 rows a block here, against single-process attention, gradients included."""
    monkeypatch.setattr(attention, "_LOCAL_BLOCK_ROWS", 5)
    errors = run_case(case)
    tolerance = BF16_TOLERANCE if case.dtype == torch.bfloat16 else FP32_TOLERANCE
    assert max(errors.values()) <= tolerance, errors


def test_routes_follow_the_window() -> None:
    """Who exchanges a micro-step's rows, from the layout and the window alone."""
    causal, full = Window.of(True, None), Window.of(False, None)
    # Zigzag, P=4, l=16 (chunks of 8): in a step of first chunks, rank r's keys see rows of ranks r..3 and
    # rank r's rows are seen by ranks 0..r; in a step of second chunks every rank sees every row.
    for rank in range(4):
        assert _route(4, rank, "zigzag", 16, causal, 0, 4) == _Route(tuple(range(rank, 4)), tuple(range(rank + 1)), False)
        assert _route(4, rank, "zigzag", 16, causal, 8, 12) == _Route((0, 1, 2, 3), (0, 1, 2, 3), True)
        assert _route(4, rank, "contiguous", 16, full, 0, 16).dense
    # A causal sliding window of 40 keys: rank 0's keys (positions 0-7 and 56-63) see the second-chunk rows
    # of ranks 0 (56-63), 2 (40-47) and 3 (32-39), not rank 1's (48-55: before 56, and over 40 after 7).
    assert _route(4, 0, "zigzag", 16, Window.of(True, (40, None)), 8, 16).sources == (0, 2, 3)
    # A sliding window far shorter than l: the first rows of a rank go to the rank before it only, and its keys
    # see the first rows of the rank after it; later steps stay on the rank.
    assert _route(8, 5, "contiguous", 1024, Window.of(True, (128, None)), 0, 256) == _Route((5, 6), (4, 5), False)
    assert _route(8, 5, "contiguous", 1024, Window.of(True, (128, None)), 256, 512) == _Route((5,), (5,), False)


def test_a_sliding_window_sends_only_to_the_neighbours() -> None:
    """Bytes of a causal sliding window of w << l keys: the queries and results of the first w rows of a rank
    go to one neighbour, whatever P is (the dense formula would send every row to every rank)."""
    common = dict(batch=1, heads=8, kv_heads=8, local_length=4096, head_dim=64, dtype=torch.bfloat16, micro_q_size=256)
    windowed = communication_bytes(world_size=8, rank=3, causal=True, window=(255, None), **common)
    dense = communication_bytes(world_size=8, rank=3, **common)
    row = 8 * 256  # heads x one step of rows: only rank 3's first step is seen by rank 2's keys
    # forward: queries (bf16) out, partials (D + 2 floats) back; backward: queries, output gradients and three float32
    # statistics, 134 bf16 elements padded to 144, out, dQ (D floats) back.
    assert windowed == {"all_to_all": row * (64 * 2 + 144 * 2) + row * (66 + 64) * 4}
    assert sum(dense.values()) > 50 * sum(windowed.values())


def test_float64_is_computed_in_float64() -> None:
    """float64 inputs run exactly in float64 (the reference backend): gradcheck passes."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 6, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mask = torch.tensor([[True, True, False, True, True, True]])
    for causal in (False, True):
        assert torch.autograd.gradcheck(
            lambda q, k, v, causal=causal: mqsp_attention(q, k, v, causal=causal, key_padding_mask=mask, window=(3, 3)), (q, k, v)
        )


def test_double_backward_is_refused_not_silently_wrong() -> None:
    q, k, v = (torch.randn(1, 2, 8, 4, requires_grad=True) for _ in range(3))
    for backend in ("reference", "cpu_flash"):
        out = mqsp_attention(q, k, v, backend=backend)
        (grad_q,) = torch.autograd.grad(out.pow(2).sum(), q, create_graph=True)
        with pytest.raises(RuntimeError, match="not twice differentiable"):
            grad_q.sum().backward()


def test_autocast_casts_the_inputs_like_sdpa() -> None:
    """Under autocast (what precision="bf16-mixed" does), float32 queries and keys with bfloat16 values
    (Hugging Face RoPE models) are all cast to bfloat16, exactly as scaled_dot_product_attention does."""
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 2, 16, 8, generator=g) for _ in range(2))
    v = torch.randn(1, 2, 16, 8, generator=g).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mqsp_attention(q, k, v, causal=True)
        expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert out.dtype == expected.dtype == torch.bfloat16
    exact = mqsp_attention(q.bfloat16(), k.bfloat16(), v, causal=True)
    torch.testing.assert_close(out, exact, rtol=0, atol=0)
    assert relative_error(out, expected) <= BF16_TOLERANCE


def run_large_offset(backend: str, causal: bool, padded: bool) -> dict[str, float]:
    """Scores near 1e4 that float32 represents exactly (integer inputs, scale 1/4): the merge must not
    add the rounding of a large float32 log-sum-exp to every output row."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randint(-3, 4, (1, 2, 64, 16), generator=g).float() for _ in range(2))
    q[..., 0] = k[..., 0] = 200.0  # a common score of 200 * 200 / 4 = 1e4
    v, dout = (torch.randn(1, 2, 64, 16, generator=g) for _ in range(2))
    mask = torch.rand(1, 64, generator=g) > 0.2 if padded else None
    if mask is not None:  # padded keys may hold anything: here huge values that every score ignores
        k[..., 1:] = torch.where(mask[:, None, :, None], k[..., 1:], torch.full_like(k[..., 1:], 1e30))
    allowed = torch.ones(64, 64, dtype=torch.bool).tril() if causal else torch.ones(64, 64, dtype=torch.bool)
    allowed = allowed & mask[:, None, None, :] if mask is not None else allowed
    qd, kd, vd = (t.double().requires_grad_() for t in (q, k, v))
    expected = dense_attention(qd, kd, vd, allowed, scale=0.25)
    expected.backward(dout.double())
    qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
    sdpa = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=allowed, scale=0.25)
    sdpa.backward(dout)
    shard = lambda t, dim=2: shard_sequence(t, dim, rank, world_size, "zigzag")
    ql, kl, vl = (shard(t).clone().requires_grad_() for t in (q, k, v))
    out = mqsp_attention(
        ql, kl, vl, key_padding_mask=None if mask is None else shard(mask, 1), causal=causal, layout="zigzag",
        scale=0.25, micro_q_size=8, backend=backend,
    )
    out.backward(shard(dout))
    return {
        "out": relative_error(out, shard(expected)) / max(relative_error(shard(sdpa), shard(expected)), 1e-7),
        **{f"d{name}": relative_error(ours.grad, shard(exact.grad)) / max(relative_error(shard(single.grad), shard(exact.grad)), 1e-7)
           for name, ours, exact, single in (("q", ql, qd, qs), ("k", kl, kd, ks), ("v", vl, vd, vs))},
    }


@pytest.mark.parametrize(("backend", "causal", "padded"), [
    ("reference", False, False), ("cpu_flash", False, False), ("cpu_flash", True, True), ("reference", True, True),
])
def test_large_common_score_offset_keeps_float32_precision(workers, backend: str, causal: bool, padded: bool) -> None:
    """The merged rows are as precise as single-process float32 SDPA's (within 3x), not 10-1000x worse."""
    for errors in workers(2).run(run_large_offset, backend, causal, padded):
        assert max(errors.values()) <= 3, errors


class _HostReadError(AssertionError):
    pass


def _forbid_host_reads() -> list:
    """Make every way of reading a tensor's value on the host raise; return what to restore."""
    saved = []
    for name in ("item", "tolist", "__bool__", "nonzero", "__int__", "__float__"):
        original = getattr(torch.Tensor, name)

        def forbidden(*args, _name=name, **kwargs):
            raise _HostReadError(f"Tensor.{_name} called on the hot path")

        saved.append((name, original))
        setattr(torch.Tensor, name, forbidden)
    return saved


def run_without_host_reads(backend: str, case: Case) -> bool:
    """A first call checks its new signature (it may read the exchanged metadata); a repeated call with the same
    signature reads no tensor value on the host, in forward or backward."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    inputs = make_inputs(case)
    shard = {n: shard_sequence(t, 1 if n in ("mask", "documents") else 2, rank, world_size, case.layout) for n, t in inputs.items()}

    def call() -> None:
        q, k, v = (shard[n].clone().requires_grad_() for n in "qkv")
        out = mqsp_attention(q, k, v, key_padding_mask=shard.get("mask"), causal=case.causal, layout=case.layout,
                             window=case.window, document_ids=shard.get("documents"), micro_q_size=case.micro_q_size, backend=backend)
        out.backward(shard["dout"])

    call()
    saved = _forbid_host_reads()
    try:
        call()
    finally:
        for name, original in saved:
            setattr(torch.Tensor, name, original)
    return True


@pytest.mark.parametrize("backend", ["reference", "cpu_flash"])
@pytest.mark.parametrize("case", [
    Case(2, causal=True, layout="zigzag", padding="random", micro_q_size=5),
    Case(2, layout="contiguous", window=(6, 6), documents=True, padding="random", micro_q_size=7),
], ids=str)
def test_a_repeated_call_reads_nothing_on_the_host(workers, backend: str, case: Case) -> None:
    assert workers(2).run(run_without_host_reads, backend, case) == [True, True]


# torch 2.11's Dynamo cannot build the autograd Function's arguments (a frozen dataclass, slices) inside the graph:
# there mqsp_attention compiles with graph breaks around it, and computes the same (make test-floor runs it).
ONE_GRAPH = Version(torch.__version__).release >= (2, 13)


def test_one_rank_compiles_into_one_graph() -> None:
    """P = 1: torch.compile(fullgraph=True) traces mqsp_attention whole, forward and backward, and computes the same."""
    q, k, v = (torch.randn(1, 2, 32, 16, requires_grad=True) for _ in range(3))
    compiled = torch.compile(lambda q, k, v: mqsp_attention(q, k, v, causal=True, window=(9, None)), fullgraph=ONE_GRAPH)
    out = compiled(q, k, v)
    out.sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    expected = mqsp_attention(q, k, v, causal=True, window=(9, None))
    expected.sum().backward()
    torch.testing.assert_close(out, expected)
    for actual, reference in zip(grads, (q.grad, k.grad, v.grad)):
        torch.testing.assert_close(actual, reference)


def compile_across_ranks(micro_q_size: int) -> tuple[int, int, list[str], list[int]]:
    """A block around mqsp_attention, compiled at P = 2: graphs, breaks and their reasons, and the count of
    graphs compiled after one and after three forward and backward calls."""
    import torch._dynamo

    torch._dynamo.reset()
    rank, world_size = dist.get_rank(), dist.get_world_size()
    projection = torch.nn.Linear(16, 16)

    def block(x: torch.Tensor) -> torch.Tensor:
        q = projection(x).view(1, x.size(1), 2, 8).transpose(1, 2)
        return mqsp_attention(q, q, q, causal=True, layout="zigzag", micro_q_size=micro_q_size).transpose(1, 2).sum()

    x = shard_sequence(torch.randn(1, 16, 16), 1, rank, world_size, "zigzag")
    explanation = torch._dynamo.explain(block)(x)
    reasons = sorted({str(b.reason).splitlines()[0] for b in explanation.break_reasons})
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(block)
    compiled_graphs = []
    for _ in range(3):
        compiled(x).backward()
        compiled_graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    return explanation.graph_count, explanation.graph_break_count, reasons, compiled_graphs


@pytest.mark.parametrize("micro_q_size", [8, 1])  # one micro-step, and eight
def test_compiled_across_ranks_the_graph_breaks_only_around_the_collectives(workers, micro_q_size: int) -> None:
    """P = 2: the communicating part of mqsp_attention is one opaque call: one graph break per attention call
    (two graphs around it), whatever the number of micro-steps, and nothing is compiled again on later calls."""
    for graphs, breaks, reasons, compiled_graphs in workers(2).run(compile_across_ranks, micro_q_size, timeout=240):
        assert (graphs, breaks) == (2, 1), reasons
        assert reasons == ["Skip calling `torch.compiler.disable()`d function"], reasons
        assert compiled_graphs[0] == compiled_graphs[-1] == 2, compiled_graphs


def test_narrowing_in_place_gives_the_same_bits_as_a_cast() -> None:
    for n in (1, 7, 16, 17, 1000, 4097):
        wide = torch.randn(2, 3, n)
        narrow = attention._narrow_in_place(wide.clone(), torch.bfloat16)
        assert narrow.dtype == torch.bfloat16 and torch.equal(narrow, wide.to(torch.bfloat16))


def test_a_leaf_keys_gradient_owns_storage_of_its_own_size() -> None:
    """The float32 dK/dV accumulators are narrowed in their own storage, but a leaf's .grad lives on: it must not keep
    a storage twice its size."""
    q, k, v = (torch.randn(1, 2, 64, 16, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    mqsp_attention(q, k, v, causal=True).sum().backward()
    for leaf in (k, v):
        assert leaf.grad.untyped_storage().nbytes() == leaf.grad.numel() * leaf.grad.element_size()
    out = mqsp_attention(q, k * 1, v * 1, causal=True)  # not leaves: narrowed in place, values the same
    grads = torch.autograd.grad(out.sum(), (k, v))
    assert all(torch.equal(g, leaf.grad) for g, leaf in zip(grads, (k, v)))


def backward_peak(head_groups: int) -> int:
    """MemTracker's peak of a bf16 forward and backward at P=1, 8 query and 4 key/value heads, 2048 tokens."""
    from torch.distributed._tools.mem_tracker import MemTracker

    torch.manual_seed(0)
    q, dout = (torch.randn(1, 8, 2048, 64, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    k, v = (torch.randn(1, 4, 2048, 64, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    tracker = MemTracker()
    tracker.track_external(q, k, v, dout)
    with tracker:
        mqsp_attention(q, k, v * 1, causal=True, head_groups=head_groups).backward(dout.detach())
    return tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]


def test_head_groups_keep_float32_key_value_accumulators_for_one_group_at_a_time() -> None:
    """Grouped, dK and dV are made in bf16 from the start and float32 exists for one group's heads: at least the
    difference of those to the whole float32 accumulators is saved (the kernel's float32 dQ shrinks as well)."""
    key_value_fp32 = 2 * 4 * 2048 * 64 * 4
    saved_at_least = key_value_fp32 - key_value_fp32 // 2 - key_value_fp32 // 4
    assert backward_peak(4) <= backward_peak(1) - saved_at_least


def output_freed_before_the_kernels(head_groups: int, retain_graph: bool = False) -> list[bool]:
    """For each read of the queries' rows in backward (one per block of rows a kernel call takes), whether the output's
    storage was freed by then. The output is used the way a model's output projection uses it (saved as its input,
    which that projection's backward releases before attention's backward runs)."""
    seen: list[StorageWeakRef] = []
    freed: list[bool] = []
    row_dots, to_device = attention._row_dots, offload.to_device

    def recording_row_dots(grad_out: torch.Tensor, out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        seen.append(StorageWeakRef(out.untyped_storage()))
        return row_dots(grad_out, out, dtype)

    def checking_to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
        freed.append(seen[-1].expired())
        return to_device(x, device)

    attention._row_dots, offload.to_device = recording_row_dots, checking_to_device  # type: ignore[assignment]
    try:
        torch.manual_seed(0)
        q, k, v = (torch.randn(1, 4, 32, 8, requires_grad=True) for _ in range(3))
        projection = torch.randn(32, 32)
        out = mqsp_attention(q * 1, k[:, :2] * 1, v[:, :2] * 1, causal=True, head_groups=head_groups)
        loss = (out.transpose(1, 2).flatten(2) @ projection).sum()
        del out
        loss.backward(retain_graph=retain_graph)
    finally:
        attention._row_dots, offload.to_device = row_dots, to_device  # type: ignore[assignment]
    return freed


@pytest.mark.parametrize("head_groups", [1, 2])
def test_the_output_is_freed_once_delta_is_made(workers, head_groups: int) -> None:
    """The output is needed for delta = rowsum(dO * O) alone: backward lets it go before the kernels and the step
    buffers exist (one hidden state a token less at a layer's peak), on one rank and on two; a retained graph keeps it."""
    freed = output_freed_before_the_kernels(head_groups)
    assert freed and all(freed)
    for freed in workers(2).run(output_freed_before_the_kernels, head_groups):
        assert freed and all(freed)
    kept = output_freed_before_the_kernels(head_groups, retain_graph=True)
    assert kept and not any(kept)


def offloaded_query_reads(head_groups: int) -> tuple[bool, bool, list[int]]:
    """With offload_queries: whether the query itself, and its host copy, are saved for backward, and the rows of each
    read of the copy in backward (24 tokens, micro_q_size 4). to_host is replaced by a clone (on the CPU it is the tensor)."""
    copies: list[torch.Tensor] = []
    reads: list[int] = []
    to_host, to_device = offload.to_host, offload.to_device

    def cloned(x: torch.Tensor) -> torch.Tensor:
        copies.append(x.clone())
        return copies[-1]

    def read(x: torch.Tensor, device: torch.device) -> torch.Tensor:
        assert x.untyped_storage().data_ptr() == copies[-1].untyped_storage().data_ptr(), "backward read the device query"
        reads.append(x.size(2))
        return to_device(x, device)

    offload.to_host, offload.to_device = cloned, read
    saved: list[torch.Tensor] = []
    try:
        q, k, v = (torch.randn(1, 4, 24, 8, requires_grad=True) for _ in range(3))
        query = q * 1  # not a leaf: what the model's RoPE hands over
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out = mqsp_attention(query, k[:, :2], v[:, :2], causal=True, micro_q_size=4, offload_queries=True,
                                 head_groups=head_groups)
        out.sum().backward()
    finally:
        offload.to_host, offload.to_device = to_host, to_device
    return any(t is query for t in saved), any(t is copies[-1] for t in saved), reads


@pytest.mark.parametrize("head_groups", [1, 2])
def test_offloaded_queries_are_saved_as_their_host_copy_and_read_a_step_at_a_time(workers, head_groups: int) -> None:
    """The forward saves the host copy, not the query; backward copies back one micro-step's rows (a block of rows on
    one rank) at a time, every row once per group of heads. Values: the head-group cases of CASES."""
    saves_query, saves_copy, reads = offloaded_query_reads(head_groups)
    assert not saves_query and saves_copy and reads == [24] * head_groups  # one rank: one block of rows per group
    for saves_query, saves_copy, reads in workers(2).run(offloaded_query_reads, head_groups):
        assert not saves_query and saves_copy
        assert sum(reads) == head_groups * 24 and max(reads) == 4 * head_groups  # a step: 4 rows x the groups


def test_micro_steps_are_sized_for_the_device() -> None:
    """On the CPU a step gathers about 2048 rows (fewer on short sequences); on a GPU as many as DEVICE_STEP_BYTES of
    step buffers hold, never fewer than the CPU's 2048 and never more than the rank's rows."""
    llama_8b_row = step_bytes_per_gathered_row(32, 128, torch.bfloat16)
    # Forward: the row and its successor, 2 x 2 x 128 B, partials out and back 2 x 4 x 130 B; backward: the padded row
    # (2 x 128 + 6 -> 272 elements) and its successor, 2 x 2 x 272 B, dQ out and back 2 x 4 x 128 B; the larger, x 32 heads.
    assert llama_8b_row == 32 * max(2 * 2 * 128 + 2 * 4 * 130, 2 * 2 * 272 + 2 * 4 * 128)
    local = 131072 // 8
    on_gpu = auto_micro_q_size(local, 8, llama_8b_row)
    assert 8 * (on_gpu - 1) * llama_8b_row <= DEVICE_STEP_BYTES < 8 * (on_gpu + 1) * llama_8b_row
    assert 8 * on_gpu >= 3900  # twice the CPU's rows a step
    assert auto_micro_q_size(local, 8) == 2048 // 8  # the CPU keeps its choice
    assert auto_micro_q_size(1000, 8, 10**9) == 2048 // 8  # at least the CPU's rows, however large a row
    assert auto_micro_q_size(100, 8, 1) == 100  # at most the rank's rows
