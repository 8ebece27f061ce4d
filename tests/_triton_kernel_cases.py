"""The Triton micro-Q kernels (``backend="triton"``) through the Triton interpreter on CPU.

Forward outputs, row log-sum-exps and dQ, dK, dV are compared with float64 dense attention
(torch's SDPA) and with the reference backend; the dropout mask is read back out of each
kernel and compared bit for bit with ``lightning_mqsp.dropout.keep_mask``.

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
from _triton_reference import allowed_pairs, dense_attention_float64, dense_lse_float64, relative_error
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from triton.runtime.interpreter import InterpretedFunction

from lightning_mqsp.backends import AttentionMask, get_backend, resolve_backend
from lightning_mqsp.backends.reference import ReferenceBackend
from lightning_mqsp.dropout import keep_mask
from lightning_mqsp.kernels import ops, tuning

if not tuning.INTERPRET or not isinstance(triton.language.standard.max, InterpretedFunction):
    raise RuntimeError(
        "triton or lightning_mqsp.kernels was imported before TRITON_INTERPRET=1 was set: the kernels would be "
        "compiled for a GPU and cannot run on CPU. Run with TRITON_INTERPRET=1 in the environment."
    )

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3}
TRITON = get_backend("triton")
REFERENCE = ReferenceBackend()


@dataclass(frozen=True)
class Case:
    dtype: torch.dtype
    head_dim: int
    rows: int  # M, gathered query rows
    keys: int  # N, local keys
    heads: int
    kv_heads: int
    causal: bool
    positions: str  # contiguous | zigzag (two chunks each, some rows before every key) | scattered (random, unsorted)
    padding: str  # none | random | empty_batch (batch 1 has no key at all)
    batch: int = 2

    def __str__(self) -> str:
        return "-".join([
            str(self.dtype).split(".")[-1], f"D{self.head_dim}", f"M{self.rows}", f"N{self.keys}",
            f"H{self.heads}/{self.kv_heads}", "causal" if self.causal else "full", self.positions, self.padding,
        ])


def make_positions(case: Case, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    m, n = case.rows, case.keys
    if case.positions == "contiguous":
        return torch.arange(n - m, n), torch.arange(n)  # the last rows of the sequence: a full causal diagonal
    if case.positions == "zigzag":
        # Like one rank's two zigzag chunks of keys against rows gathered from elsewhere: rows before the
        # first key (no visible key under causal), diagonals inside both chunks, rows after a whole chunk.
        rows = torch.cat([torch.arange(20, 20 + m // 2), torch.arange(180, 180 + m - m // 2)])
        keys = torch.cat([torch.arange(30, 30 + n // 2), torch.arange(190, 190 + n - n // 2)])
        return rows, keys
    return torch.randperm(4 * (m + n), generator=generator)[:m], torch.randperm(4 * (m + n), generator=generator)[:n]


def make_padding(case: Case, generator: torch.Generator) -> Tensor | None:
    if case.padding == "none":
        return None
    padding = torch.rand(case.batch, case.keys, generator=generator) > 0.3
    if case.padding == "empty_batch":
        padding[1] = False
    return padding


def make_inputs(case: Case, seed: int = 0) -> tuple[dict[str, Tensor], AttentionMask]:
    g = torch.Generator().manual_seed(seed)
    b, h, hk, m, n, d = case.batch, case.heads, case.kv_heads, case.rows, case.keys, case.head_dim
    tensors = {
        "q": torch.randn(b, h, m, d, generator=g).to(case.dtype),
        "k": torch.randn(b, hk, n, d, generator=g).to(case.dtype),
        "v": torch.randn(b, hk, n, d, generator=g).to(case.dtype),
        "dout": torch.randn(b, h, m, d, generator=g).to(case.dtype),
    }
    rows, keys = make_positions(case, g)
    return tensors, AttentionMask(rows, keys, case.causal, make_padding(case, g))


def float64_expected(t: dict[str, Tensor], mask: AttentionMask, scale: float) -> dict[str, Tensor]:
    """Output, lse and gradients of float64 SDPA on the same (already rounded) inputs."""
    q, k, v = (t[name].double().requires_grad_() for name in "qkv")
    allowed = allowed_pairs(mask.query_positions, mask.key_positions, mask.causal, mask.key_padding_mask, q.size(0))
    out = dense_attention_float64(q, k, v, allowed, scale)
    out.backward(t["dout"].double())
    lse = dense_lse_float64(t["q"], t["k"], allowed, scale)
    return {"out": out.detach(), "lse": lse, "dq": q.grad, "dk": k.grad, "dv": v.grad}


def kernel_backward(backend, t: dict[str, Tensor], mask: AttentionMask, scale: float, out: Tensor, lse: Tensor) -> dict[str, Tensor]:
    """dq, dk, dv from a backend, fed like MQSP feeds it: the (here single-rank, so global) lse and
    delta = rowsum(dout * out)."""
    delta = (t["dout"].float() * out).sum(dim=-1)
    dq, dk, dv = backend.backward(t["q"], t["k"], t["v"], t["dout"], lse, delta, mask, scale)
    return {"dq": dq, "dk": dk, "dv": dv}


def assert_lse_close(actual: Tensor, expected: Tensor, tolerance: float) -> None:
    assert torch.equal(torch.isneginf(actual), torch.isneginf(expected)), "rows without a visible key must have lse = -inf"
    finite = torch.isfinite(expected)
    assert torch.isfinite(actual[finite]).all()
    error = (actual[finite].double() - expected[finite]).abs().max().item()
    assert error <= tolerance * max(1.0, expected[finite].abs().max().item()), f"lse error {error}"


CASES = [
    Case(torch.float32, 32, 50, 70, 2, 2, causal=False, positions="contiguous", padding="none"),
    Case(torch.float32, 64, 50, 70, 4, 2, causal=True, positions="zigzag", padding="empty_batch"),
    Case(torch.float32, 64, 64, 64, 4, 1, causal=True, positions="scattered", padding="random"),
    Case(torch.float32, 128, 20, 40, 2, 2, causal=True, positions="contiguous", padding="random", batch=1),
    Case(torch.float32, 48, 20, 40, 2, 1, causal=False, positions="scattered", padding="none", batch=1),
    Case(torch.float16, 64, 50, 70, 4, 2, causal=True, positions="zigzag", padding="empty_batch"),
    Case(torch.float16, 32, 33, 97, 2, 2, causal=False, positions="scattered", padding="random"),
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_forward_and_gradients_match_float64_sdpa_and_reference_backend(case: Case) -> None:
    t, mask = make_inputs(case)
    scale = case.head_dim**-0.5
    tolerance = TOLERANCE[case.dtype]
    expected = float64_expected(t, mask, scale)

    out, lse = TRITON.forward(t["q"], t["k"], t["v"], mask, scale)
    assert out.dtype == lse.dtype == torch.float32
    assert out.shape == t["q"].shape and lse.shape == t["q"].shape[:3]
    assert not out.isnan().any() and not lse.isnan().any()
    assert relative_error(out, expected["out"]) <= tolerance
    assert_lse_close(lse, expected["lse"], tolerance)
    reference_out, reference_lse = REFERENCE.forward(t["q"], t["k"], t["v"], mask, scale)
    assert relative_error(out, reference_out) <= tolerance
    assert_lse_close(lse, reference_lse.double(), tolerance)
    no_key = torch.isneginf(expected["lse"])
    assert torch.count_nonzero(out[no_key]) == 0, "rows without a visible key must output exactly 0"

    grads = kernel_backward(TRITON, t, mask, scale, out, lse)
    reference_grads = kernel_backward(REFERENCE, t, mask, scale, reference_out, reference_lse)
    for name, grad in grads.items():
        assert grad.dtype == torch.float32 and torch.isfinite(grad).all(), name
        assert grad.shape == t[name[1:]].shape, name
        assert relative_error(grad, expected[name]) <= tolerance, f"{name} vs float64 SDPA"
        assert relative_error(grad, reference_grads[name]) <= tolerance, f"{name} vs reference backend"
    assert torch.count_nonzero(grads["dq"][no_key]) == 0


def test_partials_over_split_keys_merge_to_full_attention() -> None:
    """MQSP's contract: partial results over disjoint key sets merge (by lse) to attention over all
    keys, and each part's backward fed with the *global* lse and delta gives its exact share."""
    case = Case(torch.float32, 32, 50, 70, 4, 2, causal=True, positions="zigzag", padding="empty_batch")
    t, mask = make_inputs(case, seed=1)
    scale = 0.3
    expected = float64_expected(t, mask, scale)
    halves = [slice(0, 35), slice(35, 70)]  # the two zigzag chunks of keys, as if held by two ranks
    parts = []
    for keys in halves:
        part_mask = AttentionMask(mask.query_positions, mask.key_positions[keys], True, mask.key_padding_mask[:, keys])
        parts.append((keys, part_mask, *TRITON.forward(t["q"], t["k"][:, :, keys], t["v"][:, :, keys], part_mask, scale)))

    lse = torch.logsumexp(torch.stack([part[3] for part in parts]), dim=0)
    finite_lse = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
    out = sum(torch.exp(part_lse - finite_lse).unsqueeze(-1) * part_out for _, _, part_out, part_lse in parts)
    assert relative_error(out, expected["out"]) <= 1e-5
    assert_lse_close(lse, expected["lse"], 1e-5)

    delta = (t["dout"].float() * out).sum(dim=-1)
    dq = torch.zeros_like(expected["dq"], dtype=torch.float32)
    dk, dv = torch.zeros_like(expected["dk"], dtype=torch.float32), torch.zeros_like(expected["dv"], dtype=torch.float32)
    for keys, part_mask, _, _ in parts:
        part_dq, dk[:, :, keys], dv[:, :, keys] = TRITON.backward(
            t["q"], t["k"][:, :, keys], t["v"][:, :, keys], t["dout"], lse, delta, part_mask, scale
        )
        dq += part_dq
    for name, grad in {"dq": dq, "dk": dk, "dv": dv}.items():
        assert relative_error(grad, expected[name]) <= 1e-5, name


