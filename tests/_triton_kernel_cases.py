"""The Triton kernels (``backend="triton"``) through the Triton interpreter on CPU.

Forward outputs, row statistics and dQ, dK, dV are compared with float64 attention
(``tests/reference.py``) and with the reference backend, over the whole visibility model: causal,
full, sliding and symmetric windows, rows of several ranks (query segments), contiguous, two-run
and scattered positions, padding, documents, soft-capping, GQA, ragged sizes; the dropout mask
is read back out of each kernel and compared bit for bit with ``lightning_mqsp.dropout.keep_mask``.

Run by ``tests/test_backends_triton.py`` in a fresh process with ``TRITON_INTERPRET=1``; to run
a few directly: ``TRITON_INTERPRET=1 pytest tests/_triton_kernel_cases.py -k dropout``.
"""

from __future__ import annotations

import os

# triton.jit decides between compiling and interpreting when a function is decorated: when
# triton itself is imported (its own tl.max, tl.sum, ...) and when lightning_mqsp.kernels is.
# Importing lightning imports torch._dynamo, which imports triton: set it before anything.
os.environ["TRITON_INTERPRET"] = "1"

import json
import math
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import triton
from reference import allowed_pairs, dense_attention, relative_error
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from triton.runtime.interpreter import InterpretedFunction

from lightning_mqsp.attention import backward_row_width
from lightning_mqsp.backends import get_backend, resolve_backend
from lightning_mqsp.dropout import keep_mask
from lightning_mqsp.kernels import ops, tuning
from lightning_mqsp.merge import Partial, merge
from lightning_mqsp.visibility import Visibility, Window

if not tuning.INTERPRET or not isinstance(triton.language.standard.max, InterpretedFunction):
    raise RuntimeError(
        "triton or lightning_mqsp.kernels was imported before TRITON_INTERPRET=1 was set: the kernels would be "
        "compiled for a GPU and cannot run on CPU. Run with TRITON_INTERPRET=1 in the environment."
    )

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3}
TRITON = get_backend("triton")
REFERENCE = get_backend("reference")
REPO = Path(__file__).parent.parent


@dataclass(frozen=True)
class Case:
    dtype: torch.dtype = torch.float32
    head_dim: int = 32
    rows: int = 50  # M, gathered query rows: `segments` runs of rows, each ascending
    keys: int = 70  # N, local keys, ascending
    heads: int = 4
    kv_heads: int = 2
    window: tuple[int | None, int | None] = (None, None)  # (left, right); causal is (None, 0)
    positions: str = "contiguous"  # contiguous | zigzag (two runs per side) | scattered (ascending, with gaps)
    segments: int = 1
    padding: str = "none"  # none | random | empty_batch (batch 1 has no key at all)
    documents: bool = False
    softcap: float | None = None
    batch: int = 2

    def __str__(self) -> str:
        parts = [str(self.dtype).split(".")[-1], f"D{self.head_dim}", f"M{self.rows}", f"N{self.keys}",
                 f"H{self.heads}/{self.kv_heads}", f"window{self.window}", self.positions, f"seg{self.segments}", self.padding]
        return "-".join(parts + ["documents"] * self.documents + ([f"softcap{self.softcap}"] if self.softcap else []))


