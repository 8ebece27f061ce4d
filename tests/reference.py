"""Independent references the tests compare against: single-process attention in float64."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def relative_error(actual: Tensor, expected: Tensor) -> float:
    """max |actual - expected| / max |expected| (0 when both are zero)."""
    scale = expected.double().abs().max().item()
    diff = (actual.double() - expected.double()).abs().max().item()
    return diff / scale if scale > 0 else diff


def allowed_pairs(
    query_positions: Tensor, key_positions: Tensor, causal: bool, key_padding_mask: Tensor | None
) -> Tensor | None:
    """Bool [B or 1, 1, M, N] of the pairs that may attend (None: all)."""
    allowed = None
    if causal:
        allowed = (key_positions.view(1, -1) <= query_positions.view(-1, 1))[None, None]
    if key_padding_mask is not None:
        padding = key_padding_mask[:, None, None, :]
        allowed = padding if allowed is None else allowed & padding
    return allowed


def sdpa_reference(
    q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, key_padding_mask: Tensor | None = None,
    scale: float | None = None, query_positions: Tensor | None = None, key_positions: Tensor | None = None,
) -> Tensor:
    """``scaled_dot_product_attention`` in float64 over the full sequence (GQA by repeating K/V)."""
    q, k, v = q.double(), k.double(), v.double()
    groups = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    qp = torch.arange(q.size(2)) if query_positions is None else query_positions
    kp = torch.arange(k.size(2)) if key_positions is None else key_positions
    mask = allowed_pairs(qp, kp, causal, key_padding_mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def dropout_reference(q: Tensor, k: Tensor, v: Tensor, keep: Tensor, dropout_p: float, causal: bool = False) -> Tensor:
    """Dense float64 attention with a given [B, H, L, L] keep mask applied to the probabilities."""
    q, k, v = q.double(), k.double(), v.double()
    scores = q @ k.transpose(-1, -2) / q.size(-1) ** 0.5
    if causal:
        n = q.size(2)
        scores = scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
    probs = torch.softmax(scores, dim=-1) * keep / (1 - dropout_p)
    return probs @ v
