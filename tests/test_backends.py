"""The local partial-attention backends against float64 attention, on one rank's column block.

Keys are split in two blocks as if they lived on two ranks: each block's partial result is
merged by the distributed-softmax rule (:func:`lightning_mqsp.merge.merge`), and each block's
backward, fed the *global* row statistics and delta, must add its share of the exact gradients
into the dK/dV accumulators.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from reference import allowed_pairs, dense_attention, relative_error

from lightning_mqsp.backends import cpu_flash, get_backend
from lightning_mqsp.merge import merge
from lightning_mqsp.visibility import Visibility, Window

CPU_BACKENDS = ["reference", "cpu_flash"]


@dataclass(frozen=True)
class Case:
    backend: str
    window: tuple[int | None, int | None] = (None, None)
    positions: str = "contiguous"  # contiguous | runs (two runs far apart, like a zigzag rank)
    padding: bool = False
    documents: bool = False
    kv_heads: int = 4
    softcap: float | None = None
    rows: int = 24
    keys: int = 40

    def __str__(self) -> str:
        parts = [self.backend, f"window{self.window}", self.positions, f"kv{self.kv_heads}"]
        parts += [name for name, on in (("padding", self.padding), ("documents", self.documents)) if on]
        return "-".join(parts + ([f"softcap{self.softcap}"] if self.softcap else []))


def _positions(kind: str, n: int) -> torch.Tensor:
    if kind == "contiguous":
        return torch.arange(n)
    return torch.cat([torch.arange(n // 2), torch.arange(3 * n, 3 * n + n - n // 2)])


WINDOWS = [(None, None), (None, 0), (5, 0), (4, 4)]  # full, causal, causal sliding, symmetric local
CASES = [
    *(Case(b, w, p) for b in CPU_BACKENDS for w in WINDOWS for p in ("contiguous", "runs")),
    *(Case(b, w, "runs", padding=True, kv_heads=2) for b in CPU_BACKENDS for w in WINDOWS),
    *(Case(b, w, "contiguous", padding=True, documents=True) for b in CPU_BACKENDS for w in WINDOWS),
    Case("cpu_flash", (None, 0), "contiguous", rows=600, keys=700, documents=True),  # several 512-tiles
    Case("cpu_flash", (100, 0), "runs", rows=600, keys=1100, padding=True),
    # Causal diagonals of several DIAGONAL-row blocks, backward calls of several KEY_BLOCK keys.
    Case("cpu_flash", (None, 0), "contiguous", rows=300, keys=1100),
    Case("cpu_flash", (None, 0), "runs", rows=300, keys=1100, padding=True, kv_heads=2),
    Case("reference", (None, 0), "runs", padding=True, softcap=2.0),
    Case("reference", (3, 3), "contiguous", documents=True, kv_heads=1, softcap=5.0),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_split_keys_merge_to_exact_attention(case: Case) -> None:
    check_split_keys_merge_to_exact_attention(case)


@pytest.mark.parametrize("case", [c for c in CASES if c.backend == "cpu_flash"], ids=str)
def test_cpu_flash_is_exact_however_finely_it_splits(monkeypatch: pytest.MonkeyPatch, case: Case) -> None:
    """Diagonal blocks of 3 rows, backward calls of 5 keys, tiles of 7: every row meets several
    pieces (copied once, then merged) and every key several backward calls."""
    monkeypatch.setattr(cpu_flash, "DIAGONAL", 3)
    monkeypatch.setattr(cpu_flash, "KEY_BLOCK", 5)
    monkeypatch.setattr(cpu_flash, "TILE", 7)
    check_split_keys_merge_to_exact_attention(case)


def test_cpu_flash_makes_few_calls() -> None:
    """Full attention is one call whatever the runs; under a causal mask the keys every row of a run
    sees are one call, shared by adjacent runs that see the same keys, and the diagonal is cut in
    blocks of DIAGONAL rows (a small causal call and the diagonal's keys before it)."""
    d = cpu_flash.DIAGONAL
    rows = torch.cat([torch.arange(4 * d, 6 * d), torch.arange(8 * d, 9 * d), torch.arange(10 * d, 11 * d)])
    keys = torch.cat([torch.arange(0, 2 * d), torch.arange(4 * d, 6 * d)])  # two runs; rows 0..2d sit on the second
    full = cpu_flash._pieces(Visibility.for_positions(rows, keys))
    assert [(p.row_start, p.row_stop, p.key_start, p.key_stop, p.kind) for p in full] == [(0, 4 * d, 0, 4 * d, "whole")]
    causal = cpu_flash._pieces(Visibility.for_positions(rows, keys, window=Window(None, 0)))
    assert [(p.row_start, p.row_stop, p.key_start, p.key_stop, p.kind) for p in causal] == [
        (0, 2 * d, 0, 2 * d, "whole"),  # the first run: the first key run whole, then its diagonal with the second
        (2 * d, 4 * d, 0, 4 * d, "whole"),  # the two later runs see every key: one call
        (0, d, 2 * d, 3 * d, "causal"),
        (d, 2 * d, 2 * d, 3 * d, "whole"),
        (d, 2 * d, 3 * d, 4 * d, "causal"),
    ]


def check_split_keys_merge_to_exact_attention(case: Case) -> None:
    g = torch.Generator().manual_seed(0)
    b, h, m, n, d = 2, 4, case.rows, case.keys, 16
    q = torch.randn(b, h, m, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, case.kv_heads, n, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, case.kv_heads, n, d, generator=g, dtype=torch.float64)
    dout = torch.randn(b, h, m, d, generator=g, dtype=torch.float64)
    qpos = _positions(case.positions, m) + 7  # queries start inside the key range
    kpos = _positions(case.positions, n)
    kpm = torch.rand(b, n, generator=g) > 0.4 if case.padding else None
    if kpm is not None:
        kpm[1, :5] = False  # with causal, early rows of batch 1 may see no key at all
    # Documents: ids that step up along the positions (packed sequences); batch 1 has longer documents.
    qdoc = kdoc = None
    if case.documents:
        bounds = torch.tensor([[0, 9, 20, 33], [0, 15, 31, 10**9]])
        qdoc = torch.stack([torch.bucketize(qpos, bounds[i], right=True) for i in range(b)])
        kdoc = torch.stack([torch.bucketize(kpos, bounds[i], right=True) for i in range(b)])

    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    allowed = allowed_pairs(qpos, kpos, window=case.window, key_padding_mask=kpm, query_documents=qdoc, key_documents=kdoc)
    expected = dense_attention(qr, kr, vr, allowed, softcap=case.softcap)
    expected.backward(dout)

    backend = get_backend(case.backend)
    full = Visibility.for_positions(qpos, kpos, window=Window(*case.window), key_padding_mask=kpm, query_documents=qdoc,
                                    key_documents=kdoc, softcap=case.softcap)
    blocks = [slice(0, 17), slice(17, n)]
    masks = [full.block(slice(0, m), blk) for blk in blocks]
    scale = d**-0.5
    partials = [backend.forward(q.float(), k[:, :, blk].float(), v[:, :, blk].float(), mask, scale) for blk, mask in zip(blocks, masks)]
    for part in partials:
        assert all(t.dtype == torch.float32 and not t.isnan().any() for t in part)
    out, row_max, row_log_sum = merge(*(torch.stack(parts) for parts in zip(*partials)))
    assert relative_error(out, expected) <= 1e-5

    delta = (dout.float() * out).sum(-1)
    dq = torch.zeros(q.shape)
    dk, dv = torch.zeros(k.shape), torch.zeros(v.shape)
    for blk, mask in zip(blocks, masks):
        dq += backend.backward(q.float(), k[:, :, blk].float(), v[:, :, blk].float(), dout.float(), row_max, row_log_sum, delta,
                               mask, scale, dk[:, :, blk], dv[:, :, blk])
    assert relative_error(dq, qr.grad) <= 1e-5
    assert relative_error(dk, kr.grad) <= 1e-5
    assert relative_error(dv, vr.grad) <= 1e-5


@pytest.mark.parametrize("magnitude", [1e20, 1e-22])
def test_cpu_flash_backward_is_exact_for_huge_and_tiny_output_gradients(magnitude: float) -> None:
    """The kernel's backward gets an output stand-in built from dO; its squared norm must not overflow or underflow."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 8, 16, generator=g) for _ in range(3))
    dout = torch.randn(1, 2, 8, 16, generator=g) * magnitude
    visibility = Visibility.for_positions(torch.arange(8), torch.arange(8))
    qr, kr, vr = (t.double().requires_grad_() for t in (q, k, v))
    dense_attention(qr, kr, vr).backward(dout.double())
    backend = get_backend("cpu_flash")
    out, row_max, row_log_sum = backend.forward(q, k, v, visibility, 16**-0.5)
    delta = (dout * out).sum(-1)
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    dq = backend.backward(q, k, v, dout, row_max, row_log_sum, delta, visibility, 16**-0.5, dk, dv)
    for actual, expected in ((dq, qr.grad), (dk, kr.grad), (dv, vr.grad)):
        assert relative_error(actual, expected) <= 1e-5


def test_cpu_flash_refuses_what_it_cannot_do() -> None:
    backend = get_backend("cpu_flash")
    q = torch.zeros(1, 1, 4, 8)
    plain = Visibility.for_positions(torch.arange(4), torch.arange(4))
    assert "dropout" in backend.supports(q, Visibility.for_positions(torch.arange(4), torch.arange(4), dropout_p=0.1))
    assert "soft-cap" in backend.supports(q, Visibility.for_positions(torch.arange(4), torch.arange(4), softcap=30.0))
    assert "float64" in backend.supports(q.double(), plain)
    assert backend.supports(q, plain) is None