def ascending(count: int, kind: str, start: int, generator: torch.Generator) -> Tensor:
    """``count`` ascending positions from about ``start``: one run, two runs far apart, or random gaps."""
    if kind == "contiguous":
        return torch.arange(start, start + count)
    if kind == "zigzag":
        return torch.cat([torch.arange(start, start + count // 2), torch.arange(start + 160, start + 160 + count - count // 2)])
    return torch.randperm(3 * count, generator=generator)[:count].sort().values + start


def make_positions(case: Case, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Keys from 30 on; each segment's rows start somewhere between before the first key and past a run of keys,
    so that rows see no key, every key, or the diagonal of a run."""
    keys = ascending(case.keys, case.positions, 30, generator)
    per_segment = case.rows // case.segments
    starts = [0, 55, 20][: case.segments] if case.segments > 1 else [case.keys - case.rows + 30]
    rows = torch.cat([ascending(per_segment, case.positions, start, generator) for start in starts])
    return rows, keys


def make_visibility(case: Case, generator: torch.Generator, **fields: object) -> Visibility:
    rows, keys = make_positions(case, generator)
    padding = None
    if case.padding != "none":
        padding = torch.rand(case.batch, case.keys, generator=generator) > 0.3
        if case.padding == "empty_batch":
            padding[1] = False
    query_documents = key_documents = None
    if case.documents:  # ids step up along the positions (packed sequences), at other places in each batch
        bounds = torch.stack([torch.randperm(400, generator=generator)[:12].sort().values for _ in range(case.batch)])
        query_documents = torch.stack([torch.bucketize(rows, bounds[b], right=True) for b in range(case.batch)])
        key_documents = torch.stack([torch.bucketize(keys, bounds[b], right=True) for b in range(case.batch)])
    return Visibility.for_positions(
        rows, keys, query_segments=case.segments, window=Window(*case.window), key_padding_mask=padding,
        query_documents=query_documents, key_documents=key_documents, softcap=case.softcap, **fields,  # type: ignore[arg-type]
    )


def make_inputs(case: Case, seed: int = 0, **fields: object) -> tuple[dict[str, Tensor], Visibility]:
    g = torch.Generator().manual_seed(seed)
    b, h, hk, m, n, d = case.batch, case.heads, case.kv_heads, case.rows, case.keys, case.head_dim
    tensors = {
        "q": torch.randn(b, h, m, d, generator=g).to(case.dtype),
        "k": torch.randn(b, hk, n, d, generator=g).to(case.dtype),
        "v": torch.randn(b, hk, n, d, generator=g).to(case.dtype),
        "dout": torch.randn(b, h, m, d, generator=g).to(case.dtype),
    }
    return tensors, make_visibility(case, g, **fields)


def reference_pairs(visibility: Visibility) -> Tensor:
    window = (visibility.window.left, visibility.window.right)
    return allowed_pairs(visibility.query_positions, visibility.key_positions, window=window,
                         key_padding_mask=visibility.key_padding_mask, query_documents=visibility.query_documents,
                         key_documents=visibility.key_documents)


def float64_expected(t: dict[str, Tensor], visibility: Visibility, scale: float, keep: Tensor | None = None) -> dict[str, Tensor]:
    """Output, row statistics and gradients of float64 attention on the same (already rounded) inputs."""
    q, k, v = (t[name].double().requires_grad_() for name in "qkv")
    allowed = reference_pairs(visibility)
    out = dense_attention(q, k, v, allowed, scale=scale, softcap=visibility.softcap, keep=keep, dropout_p=visibility.dropout_p)
    out.backward(t["dout"].double())
    groups = q.size(1) // k.size(1)
    scores = q.detach() @ k.detach().repeat_interleave(groups, dim=1).transpose(-1, -2) * scale
    if visibility.softcap is not None:
        scores = visibility.softcap * torch.tanh(scores / visibility.softcap)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return {"out": out.detach(), "row_max": scores.amax(dim=-1), "log_sum_exp": torch.logsumexp(scores, dim=-1),
            "dq": q.grad, "dk": k.grad, "dv": v.grad}


def backward_into(backend, t: dict[str, Tensor], visibility: Visibility, scale: float, part: Partial,
                  initial: float = 0.0) -> dict[str, Tensor]:
    """dq, and dk, dv as added into accumulators that start at ``initial`` + noise (returned minus that start),
    fed like MQSP feeds a backend: the global row statistics and delta = rowsum(dout * out)."""
    start = {name: initial * torch.randn(t[name].shape, generator=torch.Generator().manual_seed(9)) for name in ("k", "v")}
    grad_key, grad_value = start["k"].clone(), start["v"].clone()
    delta = (t["dout"].float() * part.out).sum(dim=-1)
    dq = backend.backward(t["q"], t["k"], t["v"], t["dout"], part.row_max, part.row_log_sum, delta, visibility, scale,
                          grad_key, grad_value)
    return {"dq": dq, "dk": grad_key - start["k"], "dv": grad_value - start["v"]}


def assert_row_stats_close(part: Partial, expected: dict[str, Tensor], tolerance: float) -> None:
    no_key = torch.isneginf(expected["row_max"])
    assert torch.equal(torch.isneginf(part.row_max), no_key), "rows without a visible key must have row_max = -inf"
    assert torch.all(part.row_log_sum[no_key] == 0) and torch.count_nonzero(part.out[no_key]) == 0
    seen = ~no_key
    for actual, wanted in ((part.row_max, expected["row_max"]), (part.row_max + part.row_log_sum, expected["log_sum_exp"])):
        error = (actual[seen].double() - wanted[seen]).abs().max().item()
        assert error <= tolerance * max(1.0, wanted[seen].abs().max().item()), f"row statistics off by {error}"


CASES = [
    Case(),
    Case(window=(None, 0), positions="zigzag", segments=2, padding="empty_batch", head_dim=64),
    Case(window=(7, 0), segments=3, rows=51, padding="random", documents=True, kv_heads=1, head_dim=48),
    Case(window=(5, 5), positions="scattered", segments=2, softcap=3.0, heads=2),
    Case(window=(None, 0), positions="scattered", rows=97, keys=131, padding="random", heads=2, kv_heads=1, batch=1),
    Case(documents=True, softcap=2.0, padding="random", head_dim=128, rows=20, keys=40, heads=2, batch=1),
    Case(torch.float16, window=(None, 0), positions="zigzag", segments=2, padding="empty_batch", head_dim=64),
    Case(torch.float16, window=(9, 0), segments=3, rows=48, documents=True, softcap=3.0),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_forward_and_gradients_match_float64_and_the_reference_backend(case: Case) -> None:
    t, visibility = make_inputs(case)
    scale = case.head_dim**-0.5
    tolerance = TOLERANCE[case.dtype]
    expected = float64_expected(t, visibility, scale)

    part = TRITON.forward(t["q"], t["k"], t["v"], visibility, scale)
    assert all(x.dtype == torch.float32 and not x.isnan().any() for x in part)
    assert part.out.shape == t["q"].shape and part.row_max.shape == part.row_log_sum.shape == t["q"].shape[:3]
    assert relative_error(part.out, expected["out"]) <= tolerance
    assert_row_stats_close(part, expected, tolerance)
    reference = REFERENCE.forward(t["q"], t["k"], t["v"], visibility, scale)
    assert relative_error(part.out, reference.out) <= tolerance

    grads = backward_into(TRITON, t, visibility, scale, part, initial=1.0)
    reference_grads = backward_into(REFERENCE, t, visibility, scale, reference)
    for name, grad in grads.items():
        assert grad.dtype == torch.float32 and torch.isfinite(grad).all(), name
        assert relative_error(grad, expected[name]) <= tolerance, f"{name} vs float64"
        assert relative_error(grad, reference_grads[name]) <= tolerance, f"{name} vs reference backend"
    assert torch.count_nonzero(grads["dq"][torch.isneginf(expected["row_max"])]) == 0


def test_partials_over_split_keys_merge_to_full_attention() -> None:
    """MQSP's contract: partials over disjoint key sets merge to attention over all keys, and each part's
    backward, fed the *global* row statistics, adds its exact share into slices of one accumulator."""
    case = Case(window=(12, 0), positions="zigzag", segments=2, padding="empty_batch", documents=True)
    t, visibility = make_inputs(case, seed=1)
    scale = 0.3
    expected = float64_expected(t, visibility, scale)
    halves = [slice(0, 35), slice(35, 70)]  # the two runs of keys, as if held by two ranks
    blocks = [visibility.block(slice(None), keys) for keys in halves]
    parts = [TRITON.forward(t["q"], t["k"][:, :, keys], t["v"][:, :, keys], block, scale) for keys, block in zip(halves, blocks)]
    merged = merge(*(torch.stack(pieces) for pieces in zip(*parts)))
    assert relative_error(merged.out, expected["out"]) <= 1e-5
    assert_row_stats_close(merged, expected, 1e-5)

    delta = (t["dout"].float() * merged.out).sum(dim=-1)
    dq = torch.zeros(t["q"].shape)
    grad_key, grad_value = torch.zeros(t["k"].shape), torch.zeros(t["v"].shape)
    for keys, block in zip(halves, blocks):
        dq += TRITON.backward(t["q"], t["k"][:, :, keys], t["v"][:, :, keys], t["dout"], merged.row_max, merged.row_log_sum,
                              delta, block, scale, grad_key[:, :, keys], grad_value[:, :, keys])
    for name, grad in {"dq": dq, "dk": grad_key, "dv": grad_value}.items():
        assert relative_error(grad, expected[name]) <= 1e-5, name


def test_rows_with_minus_inf_row_max_contribute_nothing() -> None:
    """A row whose global row_max is -inf adds nothing to dK and dV and gets dQ = 0, even where this
    rank's keys are visible to it (the caller decides, not the mask)."""
    case = Case(positions="scattered", segments=2)
    t, visibility = make_inputs(case, seed=5)
    part = TRITON.forward(t["q"], t["k"], t["v"], visibility, 0.2)
    part.row_max[:, :, ::3] = float("-inf")
    part.row_log_sum[:, :, ::3] = 0.0
    grads = backward_into(TRITON, t, visibility, 0.2, part)
    reference_grads = backward_into(REFERENCE, t, visibility, 0.2, part)
    assert torch.count_nonzero(grads["dq"][:, :, ::3]) == 0
    for name, grad in grads.items():
        assert torch.isfinite(grad).all() and relative_error(grad, reference_grads[name]) <= 1e-5, name


def read_back_dropout_masks(visibility: Visibility, batch: int, heads: int, size: int) -> dict[str, Tensor]:
    """The keep mask each kernel applied, read out of its results. With q = 0 every score is 0, so
    P = 1/N; then with D = M = N = size:
    - forward, V = identity: out[m, j] = P * keep[m, j] / (1 - p);
    - dK/dV kernel, dO = identity: dV[j, m] = P * keep[m, j] / (1 - p);
    - dQ kernel, every V row and dO row = e_0 (so dP = 1), delta = 0, K = identity:
      dQ[m, j] = scale * P * keep[m, j] / (1 - p)."""
    eye = torch.eye(size).expand(batch, heads, size, size).contiguous()
    first = torch.zeros(batch, heads, size, size)
    first[..., 0] = 1.0
    zeros = torch.zeros(batch, heads, size, size)
    row_max, row_log_sum = torch.zeros(batch, heads, size), torch.full((batch, heads, size), math.log(size))
    out = TRITON.forward(zeros, zeros, eye, visibility, 1.0).out
    grad_key, grad_value = torch.zeros_like(zeros), torch.zeros_like(zeros)
    TRITON.backward(zeros, zeros, zeros, eye, row_max, row_log_sum, torch.zeros(batch, heads, size), visibility, 1.0,
                    grad_key, grad_value)
    dq = TRITON.backward(zeros, eye, first, first, row_max, row_log_sum, torch.zeros(batch, heads, size), visibility, 1.0,
                         torch.zeros_like(zeros), torch.zeros_like(zeros))
    kept = 1.0 / (size * (1.0 - visibility.dropout_p))
    for value in (out, grad_value, dq):
        assert torch.allclose(value[value != 0], torch.tensor(kept)), "kept probabilities must be scaled by 1/(1-p)"
    return {"forward": out != 0, "backward dK/dV": grad_value.transpose(-1, -2) != 0, "backward dQ": dq != 0}


@pytest.mark.parametrize(
    ("dropout_p", "seed", "position_offset"),
    [(0.1, 1234, 0), (0.7, 2**31 - 5, 0), (0.3, 2**40 + 7, 2**33 + 11)],  # threshold above 2**31; seed and positions past 32 bits
)
def test_dropout_mask_is_bit_identical_to_keep_mask_in_every_kernel(dropout_p: float, seed: int, position_offset: int) -> None:
    batch, heads, size = 2, 2, 64
    g = torch.Generator().manual_seed(3)
    rows = torch.randperm(1000, generator=g)[:size].sort().values + position_offset
    keys = torch.randperm(1000, generator=g)[:size].sort().values + position_offset
    seed_tensor = torch.tensor([seed], dtype=torch.int64)
    visibility = Visibility.for_positions(rows, keys, dropout_p=dropout_p, dropout_seed=seed_tensor)
    expected = keep_mask(seed_tensor, heads, batch, rows, keys, dropout_p)
    for kernel, keep in read_back_dropout_masks(visibility, batch, heads, size).items():
        assert torch.equal(keep, expected), f"{kernel} drew a different mask"
    # 8192 draws: the keep rate is within 4 standard deviations of 1 - p.
    rate = expected.float().mean().item()
    assert abs(rate - (1 - dropout_p)) <= 4 * math.sqrt(dropout_p * (1 - dropout_p) / expected.numel())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_dropout_forward_and_gradients_match_float64_with_the_same_mask(dtype: torch.dtype) -> None:
    case = Case(dtype, window=(20, 0), positions="zigzag", segments=2, padding="random", documents=True, softcap=4.0)
    seed = torch.tensor([99], dtype=torch.int64)
    t, visibility = make_inputs(case, seed=2, dropout_p=0.25, dropout_seed=seed)
    scale = case.head_dim**-0.5
    keep = keep_mask(seed, case.heads, case.batch, visibility.query_positions, visibility.key_positions, 0.25)
    expected = float64_expected(t, visibility, scale, keep=keep)
    part = TRITON.forward(t["q"], t["k"], t["v"], visibility, scale)
    grads = backward_into(TRITON, t, visibility, scale, part)
    tolerance = TOLERANCE[dtype]
    assert relative_error(part.out, expected["out"]) <= tolerance
    assert_row_stats_close(part, expected, tolerance)
    for name, grad in grads.items():
        assert relative_error(grad, expected[name]) <= tolerance, name


def test_backward_is_bitwise_deterministic() -> None:
    case = Case(window=(None, 0), positions="zigzag", segments=2, padding="random", kv_heads=1)
    t, visibility = make_inputs(case, seed=4, dropout_p=0.2, dropout_seed=torch.tensor([5]))
    part = TRITON.forward(t["q"], t["k"], t["v"], visibility, 0.2)
    first = backward_into(TRITON, t, visibility, 0.2, part, initial=1.0)
    second = backward_into(TRITON, t, visibility, 0.2, part, initial=1.0)
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_no_tensor_value_is_read_on_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """A call never waits for the device: forward and backward with every mask read no tensor value
    on the host (the dropout seed included, which the kernels load themselves)."""
    t, visibility = make_inputs(Case(window=(6, 0), segments=2, padding="random", documents=True, softcap=3.0),
                                dropout_p=0.1, dropout_seed=torch.tensor([3]))
    delta = torch.zeros(t["q"].shape[:3])
    grad_key, grad_value = torch.zeros(t["k"].shape), torch.zeros(t["v"].shape)
    TRITON.forward(t["q"], t["k"], t["v"], visibility, 0.2)  # the first call may set things up

    def host_read(*args: object, **kwargs: object) -> None:
        raise AssertionError("a tensor value was read on the host")

    for name in ("item", "tolist", "__bool__", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, host_read)
    part = TRITON.forward(t["q"], t["k"], t["v"], visibility, 0.2)
    TRITON.backward(t["q"], t["k"], t["v"], t["dout"], part.row_max, part.row_log_sum, delta, visibility, 0.2,
                    grad_key, grad_value)


def test_fake_ops_give_shapes_without_running_kernels() -> None:
    """Under FakeTensorMode the backend returns fake tensors of the right shapes and dtypes: a
    paper-scale micro-step (4k gathered rows of 8 ranks against 64k local keys) costs nothing to trace."""
    batch, heads, kv_heads, rows, keys, head_dim = 1, 16, 4, 4096, 65536, 128
    with FakeTensorMode():
        q = torch.empty(batch, heads, rows, head_dim, dtype=torch.bfloat16)
        k = torch.empty(batch, kv_heads, keys, head_dim, dtype=torch.bfloat16)
        v = torch.empty_like(k)
        visibility = Visibility(
            torch.arange(rows), torch.arange(keys), (), (), query_segments=8, window=Window(4096, 0),
            key_padding_mask=torch.ones(batch, keys, dtype=torch.bool), query_documents=torch.zeros(batch, rows),
            key_documents=torch.zeros(batch, keys), softcap=30.0, dropout_p=0.1, dropout_seed=torch.zeros(1, dtype=torch.int64),
        )
        out, row_max, row_log_sum = TRITON.forward(q, k, v, visibility, 0.1)
        grad_key, grad_value = torch.zeros(k.shape), torch.zeros(v.shape)
        dq = TRITON.backward(q, k, v, q, row_max, row_log_sum, row_max, visibility, 0.1, grad_key, grad_value)
    for tensor, shape in [(out, q.shape), (row_max, q.shape[:3]), (row_log_sum, q.shape[:3]), (dq, q.shape)]:
        assert isinstance(tensor, FakeTensor)
        assert tensor.shape == shape and tensor.dtype == torch.float32


def test_custom_ops_pass_opcheck() -> None:
    """torch.library's own checks (schema, mutation of the accumulators, fake implementation against
    the real kernels, dispatch under tracing), with every optional input present."""
    case = Case(window=(5, 0), rows=24, keys=30, heads=2, kv_heads=1, segments=2, padding="random", documents=True,
                softcap=3.0, batch=1)
    t, visibility = make_inputs(case, dropout_p=0.1, dropout_seed=torch.tensor([7]))
    visibility_args = (visibility.query_positions, visibility.key_positions, visibility.key_padding_mask,
                       visibility.query_documents, visibility.key_documents, visibility.dropout_seed, 2, 5, 0, 3.0, 0.1)
    out, row_max, row_log_sum = torch.empty(t["q"].shape), torch.empty(t["q"].shape[:3]), torch.empty(t["q"].shape[:3])
    rows = (t["q"].unsqueeze(0), t["k"], t["v"])
    forward_args = (*rows, out.unsqueeze(0), row_max.unsqueeze(0), row_log_sum.unsqueeze(0), *visibility_args, 0.2)
    torch.library.opcheck(ops.partial_attention_forward, forward_args)
    delta = (t["dout"] * out).sum(dim=-1)
    backward_args = (*rows, t["dout"].unsqueeze(0), *(x.unsqueeze(0) for x in (row_max, row_log_sum, delta)),
                     torch.empty(1, *t["q"].shape), torch.zeros(t["k"].shape), torch.zeros(t["v"].shape), *visibility_args, 0.2)
    torch.library.opcheck(ops.partial_attention_backward, backward_args)
    parts = torch.randn(3, *t["q"].shape[:3], t["q"].size(-1) + 2)
    torch.library.opcheck(ops.merge_partials, (parts, torch.empty(t["q"].shape), torch.empty(t["q"].shape[:3]),
                                               torch.empty(t["q"].shape[:3])))


def segments(x: Tensor, count: int) -> Tensor:
    """[B, H, n*c, X] -> [n, B, H, c, X]."""
    return x.unflatten(2, (count, x.size(2) // count)).movedim(2, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rows_read_and_written_where_they_travel_match_contiguous_rows(dtype: torch.dtype) -> None:
    """What MQSP hands the kernels: the rows of 3 ranks where they arrived ([n, B, H, c, ...], queries, output
    gradients and float32 statistics interleaved in one buffer), partials written into the buffer that returns them
    ([n, B, H, c, D + 2]) and dQ in the layout it travels in ([n, B, c, H, D]): the same numbers as contiguous rows.
    Segments of 17 rows: the kernels' 32-row blocks straddle them."""
    case = Case(dtype, window=(None, 0), positions="zigzag", segments=3, rows=51, padding="random", kv_heads=1)
    t, visibility = make_inputs(case, seed=3)
    n, (b, h, m, d) = 3, t["q"].shape
    c, scale = m // n, 0.2
    expected = TRITON.forward(t["q"], t["k"], t["v"], visibility, scale)
    packed = torch.full((n, b, h, c, d + 2), float("nan"))
    arrived = torch.full((n, b, h, c, backward_row_width(d, dtype)), float("nan"), dtype=dtype)  # queries | dout | stats
    arrived[..., :d], arrived[..., d : 2 * d] = segments(t["q"], n), segments(t["dout"], n)
    TRITON.forward(arrived[..., :d], t["k"], t["v"], visibility, scale,
                   into=Partial(packed[..., :d], packed[..., d], packed[..., d + 1]))
    for written, wanted in zip((packed[..., :d], packed[..., d], packed[..., d + 1]), expected):
        assert torch.equal(written, segments(wanted.unsqueeze(-1), n).squeeze(-1) if wanted.dim() == 3 else segments(wanted, n))

    delta = (t["dout"].float() * expected.out).sum(dim=-1)
    stats = arrived[..., 2 * d :].view(torch.float32)
    for i, statistic in enumerate((expected.row_max, expected.row_log_sum, delta)):
        stats[..., i] = segments(statistic.unsqueeze(-1), n).squeeze(-1)
    grads = {name: torch.zeros(t[name].shape) for name in ("k", "v")}
    wanted_grads = {name: torch.zeros(t[name].shape) for name in ("k", "v")}
    wanted_dq = TRITON.backward(t["q"], t["k"], t["v"], t["dout"], expected.row_max, expected.row_log_sum, delta, visibility,
                                scale, wanted_grads["k"], wanted_grads["v"])
    travelling = torch.full((n, b, c, h, d), float("nan"))
    TRITON.backward(arrived[..., :d], t["k"], t["v"], arrived[..., d : 2 * d], stats[..., 0], stats[..., 1], stats[..., 2],
                    visibility, scale, grads["k"], grads["v"], grad_query=travelling.transpose(2, 3))
    assert torch.equal(travelling.transpose(2, 3), segments(wanted_dq, n))
    for name in grads:
        assert torch.equal(grads[name], wanted_grads[name]), name


def test_the_merge_kernel_matches_the_torch_merge() -> None:
    """The merge kernel against :func:`lightning_mqsp.merge.merge`: three partials of 40 rows (blocks of 32 straddle
    the end), with rows that one, two or no partial saw, written into a sequence-major float16 output (the
    interpreter truncates to bfloat16, where a GPU rounds to nearest: float16 shows the rounding)."""
    g = torch.Generator().manual_seed(5)
    n, b, h, c, d = 3, 2, 2, 40, 32
    parts = torch.randn(n, b, h, c, d + 2, generator=g)
    parts[..., d] *= 20  # row_max: scores of any size
    parts[..., d + 1] = parts[..., d + 1].abs()  # row_log_sum >= 0
    unseen = torch.rand(n, b, h, c, generator=g) < 0.4
    unseen[:, :, :, :3] = True  # rows no partial saw
    parts[..., :d][unseen] = 0.0
    parts[..., d][unseen], parts[..., d + 1][unseen] = float("-inf"), 0.0
    expected = merge(parts[..., :d], parts[..., d], parts[..., d + 1])
    out = torch.full((b, c, h, d), float("nan"), dtype=torch.float16).transpose(1, 2)
    row_max, row_log_sum = torch.full((2, b, h, c), float("nan")).unbind(0)
    TRITON.merge(parts, out, row_max, row_log_sum)
    assert relative_error(out.float(), expected.out) <= 2**-11  # float16's rounding
    assert torch.equal(torch.isneginf(row_max), torch.isneginf(expected.row_max))
    assert torch.allclose(row_max, expected.row_max) and torch.allclose(row_log_sum, expected.row_log_sum, atol=1e-6)
    assert torch.count_nonzero(out[:, :, :3]) == 0 and torch.count_nonzero(row_log_sum[:, :, :3]) == 0
    float_out = torch.empty(b, h, c, d)
    TRITON.merge(parts, float_out, row_max, row_log_sum)
    assert relative_error(float_out, expected.out) <= 1e-6


def test_supports_says_why_it_cannot_run(monkeypatch: pytest.MonkeyPatch) -> None:
    q = torch.zeros(1, 2, 4, 32)
    visibility = Visibility.for_positions(torch.arange(4), torch.arange(4), window=Window(2, 2), softcap=1.0)
    assert TRITON.supports(q, visibility) is None
    assert resolve_backend("triton", q, visibility) is TRITON
    assert "float64" in TRITON.supports(q.double(), visibility)
    assert "256" in TRITON.supports(torch.zeros(1, 2, 4, 512), visibility)
    assert "dropout_p" in TRITON.supports(q, Visibility.for_positions(torch.arange(4), torch.arange(4), dropout_p=1.0))
    with monkeypatch.context() as patch:  # triton imported without the interpreter: its tl.max is no InterpretedFunction
        patch.setattr(triton.language.standard, "max", object())
        assert TRITON.supports(q, visibility) == "TRITON_INTERPRET=1 was set after triton was imported: set it before Python starts"
        patch.delenv("TRITON_INTERPRET")
        assert TRITON.supports(q, visibility) == "set TRITON_INTERPRET=1 to run the Triton kernels on CPU through the interpreter"
    with monkeypatch.context() as patch:  # triton not imported yet: the environment decides
        patch.delitem(sys.modules, "triton")
        patch.delenv("TRITON_INTERPRET")
        assert TRITON.supports(q, visibility) == "set TRITON_INTERPRET=1 to run the Triton kernels on CPU through the interpreter"
    monkeypatch.setitem(sys.modules, "triton", None)  # what find_spec reports for a module that is not there
    assert TRITON.supports(q, visibility) == "triton is not installed"


def test_mqsp_attention_on_two_gloo_ranks_matches_single_process_float64(tmp_path: Path) -> None:
    """The whole MQSP path with backend="triton": 2 gloo ranks (interpreted kernels) against
    single-process float64 attention, forward and dQ, dK, dV."""
    worker = Path(__file__).with_name("_triton_mqsp_worker.py")
    result = subprocess.run([sys.executable, str(worker), str(tmp_path)], env={**os.environ, "TRITON_INTERPRET": "1"},
                            capture_output=True, text=True, timeout=200)
    assert result.returncode == 0, result.stdout + result.stderr
    for rank in range(2):
        errors = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert set(errors) == {"causal-zigzag-padding-gqa", "window-documents-softcap-zigzag", "dropout-contiguous"}
        for run, by_tensor in errors.items():
            assert set(by_tensor) == {"out", "dq", "dk", "dv"}, run
            for name, error in by_tensor.items():
                assert error <= 1e-5, f"rank {rank}, {run}: {name} relative error {error}"


def test_gpu_check_runs_end_to_end_on_tiny_shapes(tmp_path: Path) -> None:
    """benchmarks/gpu_check.py is run on a GPU machine with little time to spare: its CPU-side code
    (inputs, references, MQSP positions, timing harness, report) runs here, on tiny shapes."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    gpu_check.main(["--dry-run", "--out", str(tmp_path / "gpu_check.json")])
    written = json.loads((tmp_path / "gpu_check.json").read_text())
    assert not written["errors"], written["errors"]
    assert written["correctness"] and all(row["passed"] for row in written["correctness"])
    assert {"kernels", "mqsp", "one_rank_of_p"} <= set(written["timings"])
    assert written["offload"]["differences"] and max(written["offload"]["differences"].values()) <= 1e-2
    loss_kernels = written["loss_kernels"]  # float16 through the interpreter: the two kernels round differently
    assert max(loss_kernels["loss_difference"], loss_kernels["dhidden_error"], loss_kernels["dweight_error"]) <= 1e-2, loss_kernels


def test_two_gloo_ranks_launch_few_kernels_per_micro_step() -> None:
    """The Triton path's launches per micro-step at P = 2 (``benchmarks/launches.py``: aten ops that launch, kernels,
    collectives), causal zigzag and unmasked: at most 8 a forward and 8 a backward step (31.5 and 23.5 before the
    kernels read and wrote the buffers that travel, and the merge became one kernel)."""
    sys.path.append(str(REPO))
    from benchmarks.launches import Case as LaunchCase
    from benchmarks.launches import run

    cases = [LaunchCase("triton", causal, heads=2, kv_heads=1, head_dim=16, rows_per_step=8, steps=2) for causal in (True, False)]
    for counted in run(cases):
        assert counted["forward_launches"] <= 8 and counted["backward_launches"] <= 8, counted
        assert counted["forward_by_op"].get("partial_attention_forward") == 1, counted
        assert counted["backward_by_op"].get("partial_attention_backward") == 2, counted
