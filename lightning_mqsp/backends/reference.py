"""Reference backend: plain torch ops, one explicit score block per call.

Slow and memory-hungry (M x N scores per head), but simple enough to trust, and it supports
everything the visibility model holds: windows, padding, documents, soft-capping, dropout, GQA,
float64. The fused backends are tested against it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_mqsp.backends import (
    accumulation_dtype,
    expand_kv_heads,
    joined_rows,
    merge_in_torch,
    reduce_kv_heads,
    segments_of,
    written_into,
)
from lightning_mqsp.merge import Partial, finite_max
from lightning_mqsp.visibility import Visibility


class ReferenceBackend:
    name = "reference"
    reads_rows_in_place = False

    def supports(self, q: Tensor, visibility: Visibility) -> str | None:
        return None

    @staticmethod
    def _scores(q: Tensor, k: Tensor, visibility: Visibility, scale: float) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """(masked scores [B, H, M, N] with -inf where invisible, tanh of the capped scores or None, visible pairs or None)."""
        scores = q @ k.transpose(-1, -2) * scale
        capped = None
        if visibility.softcap is not None:
            capped = torch.tanh(scores / visibility.softcap)
            scores = visibility.softcap * capped
        visible = visibility.visible_pairs(q.size(0))
        if visible is not None:
            scores = scores.masked_fill(~visible, float("-inf"))
        return scores, capped, visible

    def forward(self, q: Tensor, k: Tensor, v: Tensor, visibility: Visibility, scale: float, into: Partial | None = None) -> Partial:
        return written_into(self._forward(joined_rows(q), k, v, visibility, scale), into, q)

    def merge(self, parts: Tensor, out: Tensor, row_max: Tensor, row_log_sum: Tensor, rows_may_be_empty: bool = True) -> None:
        merge_in_torch(parts, out, row_max, row_log_sum, rows_may_be_empty)

    def _forward(self, q: Tensor, k: Tensor, v: Tensor, visibility: Visibility, scale: float) -> Partial:
        dtype = accumulation_dtype(q.dtype)
        batch, heads = q.shape[:2]
        q, k, v = q.to(dtype), expand_kv_heads(k.to(dtype), heads), expand_kv_heads(v.to(dtype), heads)
        scores, _, _ = self._scores(q, k, visibility, scale)
        row_max = scores.amax(dim=-1)
        probs = torch.exp(scores - finite_max(row_max).unsqueeze(-1))  # 0 where invisible
        row_sum = probs.sum(dim=-1)
        drop = visibility.dropout_scale(batch, heads)
        if drop is not None:
            probs = probs * drop
        seen = row_sum > 0
        out = (probs @ v) / torch.where(seen, row_sum, torch.ones_like(row_sum)).unsqueeze(-1)
        row_log_sum = torch.where(seen, torch.log(torch.where(seen, row_sum, torch.ones_like(row_sum))), torch.zeros_like(row_sum))
        return Partial(out, row_max, row_log_sum)

    def backward(
        self, q: Tensor, k: Tensor, v: Tensor, dout: Tensor, row_max: Tensor, row_log_sum: Tensor, delta: Tensor,
        visibility: Visibility, scale: float, grad_key: Tensor, grad_value: Tensor, grad_query: Tensor | None = None,
    ) -> Tensor:
        row_max, row_log_sum, delta = (joined_rows(t.unsqueeze(-1)).squeeze(-1) for t in (row_max, row_log_sum, delta))
        dq = self._backward(joined_rows(q), k, v, joined_rows(dout), row_max, row_log_sum, delta, visibility, scale,
                            grad_key, grad_value)
        dq = segments_of(dq, q)
        return dq if grad_query is None else grad_query.copy_(dq)

    def _backward(
        self, q: Tensor, k: Tensor, v: Tensor, dout: Tensor, row_max: Tensor, row_log_sum: Tensor, delta: Tensor,
        visibility: Visibility, scale: float, grad_key: Tensor, grad_value: Tensor,
    ) -> Tensor:
        dtype = accumulation_dtype(q.dtype)
        batch, heads, num_kv_heads = q.size(0), q.size(1), k.size(1)
        q, k, v = q.to(dtype), expand_kv_heads(k.to(dtype), heads), expand_kv_heads(v.to(dtype), heads)
        dout = dout.to(dtype)
        scores, capped, _ = self._scores(q, k, visibility, scale)
        # Globally normalised probabilities on these keys: exp((s - max) - log_sum), the large max taken off
        # first (max + log_sum would round); 0 for rows with no key anywhere.
        probs = (scores - finite_max(row_max).unsqueeze(-1)).sub_(row_log_sum.unsqueeze(-1)).exp_()
        probs = probs.masked_fill_(torch.isneginf(row_max).unsqueeze(-1), 0.0)
        grad_probs = dout @ v.transpose(-1, -2)
        drop = visibility.dropout_scale(batch, heads)
        dropped = probs if drop is None else probs * drop
        if drop is not None:
            grad_probs = grad_probs * drop
        grad_scores = probs * (grad_probs - delta.to(dtype).unsqueeze(-1))
        if capped is not None:  # d/ds [c * tanh(s / c)] = 1 - tanh^2
            grad_scores = grad_scores * (1.0 - capped * capped)
        grad_key.add_(reduce_kv_heads(grad_scores.transpose(-1, -2) @ q * scale, num_kv_heads))
        grad_value.add_(reduce_kv_heads(dropped.transpose(-1, -2) @ dout, num_kv_heads))
        return grad_scores @ k * scale
