"""The distributed-softmax merge: attention over disjoint key sets, combined into attention over their union.

A backend returns, for each query row, a :class:`Partial`: the output normalised over the keys it
saw, a level ``row_max`` and ``row_log_sum = log sum_j exp(s_j - row_max)``. The row's
log-sum-exp is ``row_max + row_log_sum``, but it is kept as the two parts, with ``row_log_sum``
small: the reference and Triton backends take the row's largest visible score as ``row_max``
(one of the computed scores, exactly), ``cpu_flash`` splits its level plus its kernel's
log-sum-exp exactly into a float32 sum and its rounding error. Either way the merge weights
``exp(row_max_r - max_r' row_max_r' + row_log_sum_r)`` carry no rounding of a large
log-sum-exp. A single float32 log-sum-exp near 1e4 is off by up to 5e-4, which would put that
error into every merged output (``docs/design.md``, "The merge").

A row with no visible key has ``row_max = -inf`` and ``row_log_sum = 0``; it contributes nothing,
and a row that sees no key anywhere merges to ``out = 0``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class Partial(NamedTuple):
    """Attention of query rows over some of the keys: out [..., M, D], row_max and row_log_sum [..., M]."""

    out: Tensor
    row_max: Tensor
    row_log_sum: Tensor


def finite_max(row_max: Tensor) -> Tensor:
    """``row_max`` with -inf (no visible key) replaced by 0: a shift that keeps exp() free of inf - inf."""
    return torch.where(torch.isneginf(row_max), 0.0, row_max)


def log_sum_exp(row_max: Tensor, row_log_sum: Tensor) -> Tensor:
    """The rows' log-sum-exp as one tensor (-inf for rows with no visible key)."""
    return row_max + row_log_sum


def _weights(row_max: Tensor, row_log_sum: Tensor, merged_max: Tensor) -> Tensor:
    """exp(row_max - merged_max + row_log_sum): each partial's share of the merged softmax denominator
    (relative to the merged max); 0 for partials that saw no key."""
    return torch.exp(row_max - finite_max(merged_max) + row_log_sum)


def _log_total(total: Tensor) -> tuple[Tensor, Tensor]:
    """(a total safe to divide by, its log); rows whose total is 0 saw no key: 1 and 0."""
    safe = torch.where(total > 0, total, 1.0)
    return safe, safe.log()


def merge(out: Tensor, row_max: Tensor, row_log_sum: Tensor) -> Partial:
    """Merge the partials stacked along dim 0: out [P, ..., M, D], row_max and row_log_sum [P, ..., M]."""
    merged_max = row_max.amax(dim=0)
    weights = _weights(row_max, row_log_sum, merged_max)
    total, log_total = _log_total(weights.sum(dim=0))
    return Partial((weights.unsqueeze(-1) * out).sum(dim=0) / total.unsqueeze(-1), merged_max, log_total)


def merge_into(accumulated: Partial, part: Partial) -> None:
    """``accumulated`` <- the merge of ``accumulated`` and ``part`` (same shapes), in place: ``merge``
    of two partials, with one output-sized temporary instead of a stacked copy."""
    merged_max = torch.maximum(accumulated.row_max, part.row_max)
    kept = _weights(accumulated.row_max, accumulated.row_log_sum, merged_max)
    added = _weights(part.row_max, part.row_log_sum, merged_max)
    total, log_total = _log_total(kept + added)
    accumulated.out.mul_((kept / total).unsqueeze(-1)).add_(part.out * (added / total).unsqueeze(-1))
    accumulated.row_max.copy_(merged_max)
    accumulated.row_log_sum.copy_(log_total)


def empty_partial(shape: torch.Size, dtype: torch.dtype, device: torch.device) -> Partial:
    """A partial that has seen no key: out = 0, row_max = -inf, row_log_sum = 0 (shape [..., M, D])."""
    return Partial(
        torch.zeros(shape, dtype=dtype, device=device),
        torch.full(shape[:-1], float("-inf"), dtype=dtype, device=device),
        torch.zeros(shape[:-1], dtype=dtype, device=device),
    )
