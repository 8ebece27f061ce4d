"""Float64 dense attention for the Triton kernel tests: an independent reference (torch's SDPA,
or explicit softmax when a dropout keep mask must be applied)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def allowed_pairs(
    query_positions: Tensor, key_positions: Tensor, causal: bool, key_padding_mask: Tensor | None, batch_size: int
) -> Tensor:
    """Bool [B, 1, M, N]: True where the query may attend the key."""
    allowed = torch.ones(batch_size, 1, query_positions.numel(), key_positions.numel(), dtype=torch.bool)
    if causal:
        allowed = allowed & (key_positions.view(1, 1, 1, -1) <= query_positions.view(1, 1, -1, 1))
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask.view(batch_size, 1, 1, -1)
    return allowed


def dense_attention_float64(
    q: Tensor, k: Tensor, v: Tensor, allowed: Tensor, scale: float, keep: Tensor | None = None, dropout_p: float = 0.0
) -> Tensor:
    """Attention output in float64 (differentiable). GQA by repeating K/V heads.

    Without ``keep``: ``scaled_dot_product_attention`` with the bool mask (fully masked rows give 0).
    With a [B, H, M, N] bool ``keep``: softmax, then probabilities * keep / (1 - dropout_p)."""
    groups = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    if keep is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)
    assert allowed.any(dim=-1).all(), "the explicit-softmax reference needs a visible key in every row"
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf"))
    return (torch.softmax(scores, dim=-1) * keep / (1.0 - dropout_p)) @ v


def dense_lse_float64(q: Tensor, k: Tensor, allowed: Tensor, scale: float) -> Tensor:
    """Row log-sum-exp [B, H, M] of the masked scores, -inf for rows with no visible key."""
    groups = q.size(1) // k.size(1)
    scores = q.double() @ k.double().repeat_interleave(groups, dim=1).transpose(-1, -2) * scale
    return torch.logsumexp(scores.masked_fill(~allowed, float("-inf")), dim=-1)


def relative_error(actual: Tensor, expected: Tensor) -> float:
    """max |actual - expected| / max |expected|."""
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()
