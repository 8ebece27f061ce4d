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
    return row_max.nan_to_num(nan=float("nan"), neginf=0.0)


def log_sum_exp(row_max: Tensor, row_log_sum: Tensor) -> Tensor:
    """The rows' log-sum-exp as one tensor (-inf for rows with no visible key)."""
    return row_max + row_log_sum


def _weights(row_max: Tensor, row_log_sum: Tensor, merged_max: Tensor, rows_may_be_empty: bool = True) -> Tensor:
    """exp(row_max - merged_max + row_log_sum): each partial's share of the merged softmax denominator
    (relative to the merged max); 0 for partials that saw no key. A merged max of -inf (a row no partial saw) is
    taken as 0 where ``rows_may_be_empty``."""
    return (row_max - (finite_max(merged_max) if rows_may_be_empty else merged_max)).add_(row_log_sum).exp_()


def _normalise_into(numerator: Tensor, total: Tensor, out: Tensor, row_log_sum: Tensor, rows_may_be_empty: bool) -> None:
    """out = numerator / total and row_log_sum = log total; rows whose total is 0 saw no key: out 0 and log 0 (the
    numerator is 0 there: divided by the smallest normal float it stays 0). Without ``rows_may_be_empty`` the
    caller knows every row saw a key (no padding, no documents: a row sees at least itself): two ops fewer."""
    torch.log(total, out=row_log_sum)
    if rows_may_be_empty:
        row_log_sum.nan_to_num_(nan=float("nan"), neginf=0.0)
        total = total.clamp_min_(torch.finfo(total.dtype).tiny)
    torch.div(numerator, total.unsqueeze(-1), out=out)


def merge_stacked_into(parts: Partial, into: Partial, rows_may_be_empty: bool = True) -> None:
    """Merge the partials stacked along dim 0 (out [P, ..., M, D], row_max and row_log_sum [P, ..., M]) into
    ``into`` (tensors or views of any dtype and strides, [..., M, D] and [..., M]): at most twelve ops, none a copy.
    ``rows_may_be_empty``: whether some row may have seen no key on any rank (see ``_normalise_into``)."""
    merged_max = torch.amax(parts.row_max, dim=0, out=into.row_max)
    weights = _weights(parts.row_max, parts.row_log_sum, merged_max, rows_may_be_empty)
    _normalise_into((weights.unsqueeze(-1) * parts.out).sum(dim=0), weights.sum(dim=0), into.out, into.row_log_sum,
                    rows_may_be_empty)


def merge(out: Tensor, row_max: Tensor, row_log_sum: Tensor) -> Partial:
    """Merge the partials stacked along dim 0: out [P, ..., M, D], row_max and row_log_sum [P, ..., M]."""
    merged = Partial(out.new_empty(out.shape[1:]), row_max.new_empty(row_max.shape[1:]), row_log_sum.new_empty(row_log_sum.shape[1:]))
    merge_stacked_into(Partial(out, row_max, row_log_sum), merged)
    return merged


def merge_into(accumulated: Partial, part: Partial, rows_may_be_empty: bool = True) -> None:
    """``accumulated`` <- the merge of ``accumulated`` and ``part`` (same shapes), in place: ``merge``
    of two partials, with one output-sized temporary instead of a stacked copy."""
    merged_max = torch.maximum(accumulated.row_max, part.row_max)
    shift = finite_max(merged_max) if rows_may_be_empty else merged_max
    kept = _weights(accumulated.row_max, accumulated.row_log_sum, shift, rows_may_be_empty=False)
    added = _weights(part.row_max, part.row_log_sum, shift, rows_may_be_empty=False)
    accumulated.row_max.copy_(merged_max)
    numerator = accumulated.out.mul_(kept.unsqueeze(-1)).add_(part.out * added.unsqueeze(-1))
    _normalise_into(numerator, kept.add_(added), accumulated.out, accumulated.row_log_sum, rows_may_be_empty)


def empty_partial(shape: torch.Size, dtype: torch.dtype, device: torch.device) -> Partial:
    """A partial that has seen no key: out = 0, row_max = -inf, row_log_sum = 0 (shape [..., M, D])."""
    return Partial(
        torch.zeros(shape, dtype=dtype, device=device),
        torch.full(shape[:-1], float("-inf"), dtype=dtype, device=device),
        torch.zeros(shape[:-1], dtype=dtype, device=device),
    )
