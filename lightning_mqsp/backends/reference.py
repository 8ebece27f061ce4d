"""Reference backend: plain torch ops, one explicit float32 score block per call.

Slow and memory-hungry (M x N floats per head), but simple enough to trust, and it supports
everything: any mask, dropout, GQA. The fused backends are tested against it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_mqsp.backends import AttentionMask, expand_kv_heads, reduce_kv_heads
from lightning_mqsp.dropout import keep_mask


def visible(mask: AttentionMask, batch_size: int) -> Tensor | None:
    """Bool [B or 1, 1, M, N]: True where the query row may attend the key; None when all may."""
    allowed = None
    if mask.causal:
        allowed = (mask.key_positions.view(1, 1, 1, -1) <= mask.query_positions.view(1, 1, -1, 1))
    if mask.key_padding_mask is not None:
        padding = mask.key_padding_mask.view(batch_size, 1, 1, -1)
        allowed = padding if allowed is None else allowed & padding
    return allowed


def dropout_scale(mask: AttentionMask, num_heads: int, batch_size: int) -> Tensor | None:
    """Float [B, H, M, N]: 1/(1-p) where kept, 0 where dropped; None without dropout."""
    if mask.dropout_p == 0.0:
        return None
    keep = keep_mask(mask.dropout_seed, num_heads, batch_size, mask.query_positions, mask.key_positions, mask.dropout_p)
    return keep.float() / (1.0 - mask.dropout_p)


class ReferenceBackend:
    name = "reference"

    def supports(self, q: Tensor, mask: AttentionMask) -> str | None:
        return None

    def _probabilities(self, q: Tensor, k: Tensor, mask: AttentionMask, scale: float, lse: Tensor | None) -> tuple[Tensor, Tensor]:
        """exp(scores - lse) for the given (global) lse, or for the local one when lse is None."""
        batch, heads = q.shape[:2]
        scores = torch.matmul(q.float(), expand_kv_heads(k.float(), heads).transpose(-1, -2)) * scale
        allowed = visible(mask, batch)
        if allowed is not None:
            scores = scores.masked_fill(~allowed, float("-inf"))
        if lse is None:
            lse = torch.logsumexp(scores, dim=-1)
        # A row with no visible key has lse = -inf: subtract +inf instead so it gets p = 0, not NaN.
        safe_lse = torch.where(torch.isneginf(lse), torch.full_like(lse, float("inf")), lse)
        return torch.exp(scores - safe_lse.unsqueeze(-1)), lse

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask, scale: float) -> tuple[Tensor, Tensor]:
        batch, heads = q.shape[:2]
        probs, lse = self._probabilities(q, k, mask, scale, None)
        drop = dropout_scale(mask, heads, batch)
        if drop is not None:
            probs = probs * drop
        return torch.matmul(probs, expand_kv_heads(v.float(), heads)), lse

    def backward(
        self, q: Tensor, k: Tensor, v: Tensor, dout: Tensor, lse: Tensor, delta: Tensor, mask: AttentionMask, scale: float,
    ) -> tuple[Tensor, Tensor, Tensor]:
        batch, heads = q.shape[:2]
        probs, _ = self._probabilities(q, k, mask, scale, lse)
        drop = dropout_scale(mask, heads, batch)
        dropped = probs if drop is None else probs * drop
        dout = dout.float()
        dv = torch.matmul(dropped.transpose(-1, -2), dout)
        dprobs = torch.matmul(dout, expand_kv_heads(v.float(), heads).transpose(-1, -2))
        if drop is not None:
            dprobs = dprobs * drop
        dscores = probs * (dprobs - delta.unsqueeze(-1))
        dq = torch.matmul(dscores, expand_kv_heads(k.float(), heads)) * scale
        dk = torch.matmul(dscores.transpose(-1, -2), q.float()) * scale
        return dq, reduce_kv_heads(dk, k.size(1)), reduce_kv_heads(dv, k.size(1))