def test_rows_with_minus_inf_lse_contribute_nothing() -> None:
    """The backward contract: a row whose global lse is -inf adds nothing to dK and dV and gets
    dQ = 0, even where this rank's keys are visible to it (the caller decides, not the mask)."""
    t, mask = make_inputs(Case(torch.float32, 32, 50, 70, 4, 2, causal=False, positions="scattered", padding="none"), seed=5)
    out, lse = TRITON.forward(t["q"], t["k"], t["v"], mask, 0.2)
    lse[:, :, ::3] = float("-inf")
    grads = kernel_backward(TRITON, t, mask, 0.2, out, lse)
    reference_grads = kernel_backward(REFERENCE, t, mask, 0.2, out, lse)
    assert torch.count_nonzero(grads["dq"][:, :, ::3]) == 0
    for name, grad in grads.items():
        assert torch.isfinite(grad).all() and relative_error(grad, reference_grads[name]) <= 1e-5, name


def read_back_dropout_masks(mask: AttentionMask, batch: int, heads: int, size: int) -> dict[str, Tensor]:
    """The keep mask each kernel applied, read out of its results. With q = 0 every visible score is
    equal, so P = 1/N; then with D = M = N = size:
    - forward, V = identity: out[m, j] = P * keep[m, j] / (1 - p);
    - dK/dV kernel, dO = identity: dV[j, m] = P * keep[m, j] / (1 - p);
    - dQ kernel, every V row and dO row = e_0 (so dP = 1), delta = 0, K = identity:
      dQ[m, j] = scale * P * keep[m, j] / (1 - p)."""
    eye = torch.eye(size).expand(batch, heads, size, size).contiguous()
    first = torch.zeros(batch, heads, size, size)
    first[..., 0] = 1.0
    q = torch.zeros(batch, heads, size, size)
    lse = torch.full((batch, heads, size), math.log(size))
    zeros = torch.zeros(batch, heads, size)
    out, _ = TRITON.forward(q, q, eye, mask, 1.0)
    _, _, dv = TRITON.backward(q, q, q, eye, lse, zeros, mask, 1.0)
    dq, _, _ = TRITON.backward(q, eye, first, first, lse, zeros, mask, 1.0)
    kept = 1.0 / (size * (1.0 - mask.dropout_p))
    for value in (out, dv, dq):
        assert torch.allclose(value[value != 0], torch.tensor(kept)), "kept probabilities must be scaled by 1/(1-p)"
    return {"forward": out != 0, "backward dK/dV": dv.transpose(-1, -2) != 0, "backward dQ": dq != 0}


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("dropout_p", "seed", "position_offset"),
    [(0.1, 1234, 0), (0.7, 2**31 - 5, 0), (0.3, 2**40 + 7, 2**33 + 11)],  # threshold above 2**31; seed and positions past 32 bits
)
def test_dropout_mask_is_bit_identical_to_keep_mask_in_every_kernel(dropout_p: float, seed: int, position_offset: int) -> None:
    batch, heads, size = 2, 2, 64
    g = torch.Generator().manual_seed(3)
    rows = torch.randperm(1000, generator=g)[:size] + position_offset
    keys = torch.randperm(1000, generator=g)[:size] + position_offset
    mask = AttentionMask(rows, keys, dropout_p=dropout_p, dropout_seed=seed)
    expected = keep_mask(seed, heads, batch, rows, keys, dropout_p)
    for kernel, keep in read_back_dropout_masks(mask, batch, heads, size).items():
        assert torch.equal(keep, expected), f"{kernel} drew a different mask"
    # 8192 draws: the keep rate is within 4 standard deviations of 1 - p.
    rate = expected.float().mean().item()
    assert abs(rate - (1 - dropout_p)) <= 4 * math.sqrt(dropout_p * (1 - dropout_p) / expected.numel())


