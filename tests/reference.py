"""Independent references the tests compare against: single-process attention in float64.

Nothing here imports lightning_mqsp: the visible pairs, the soft-capping and the dropout keep mask
are written out again from their definitions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def relative_error(actual: Tensor, expected: Tensor, floor: float = 0.0) -> float:
    """max |actual - expected| / max(max |expected|, floor): ``floor`` keeps tensors that are zero up to
    rounding from dividing by nearly nothing (the max difference itself when both are zero)."""
    scale = max(expected.double().abs().max().item(), floor)
    diff = (actual.double() - expected.double()).abs().max().item()
    return diff / scale if scale > 0 else diff


def allowed_pairs(
    query_positions: Tensor, key_positions: Tensor, *, causal: bool = False, window: tuple[int | None, int | None] | None = None,
    key_padding_mask: Tensor | None = None, query_documents: Tensor | None = None, key_documents: Tensor | None = None,
) -> Tensor:
    """Bool [B or 1, 1, M, N]: the pairs that may attend. ``window`` = (left, right): q - left <= k <= q + right."""
    q = query_positions.view(-1, 1)
    k = key_positions.view(1, -1)
    allowed = torch.ones(q.size(0), k.size(1), dtype=torch.bool)
    if causal:
        allowed &= k <= q
    if window is not None:
        left, right = window
        if left is not None:
            allowed &= k >= q - left
        if right is not None:
            allowed &= k <= q + right
    allowed = allowed[None, None]
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, None, :]
    if key_documents is not None:
        assert query_documents is not None
        allowed = allowed & (query_documents[:, None, :, None] == key_documents[:, None, None, :])
    return allowed


def dense_attention(
    q: Tensor, k: Tensor, v: Tensor, allowed: Tensor | None = None, *, scale: float | None = None,
    softcap: float | None = None, keep: Tensor | None = None, dropout_p: float = 0.0,
) -> Tensor:
    """Attention in float64 (differentiable), GQA by repeating K/V heads; rows with no visible key give 0.

    Plain: ``scaled_dot_product_attention``. With ``softcap`` or a [B, H, M, N] dropout ``keep``
    mask: an explicit softmax of the (capped) scores, then probabilities * keep / (1 - dropout_p)."""
    q, k, v = q.double(), k.double(), v.double()
    groups = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scale = q.size(-1) ** -0.5 if scale is None else scale
    if softcap is None and keep is None:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)
        return out if allowed is None else out.masked_fill(~allowed.any(dim=-1, keepdim=True), 0.0)
    scores = q @ k.transpose(-1, -2) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    if keep is not None:
        probs = probs * keep / (1.0 - dropout_p)
    return probs @ v


def sdpa_reference(
    q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, key_padding_mask: Tensor | None = None,
    scale: float | None = None, query_positions: Tensor | None = None, key_positions: Tensor | None = None,
    window: tuple[int | None, int | None] | None = None, documents: Tensor | None = None, softcap: float | None = None,
) -> Tensor:
    """Full-sequence float64 attention; ``documents`` [B, L] are the ids of both queries and keys."""
    qp = torch.arange(q.size(2)) if query_positions is None else query_positions
    kp = torch.arange(k.size(2)) if key_positions is None else key_positions
    allowed = allowed_pairs(qp, kp, causal=causal, window=window, key_padding_mask=key_padding_mask,
                            query_documents=documents, key_documents=documents)
    return dense_attention(q, k, v, allowed, scale=scale, softcap=softcap)


def dropout_reference(q: Tensor, k: Tensor, v: Tensor, keep: Tensor, dropout_p: float, causal: bool = False) -> Tensor:
    """Dense float64 attention with a given [B, H, L, L] keep mask applied to the probabilities."""
    positions = torch.arange(q.size(2))
    return dense_attention(q, k, v, allowed_pairs(positions, positions, causal=causal), keep=keep, dropout_p=dropout_p)
