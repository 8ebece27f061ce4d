"""The local partial-attention backends against float64 SDPA, on one rank's column block.

Keys are split in two blocks as if they lived on two ranks: each block's partial (out, lse)
is merged by the distributed-softmax rule, and each block's backward, fed the *global* lse
and delta, must give its share of the exact gradients.
"""

from __future__ import annotations

import pytest
import torch

from lightning_mqsp.attention import _merge_partials
from lightning_mqsp.backends import AttentionMask, get_backend
from reference import relative_error, sdpa_reference

CPU_BACKENDS = ["reference", "cpu_flash"]


def _positions(kind: str, n: int) -> torch.Tensor:
    if kind == "contiguous":
        return torch.arange(n)
    # zigzag-like: two runs far apart, and the query rows of several ranks interleaved
    return torch.cat([torch.arange(n // 2), torch.arange(3 * n, 3 * n + n - n // 2)])


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("positions", ["contiguous", "runs"])
@pytest.mark.parametrize("padding", [False, True])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_split_keys_merge_to_exact_attention(backend_name: str, causal: bool, positions: str, padding: bool, kv_heads: int) -> None:
    g = torch.Generator().manual_seed(0)
    b, h, m, n, d = 2, 4, 24, 40, 16
    q = torch.randn(b, h, m, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, kv_heads, n, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, kv_heads, n, d, generator=g, dtype=torch.float64)
    dout = torch.randn(b, h, m, d, generator=g, dtype=torch.float64)
    qpos = _positions(positions, m) + 7  # queries start inside the key range
    kpos = _positions(positions, n)
    kpm = torch.rand(b, n, generator=g) > 0.4 if padding else None
    if kpm is not None:
        kpm[1, :5] = False  # with causal, early rows of batch 1 may see no key at all

    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    expected = sdpa_reference(qr, kr, vr, causal=causal, key_padding_mask=kpm, query_positions=qpos, key_positions=kpos)
    expected.backward(dout)

    backend = get_backend(backend_name)
    blocks = [slice(0, 17), slice(17, n)]
    masks = [
        AttentionMask(qpos, kpos[blk], causal, None if kpm is None else kpm[:, blk]) for blk in blocks
    ]
    scale = d**-0.5
    partials = [backend.forward(q.float(), k[:, :, blk].float(), v[:, :, blk].float(), mask, scale) for blk, mask in zip(blocks, masks)]
    for part_out, part_lse in partials:
        assert part_out.dtype == part_lse.dtype == torch.float32
        assert not torch.isnan(part_out).any() and not torch.isnan(part_lse).any()
    packed = torch.stack([torch.cat([o, lse.unsqueeze(-1)], dim=-1) for o, lse in partials])
    out, lse = _merge_partials(packed)
    assert relative_error(out, expected) <= 1e-5

    delta = (dout.float() * out).sum(-1)
    dq = torch.zeros_like(q, dtype=torch.float32)
    dk, dv = [], []
    for blk, mask in zip(blocks, masks):
        part_dq, part_dk, part_dv = backend.backward(q.float(), k[:, :, blk].float(), v[:, :, blk].float(), dout.float(), lse, delta, mask, scale)
        dq += part_dq
        dk.append(part_dk)
        dv.append(part_dv)
    assert relative_error(dq, qr.grad) <= 1e-5
    assert relative_error(torch.cat(dk, dim=2), kr.grad) <= 1e-5
    assert relative_error(torch.cat(dv, dim=2), vr.grad) <= 1e-5


def test_cpu_flash_refuses_what_it_cannot_do() -> None:
    backend = get_backend("cpu_flash")
    q = torch.zeros(1, 1, 4, 8)
    mask = AttentionMask(torch.arange(4), torch.arange(4), dropout_p=0.1)
    assert "dropout" in backend.supports(q, mask)
    assert backend.supports(q, AttentionMask(torch.arange(4), torch.arange(4))) is None