@pytest.mark.timeout(120)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_dropout_forward_and_gradients_match_float64_with_the_same_mask(dtype: torch.dtype) -> None:
    case = Case(dtype, 32, 50, 70, 4, 2, causal=True, positions="zigzag", padding="random")
    t, mask = make_inputs(case, seed=2)
    rows = torch.cat([torch.arange(40, 65), torch.arange(180, 205)])  # every row sees key 30 (kept unpadded)
    padding = mask.key_padding_mask.clone()
    padding[:, 0] = True
    mask = AttentionMask(rows, mask.key_positions, True, padding, dropout_p=0.25, dropout_seed=99)
    scale = case.head_dim**-0.5
    keep = keep_mask(99, case.heads, case.batch, rows, mask.key_positions, 0.25)
    allowed = allowed_pairs(rows, mask.key_positions, True, padding, case.batch)
    q, k, v = (t[name].double().requires_grad_() for name in "qkv")
    expected_out = dense_attention_float64(q, k, v, allowed, scale, keep=keep, dropout_p=0.25)
    expected_out.backward(t["dout"].double())

    out, lse = TRITON.forward(t["q"], t["k"], t["v"], mask, scale)
    grads = kernel_backward(TRITON, t, mask, scale, out, lse)
    tolerance = TOLERANCE[dtype]
    assert relative_error(out, expected_out) <= tolerance
    for name, expected in {"dq": q.grad, "dk": k.grad, "dv": v.grad}.items():
        assert relative_error(grads[name], expected) <= tolerance, name


def test_backward_is_bitwise_deterministic() -> None:
    case = Case(torch.float32, 32, 50, 70, 4, 2, causal=True, positions="zigzag", padding="random")
    t, mask = make_inputs(case, seed=4)
    mask = AttentionMask(mask.query_positions, mask.key_positions, True, mask.key_padding_mask, dropout_p=0.2, dropout_seed=5)
    out, lse = TRITON.forward(t["q"], t["k"], t["v"], mask, 0.2)
    first = kernel_backward(TRITON, t, mask, 0.2, out, lse)
    second = kernel_backward(TRITON, t, mask, 0.2, out, lse)
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_fake_ops_give_shapes_without_running_kernels() -> None:
    """Under FakeTensorMode the ops return fake tensors of the right shapes and dtypes: a
    paper-scale micro-step (4k gathered rows against 64k local keys) costs nothing to trace."""
    batch, heads, kv_heads, rows, keys, head_dim = 1, 16, 4, 4096, 65536, 128
    with FakeTensorMode():
        q = torch.empty(batch, heads, rows, head_dim, dtype=torch.bfloat16)
        k = torch.empty(batch, kv_heads, keys, head_dim, dtype=torch.bfloat16)
        v = torch.empty_like(k)
        mask = AttentionMask(torch.arange(rows), torch.arange(keys), causal=True,
                             key_padding_mask=torch.ones(batch, keys, dtype=torch.bool), dropout_p=0.1, dropout_seed=1)
        out, lse = TRITON.forward(q, k, v, mask, 0.1)
        dq, dk, dv = TRITON.backward(q, k, v, q, lse, lse, mask, 0.1)
    for tensor, shape in [(out, q.shape), (lse, q.shape[:3]), (dq, q.shape), (dk, k.shape), (dv, v.shape)]:
        assert isinstance(tensor, FakeTensor)
        assert tensor.shape == shape and tensor.dtype == torch.float32


@pytest.mark.timeout(120)
def test_custom_ops_pass_opcheck() -> None:
    """torch.library's own checks: schema, fake implementation against the real kernels, and
    dispatch under tracing."""
    t, mask = make_inputs(Case(torch.float32, 32, 20, 30, 2, 1, causal=True, positions="scattered", padding="random", batch=1))
    forward_args = (t["q"], t["k"], t["v"], mask.query_positions, mask.key_positions, mask.key_padding_mask, True, 0.2, 0.1, 7)
    torch.library.opcheck(ops.micro_q_attention_forward, forward_args)
    out, lse = ops.micro_q_attention_forward(*forward_args)
    delta = (t["dout"] * out).sum(dim=-1)
    backward_args = (t["q"], t["k"], t["v"], t["dout"], lse, delta, *forward_args[3:])
    torch.library.opcheck(ops.micro_q_attention_backward, backward_args)


def test_supports_says_why_it_cannot_run(monkeypatch: pytest.MonkeyPatch) -> None:
    q = torch.zeros(1, 2, 4, 32)
    mask = AttentionMask(torch.arange(4), torch.arange(4))
    assert TRITON.supports(q, mask) is None
    assert resolve_backend("triton", q, mask) is TRITON
    assert "float64" in TRITON.supports(q.double(), mask)
    assert "dropout_p" in TRITON.supports(q, AttentionMask(torch.arange(4), torch.arange(4), dropout_p=1.0))
    with monkeypatch.context() as patch:  # triton imported without the interpreter: its tl.max is no InterpretedFunction
        patch.setattr(triton.language.standard, "max", object())
        assert TRITON.supports(q, mask) == "TRITON_INTERPRET=1 was set after triton was imported: set it before Python starts"
        patch.delenv("TRITON_INTERPRET")
        assert TRITON.supports(q, mask) == "set TRITON_INTERPRET=1 to run the Triton kernels on CPU through the interpreter"
    with monkeypatch.context() as patch:  # triton not imported yet: the environment decides
        patch.delitem(sys.modules, "triton")
        patch.delenv("TRITON_INTERPRET")
        assert TRITON.supports(q, mask) == "set TRITON_INTERPRET=1 to run the Triton kernels on CPU through the interpreter"
    monkeypatch.setitem(sys.modules, "triton", None)  # what find_spec reports for a module that is not there
    assert TRITON.supports(q, mask) == "triton is not installed"


@pytest.mark.timeout(240)
def test_mqsp_attention_on_two_gloo_ranks_matches_single_process_sdpa(tmp_path: Path) -> None:
    """The whole MQSP path with backend="triton": 2 gloo ranks (interpreted kernels) against
    single-process float64 SDPA, forward and dQ, dK, dV; plus a dropout run against float64
    attention with the keep mask."""
    worker = Path(__file__).with_name("_triton_mqsp_worker.py")
    result = subprocess.run(
        [sys.executable, str(worker), str(tmp_path)], env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True, text=True, timeout=200,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for rank in range(2):
        errors = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert set(errors) == {"causal-zigzag-padding-gqa", "dropout-contiguous"}
        for run, by_tensor in errors.items():
            assert set(by_tensor) == {"out", "dq", "dk", "dv"}, run
            for name, error in by_tensor.items():
                assert error <= 1e-5, f"rank {rank}, {run}: {name} relative error {error}"
