"""CPU backend on aten's fused flash-attention kernel (``_scaled_dot_product_flash_attention_for_cpu``).

The kernel tiles the score map itself and returns the log-sum-exp, so no M x N block is
allocated for the common masks. It knows two of them: none, and "top-left" causal (row i sees
keys 0..i), plus an additive bias. A visibility by *global* positions is therefore cut into
pieces it understands, from the host-known runs of positions alone (no tensor is read), as few
and as large as possible (each call has a fixed cost, and every extra piece of a row costs a
merge):

- each (query run, key run) pair whose window hides every pair is skipped;
- the keys the window shows whole to a query run are one call without a mask, however many key
  runs they span (adjacent in index: positions ascend), and adjacent query runs that see the same
  keys whole share that call: full attention is always one call, and under a causal mask in the
  zigzag layout the rows of every rank whose chunk lies after this rank's chunks are one call
  over all its keys. Key padding is a [B, 1, 1, n] bias, broadcast by the kernel, not copied;
- under a causal window, a partly visible key run is its keys before the first row (whole, in
  the call above) and a diagonal that, trimmed to start at the same position on both sides, is
  exactly top-left causal;
- anything else (sliding windows, documents) is cut into tiles of at most ``TILE`` x ``TILE``,
  each skipped, taken whole, or given an explicit [B, 1, m, n] bias.

The first piece that covers a row is copied into the result; later ones are merged into it. Where every piece
subtracts each row's own level (no padding, no explicit mask) their log-sum-exps share that level and two merge in
four ops, the level split off once at the end; otherwise each piece's is split and merged by
:func:`lightning_mqsp.merge.merge_into`, like the ranks' partials are. In backward each piece's
dK and dV are added straight into the caller's accumulators. Grouped-query K/V go to the kernel
as they are (it maps query heads to key/value heads itself, and sums dK/dV over each group), so
nothing of size N is expanded or allocated per call beyond the kernel's own outputs.

Inputs are computed in float32. The kernel returns one float32 log-sum-exp per row, rounded by
up to 6e-8 x its magnitude: near 1e4 that error would enter every merge. So the kernel subtracts
a level from each row's scores through its additive bias, and ``level + lse`` is split exactly
into ``row_max`` (their float32 sum) and ``row_log_sum`` (the sum's rounding error), as precise
as the other backends (``docs/design.md``, "The merge"). Any level is exact; one near the row's
log-sum-exp keeps the kernel's small. In forward it is the row's mean score over the unpadded local keys,
in backward the merged ``row_max``, taken as finely as the bias can carry it at no extra size:
per row and head without a mask ([B, H, m, 1]); per batch and head, the rows' mean, with key
padding ([B, H, 1, n]); per row, the heads' mean, with an explicit [B, 1, m, n] mask.

Dropout and soft-capping need the counter-based mask or a score transform this kernel cannot
take: ``supports`` says so and ``backend="auto"`` falls back to the reference backend.
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from lightning_mqsp.backends import joined_rows, merge_in_torch, segments_of, written_into
from lightning_mqsp.layout import Run
from lightning_mqsp.merge import Partial, merge_into
from lightning_mqsp.visibility import Visibility, Window

_flash_forward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward

#: Largest side of a piece that needs an explicit [B, 1, m, n] bias (sliding windows, documents).
TILE = 512
#: Rows per causal diagonal piece. The kernel computes a causal call's last block of (up to 512)
#: keys whole and masks it, so a d x d diagonal costs as much as a d x d square (d <= 512): a
#: diagonal is cut into blocks of this many rows, each a small causal call and a whole call over the
#: diagonal's keys before it (a staircase), which makes an m-row diagonal cost m x DIAGONAL, not m x m.
DIAGONAL = 128
#: Most keys per backward call: the kernel returns dK and dV for every key it is given. Fewer on
#: short steps, down to half the step's gathered rows (and 128): a call's dK and dV are then no
#: larger than the step's queries. Each call also zero-fills and returns a dQ of all its rows, which
#: the caller adds up: 1024 keys a call made causal backward 3-4% faster than 512 at L=16k, P=2 and 4
#: (fewer calls over the same rows; docs/benchmarks.md).
KEY_BLOCK = 1024


@dataclass(frozen=True)
class _Piece:
    """Rows [row_start, row_stop) attend keys [key_start, key_stop): wholly, top-left causally, or under a bias."""

    row_start: int
    row_stop: int
    key_start: int
    key_stop: int
    kind: Literal["whole", "causal", "masked"]

    @property
    def rows(self) -> slice:
        return slice(self.row_start, self.row_stop)

    @property
    def keys(self) -> slice:
        return slice(self.key_start, self.key_stop)


def _pieces(visibility: Visibility, skyline: bool = False) -> list[_Piece]:
    """The kernel calls for ``visibility`` (see ``_planned_pieces``)."""
    return list(_planned_pieces(visibility.query_runs, visibility.key_runs, visibility.window, visibility.has_documents, skyline))


@functools.lru_cache(maxsize=4096)
def _planned_pieces(
    query_runs: tuple[Run, ...], key_runs: tuple[Run, ...], window: Window, documents: bool, skyline: bool,
) -> tuple[_Piece, ...]:
    """The kernel calls for rows ``query_runs`` against keys ``key_runs``: whole pieces (joined over key runs and adjacent query runs)
    first, then the causal diagonals and tiles of the key runs a query run sees in part.

    ``skyline`` (for the backward): adjacent query runs that each see a prefix [0, w) of the keys
    whole (causal attention) are cut as a skyline instead, all of them against the shortest prefix,
    then those that see further against the next stretch, and so on, so that each key is in one
    call per step: every call adds dK and dV of all its keys into the accumulators, which costs
    more than the query gradients of the rows (for l > P x micro_q_size), and as much again for
    each further call over the same keys.

    Host-side planning from host-known runs only, so cached: every micro-step of a signature repeats
    its plan in every call (about 0.1 ms of Python a step, per direction)."""
    groups: list[tuple[int, int, list[tuple[int, int]]]] = []  # (row_start, row_stop, whole key ranges)
    partial = []
    for row_start, row_stop, row_pos in query_runs:
        last_row_pos = row_pos + (row_stop - row_start) - 1
        whole: list[tuple[int, int]] = []
        for key_start, key_stop, key_pos in key_runs:
            last_key_pos = key_pos + (key_stop - key_start) - 1
            if not window.sees_any(row_pos, last_row_pos, key_pos, last_key_pos):
                continue
            if not documents and window.sees_all(row_pos, last_row_pos, key_pos, last_key_pos):
                _join(whole, key_start, key_stop)
            elif not documents and window.is_causal:
                for piece in _causal_pieces(row_start, row_stop, row_pos, key_start, key_stop, key_pos):
                    if (piece.kind, piece.row_start, piece.row_stop) == ("whole", row_start, row_stop):
                        _join(whole, piece.key_start, piece.key_stop)
                    else:
                        partial.append(piece)
            else:
                partial.extend(_tiles(window, documents, row_start, row_stop, row_pos, key_start, key_stop, key_pos))
        if groups and groups[-1][1] == row_start and groups[-1][2] == whole:
            groups[-1] = (groups[-1][0], row_stop, whole)
        else:
            groups.append((row_start, row_stop, whole))
    if skyline:
        return (*_skyline(groups), *partial)
    return (*(_Piece(r0, r1, k0, k1, "whole") for r0, r1, ranges in groups for k0, k1 in ranges), *partial)


def _skyline(groups: list[tuple[int, int, list[tuple[int, int]]]]) -> list[_Piece]:
    """Whole pieces for row groups and their whole key ranges: adjacent groups whose keys are a
    prefix [0, w) (w = 0: none) are cut as a skyline, the others called as they are."""
    pieces: list[_Piece] = []
    towers: list[tuple[int, int, int]] = []  # adjacent groups seeing a prefix: (row_start, row_stop, w)
    for row_start, row_stop, ranges in groups:
        prefix = not ranges or (len(ranges) == 1 and ranges[0][0] == 0)
        if not (prefix and towers and towers[-1][1] == row_start):
            pieces += _levels(towers, 0)
            towers = []
        if prefix:
            towers.append((row_start, row_stop, ranges[0][1] if ranges else 0))
        else:
            pieces += [_Piece(row_start, row_stop, k0, k1, "whole") for k0, k1 in ranges]
    return pieces + _levels(towers, 0)


def _levels(towers: list[tuple[int, int, int]], base: int) -> list[_Piece]:
    """Adjacent rows seeing keys [0, w) each, keys below ``base`` done: one call per maximal run of
    towers above ``base`` up to its lowest top, then the same above that."""
    pieces, i = [], 0
    while i < len(towers):
        if towers[i][2] <= base:
            i += 1
            continue
        j = i
        while j < len(towers) and towers[j][2] > base:
            j += 1
        level = min(w for _, _, w in towers[i:j])
        pieces.append(_Piece(towers[i][0], towers[j - 1][1], base, level, "whole"))
        pieces += _levels(towers[i:j], level)
        i = j
    return pieces


def _join(ranges: list[tuple[int, int]], start: int, stop: int) -> None:
    """Append the index range [start, stop) to ``ranges``, joined with the last one when adjacent."""
    if ranges and ranges[-1][1] == start:
        ranges[-1] = (ranges[-1][0], stop)
    else:
        ranges.append((start, stop))


def _causal_pieces(row_start: int, row_stop: int, row_pos: int, key_start: int, key_stop: int, key_pos: int) -> list[_Piece]:
    """A causal (row run, key run) pair some of whose pairs are hidden: the keys before the first row
    (whole, for every row), then the diagonal, in blocks of DIAGONAL rows: the block's keys that the
    earlier rows of the diagonal see (whole) and the block's own top-left causal square."""
    pieces = []
    diagonal_pos = max(row_pos, key_pos)
    if diagonal_pos > key_pos:  # keys before the first row's position: seen by every row
        pieces.append(_Piece(row_start, row_stop, key_start, min(key_stop, key_start + (diagonal_pos - key_pos)), "whole"))
    diagonal_key = key_start + (diagonal_pos - key_pos)
    diagonal_row = row_start + (diagonal_pos - row_pos)
    # Rows and keys both start at diagonal_pos; no key past the last row's (the kernel computes the
    # first 512 keys it is given whatever the rows see).
    for block in range(diagonal_row, row_stop, DIAGONAL):
        first_key = diagonal_key + (block - diagonal_row)
        if first_key >= key_stop:  # the key run ends above these rows: they see the rest of it whole
            pieces.append(_Piece(block, row_stop, diagonal_key, key_stop, "whole"))
            break
        if first_key > diagonal_key:
            pieces.append(_Piece(block, min(block + DIAGONAL, row_stop), diagonal_key, first_key, "whole"))
        pieces.append(_Piece(block, min(block + DIAGONAL, row_stop), first_key, min(key_stop, first_key + DIAGONAL), "causal"))
    return pieces


def _tiles(
    window: Window, documents: bool, row_start: int, row_stop: int, row_pos: int, key_start: int, key_stop: int, key_pos: int,
) -> list[_Piece]:
    """Tiles of at most TILE x TILE, each skipped, whole, or masked by an explicit bias."""
    pieces = []
    for r0 in range(row_start, row_stop, TILE):
        r1 = min(r0 + TILE, row_stop)
        first_row, last_row = row_pos + (r0 - row_start), row_pos + (r1 - 1 - row_start)
        for k0 in range(key_start, key_stop, TILE):
            k1 = min(k0 + TILE, key_stop)
            first_key, last_key = key_pos + (k0 - key_start), key_pos + (k1 - 1 - key_start)
            if not window.sees_any(first_row, last_row, first_key, last_key):
                continue
            whole = not documents and window.sees_all(first_row, last_row, first_key, last_key)
            pieces.append(_Piece(r0, r1, k0, k1, "whole" if whole else "masked"))
    return pieces


def _attend(visibility: Visibility, piece: _Piece, batch_size: int) -> Tensor | None:
    """Bool mask of the piece's visible pairs beyond what the kernel's flag applies: [B, 1, 1, n] key
    padding for whole and causal pieces, [B, 1, m, n] for masked ones; None when nothing is masked."""
    if piece.kind != "masked" and visibility.key_padding_mask is None:
        return None
    if piece.kind == "masked":  # (a piece's rows may join the rows of several ranks: no Visibility.block here)
        return visibility.visible_pairs(batch_size, piece.rows, piece.keys)
    assert visibility.key_padding_mask is not None
    return visibility.key_padding_mask[:, None, None, piece.keys]


def _bias(attend: Tensor | None, negated_level: Tensor) -> tuple[Tensor, Tensor]:
    """(additive bias for the kernel [B, H, m, 1] or broader, the negated level it adds to each row [B, H, m]): the
    rows' ``negated_level`` [B, H, m] as finely as the bias carries it without growing (see the module docstring), and
    -inf where ``attend`` is False. Unmasked, the bias is the negated level itself (a view: no op)."""
    if attend is None:
        return negated_level.unsqueeze(-1), negated_level
    used = negated_level.mean(dim=-1, keepdim=True) if attend.size(-2) == 1 else negated_level.mean(dim=1, keepdim=True)
    bias = torch.where(attend, used.unsqueeze(-1), torch.full((), float("-inf"), dtype=used.dtype, device=used.device))
    return bias, used.expand_as(negated_level)


def _negated_row_levels(q: Tensor, k: Tensor, scale: float, key_padding_mask: Tensor | None) -> Tensor:
    """[B, H, M]: minus each row's mean score over the unpadded keys of ``k``, a level near its log-sum-exp
    (any float32 value is exact as a level: the kernel subtracts it as given; a near one keeps the
    kernel's log-sum-exp small; padded keys may hold anything, so they do not count). One matmul a call: the
    scaled mean key is the same in every micro-step of a layer (``_KEY_MEANS``)."""
    return (q @ _KEY_MEANS.get(k, key_padding_mask, q.size(1), -scale).unsqueeze(-1)).squeeze(-1)


class _KeyMeans:
    """The last key tensor's scaled mean key [B, H, D], per query head: every micro-step of a call attends the same
    keys (four ops a step made it anew). Kept by identity and version of the keys and padding mask."""

    def __init__(self) -> None:
        self._entry: tuple[weakref.ref[Tensor], Tensor | None, tuple[object, ...], Tensor] | None = None

    def get(self, k: Tensor, key_padding_mask: Tensor | None, heads: int, factor: float) -> Tensor:
        if torch.compiler.is_compiling():  # traced graphs compute it (a cache is not traceable)
            return self._compute(k, key_padding_mask, heads, factor)
        versions = (k._version, None if key_padding_mask is None else key_padding_mask._version, heads, factor)
        entry = self._entry
        if entry is not None and entry[0]() is k and entry[1] is key_padding_mask and entry[2] == versions:
            return entry[3]
        mean_key = self._compute(k, key_padding_mask, heads, factor)
        self._entry = (weakref.ref(k), key_padding_mask, versions, mean_key)
        return mean_key

    @staticmethod
    def _compute(k: Tensor, key_padding_mask: Tensor | None, heads: int, factor: float) -> Tensor:
        k = k.float()
        if key_padding_mask is None:
            mean_key = k.mean(dim=2)
        else:
            weights = key_padding_mask.to(k.dtype)[:, None, None, :]  # [B, 1, 1, N]
            mean_key = (weights @ k).squeeze(2) / weights.sum(dim=-1).clamp(min=1.0)
        return mean_key.repeat_interleave(heads // k.size(1), dim=1).mul_(factor)  # [B, H, D]


_KEY_MEANS = _KeyMeans()


def _split_sum(negated_level: Tensor, lse: Tensor, may_be_empty: bool) -> tuple[Tensor, Tensor]:
    """(row_max, row_log_sum) with row_max + row_log_sum == level + lse exactly (level = -negated_level): the float32
    sum and its rounding error (Knuth's TwoSum). With ``may_be_empty``, rows with lse = -inf (no key) give (-inf, 0)."""
    total = lse - negated_level
    negated_level_part = lse - total
    lse_part = total + negated_level_part
    error = (lse - lse_part) - (negated_level - negated_level_part)
    if not may_be_empty:
        return total, error
    empty = torch.isneginf(lse)
    return total.masked_fill(empty, float("-inf")), error.masked_fill(empty, 0.0)


def _rows_without_keys(attend: Tensor | None, piece: _Piece) -> Tensor | None:
    """Bool [B, 1, rows]: rows of the piece that see no key in it (the kernel does not report them as -inf)."""
    if attend is None:
        return None
    rows = piece.row_stop - piece.row_start
    if piece.kind != "causal":
        return (~attend.any(dim=-1)).expand(-1, -1, rows)
    seen = attend[:, :, 0, :].cummax(dim=-1).values  # seen[b, j]: some key <= j attends
    last_key = torch.arange(rows, device=attend.device).clamp(max=attend.size(-1) - 1)
    return ~seen[:, :, last_key]


def _output_with_delta(dout: Tensor, delta: Tensor) -> Tensor:
    """A stand-in for the global output O, whose only use in the kernel's backward is
    delta = rowsum(dout * O): zero but for each row's largest entry of dout in magnitude, j, which holds
    delta / dout[j], so that the row sum is delta (to the rounding of one division), and the rows' outputs
    need not travel between ranks. No overflow: |delta / dout[j]| <= D max|O| as |dout[j]| is the largest.
    Rows with dout = 0 get 0 (their delta is 0). One [M, D] tensor and seven small ops."""
    _, where = dout.abs().max(dim=-1, keepdim=True)
    pivot = dout.gather(-1, where)
    value = (delta.unsqueeze(-1) / pivot).nan_to_num_(nan=0.0)  # 0 / 0 where the row's dout is 0
    return torch.zeros_like(dout).scatter_(-1, where, value)


class _Written:
    """Which rows of a result hold a piece's result already (host-side, sorted disjoint intervals)."""

    def __init__(self) -> None:
        self.intervals: list[tuple[int, int]] = []

    def split(self, start: int, stop: int) -> list[tuple[int, int, bool]]:
        """[start, stop) cut into (start, stop, written) sub-intervals; marks all of it written."""
        parts, at = [], start
        for lo, hi in self.intervals:
            lo, hi = max(lo, start), min(hi, stop)
            if lo >= hi:
                continue
            if at < lo:
                parts.append((at, lo, False))
            parts.append((lo, hi, True))
            at = hi
        if at < stop:
            parts.append((at, stop, False))
        merged: list[tuple[int, int]] = []
        for lo, hi in sorted([*self.intervals, (start, stop)]):
            if merged and lo <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(hi, merged[-1][1]))
            else:
                merged.append((lo, hi))
        self.intervals = merged
        return parts

    def gaps(self, stop: int) -> list[tuple[int, int]]:
        """The intervals of [0, stop) no piece has written."""
        gaps, at = [], 0
        for lo, hi in self.intervals:
            if at < lo:
                gaps.append((at, lo))
            at = hi
        return gaps + ([(at, stop)] if at < stop else [])


def _key_blocks(pieces: list[_Piece], most: int) -> list[_Piece]:
    """Whole pieces cut into blocks of at most ``most`` keys (for the backward, whose kernel returns
    dK and dV of every key it is given: without the cut an l-key piece would allocate two l-row
    buffers per call, the step's largest)."""
    return [
        _Piece(p.row_start, p.row_stop, k, min(k + most, p.key_stop), p.kind) if p.kind == "whole" else p
        for p in pieces for k in (range(p.key_start, p.key_stop, most) if p.kind == "whole" else (p.key_start,))
    ]


def _covers_all(pieces: list[_Piece], rows: int) -> bool:
    """One piece, over every row: its result is the whole result."""
    return len(pieces) == 1 and (pieces[0].row_start, pieces[0].row_stop) == (0, rows)


class _SplitMerge:
    """The pieces' results merged as the ranks' partials are: each piece's level plus log-sum-exp split exactly into
    (row_max, row_log_sum) (``_split_sum``), then merged by :func:`lightning_mqsp.merge.merge_into`. For pieces whose
    levels differ (key padding and explicit masks take a coarser level than each row's own: see ``_bias``)."""

    def __init__(self, q: Tensor, rows_may_be_empty: bool) -> None:
        self.merged = Partial(q.new_empty(q.shape), q.new_empty(q.shape[:3]), q.new_empty(q.shape[:3]))
        self.rows_may_be_empty = rows_may_be_empty
        self.written = _Written()

    def add(self, piece: _Piece, out: Tensor, lse: Tensor, used: Tensor, may_be_empty: bool) -> None:
        row_max, row_log_sum = _split_sum(used, lse, may_be_empty)
        for start, stop, seen in self.written.split(piece.row_start, piece.row_stop):
            into = Partial(*(t[:, :, start:stop] for t in self.merged))
            part = Partial(*(t[:, :, start - piece.row_start : stop - piece.row_start] for t in (out, row_max, row_log_sum)))
            if seen:
                merge_into(into, part, self.rows_may_be_empty)
            else:
                for target, source in zip(into, part):
                    target.copy_(source)

    def result(self) -> Partial:
        return _without_keys_in_gaps(self.merged, self.written)


class _OwnLevelMerge:
    """The pieces' results where every piece subtracts each row's own level (no padding, no explicit mask: the bias
    is the level itself): their log-sum-exps are relative to one level per row, so two of them merge as they are
    (four ops: b's share of the denominator is sigmoid(lse_b - lse_a)), and the exact split into (row_max,
    row_log_sum) is done once, at the end (the split and the general merge took eighteen ops a piece)."""

    def __init__(self, q: Tensor, negated_level: Tensor) -> None:
        self.out, self.lse = q.new_empty(q.shape), q.new_empty(q.shape[:3])
        self.negated_level = negated_level
        self.written = _Written()

    def add(self, piece: _Piece, out: Tensor, lse: Tensor, used: Tensor, may_be_empty: bool) -> None:
        assert not may_be_empty, "a piece without a mask has a key for every row"
        for start, stop, seen in self.written.split(piece.row_start, piece.row_stop):
            into_out, into_lse = self.out[:, :, start:stop], self.lse[:, :, start:stop]
            rows = slice(start - piece.row_start, stop - piece.row_start)
            part_out, part_lse = out[:, :, rows], lse[:, :, rows]
            if seen:
                share = (part_lse - into_lse).sigmoid_()  # exp(lse_b) / (exp(lse_a) + exp(lse_b)), never inf / inf
                into_out.lerp_(part_out, share.unsqueeze(-1))
                torch.logaddexp(into_lse, part_lse, out=into_lse)
            else:
                into_out.copy_(part_out)
                into_lse.copy_(part_lse)

    def result(self) -> Partial:
        # Rows no piece wrote hold whatever the buffer held: their split is overwritten below.
        return _without_keys_in_gaps(Partial(self.out, *_split_sum(self.negated_level, self.lse, may_be_empty=False)), self.written)


def _without_keys_in_gaps(merged: Partial, written: _Written) -> Partial:
    """``merged`` with the rows no piece wrote (rows that see no key here) set to a partial that saw no key."""
    for start, stop in written.gaps(merged.row_max.size(-1)):
        merged.out[:, :, start:stop] = 0.0
        merged.row_max[:, :, start:stop] = float("-inf")
        merged.row_log_sum[:, :, start:stop] = 0.0
    return merged


class CpuFlashBackend:
    name = "cpu_flash"
    reads_rows_in_place = False

    def supports(self, q: Tensor, visibility: Visibility) -> str | None:
        if q.device.type != "cpu":
            return f"it runs on CPU tensors only, got {q.device.type}"
        if q.dtype == torch.float64:
            return "it computes in float32; float64 inputs run exactly on the 'reference' backend"
        if visibility.dropout_p > 0.0:
            return "attention dropout needs the counter-based mask of the 'reference' or 'triton' backend"
        if visibility.softcap is not None:
            return "aten's CPU flash kernel cannot soft-cap scores: use the 'reference' backend (or 'triton' on a GPU)"
        return None

    def forward(self, q: Tensor, k: Tensor, v: Tensor, visibility: Visibility, scale: float, into: Partial | None = None) -> Partial:
        return written_into(self._forward(joined_rows(q), k, v, visibility, scale), into, q)

    def merge(self, parts: Tensor, out: Tensor, row_max: Tensor, row_log_sum: Tensor, rows_may_be_empty: bool = True) -> None:
        merge_in_torch(parts, out, row_max, row_log_sum, rows_may_be_empty)

    def _forward(self, q: Tensor, k: Tensor, v: Tensor, visibility: Visibility, scale: float) -> Partial:
        batch, rows = q.size(0), q.size(2)
        q, k, v = q.float(), k.float(), v.float()
        pieces = _pieces(visibility)
        negated_level = _negated_row_levels(q, k, scale, visibility.key_padding_mask)
        own_levels = visibility.key_padding_mask is None and all(piece.kind != "masked" for piece in pieces)
        merged = _OwnLevelMerge(q, negated_level) if own_levels else _SplitMerge(q, visibility.masks_within_runs)
        for piece in pieces:
            attend = _attend(visibility, piece, batch)
            bias, used = _bias(attend, negated_level[:, :, piece.rows])
            out, lse = _flash_forward(
                q[:, :, piece.rows], k[:, :, piece.keys], v[:, :, piece.keys], 0.0, piece.kind == "causal",
                attn_mask=bias, scale=scale,
            )
            empty = _rows_without_keys(attend, piece)
            if empty is not None:
                out, lse = out.masked_fill(empty.unsqueeze(-1), 0.0), lse.masked_fill(empty, float("-inf"))
            if _covers_all(pieces, rows):
                return Partial(out, *_split_sum(used, lse, may_be_empty=empty is not None))
            merged.add(piece, out, lse, used, may_be_empty=empty is not None)
        return merged.result()

    def backward(
        self, q: Tensor, k: Tensor, v: Tensor, dout: Tensor, row_max: Tensor, row_log_sum: Tensor, delta: Tensor,
        visibility: Visibility, scale: float, grad_key: Tensor, grad_value: Tensor, grad_query: Tensor | None = None,
    ) -> Tensor:
        row_max, row_log_sum, delta = (joined_rows(t.unsqueeze(-1)).squeeze(-1) for t in (row_max, row_log_sum, delta))
        dq = self._backward(joined_rows(q), k, v, joined_rows(dout, sequence_major=True), row_max, row_log_sum, delta,
                            visibility, scale, grad_key, grad_value)
        dq = segments_of(dq, q)
        return dq if grad_query is None else grad_query.copy_(dq)

    def _backward(
        self, q: Tensor, k: Tensor, v: Tensor, dout: Tensor, row_max: Tensor, row_log_sum: Tensor, delta: Tensor,
        visibility: Visibility, scale: float, grad_key: Tensor, grad_value: Tensor,
    ) -> Tensor:
        batch, rows = q.size(0), q.size(2)
        q, k, v, dout = q.float(), k.float(), v.float(), dout.float()
        out = _output_with_delta(dout, delta)
        # The kernel recomputes p = exp(s - level - lse) with lse = (row_max - level) + row_log_sum: exactly
        # row_log_sum where the level is the row's own row_max. A row with no key anywhere (row_max = -inf)
        # must give p = 0: its row_log_sum becomes +inf (a finite level plus +inf stays +inf).
        negated_level = row_max.neg()
        if visibility.masks_within_runs:  # only padding and documents can hide every key of a row
            negated_level.nan_to_num_(nan=float("nan"), posinf=0.0)  # -level; 0 where row_max = -inf
            row_log_sum = row_log_sum.masked_fill(torch.isneginf(row_max), float("inf"))
        pieces = _key_blocks(_pieces(visibility, skyline=True), min(KEY_BLOCK, max(rows // 2, 128)))
        dq: Tensor | None = None  # sequence-major, as the kernel returns its own
        written = _Written()
        for piece in pieces:
            r, c = piece.rows, piece.keys
            attend = _attend(visibility, piece, batch)
            bias, used = _bias(attend, negated_level[:, :, r])
            # Unmasked, the level is the row's own and the kernel's lse is row_log_sum itself (no arithmetic).
            lse = row_log_sum[:, :, r] if attend is None else (used - negated_level[:, :, r]) + row_log_sum[:, :, r]
            part_dq, part_dk, part_dv = _flash_backward(
                dout[:, :, r], q[:, :, r], k[:, :, c], v[:, :, c], out[:, :, r], lse, 0.0, piece.kind == "causal",
                attn_mask=bias, scale=scale,
            )
            grad_key[:, :, c].add_(part_dk)  # in place (``x[c] += y`` would copy the slice back onto itself)
            grad_value[:, :, c].add_(part_dv)
            del part_dk, part_dv  # before the next piece's kernel call allocates its own
            if dq is None and (piece.row_start, piece.row_stop) == (0, rows):  # the first piece of every row: no copy
                dq = part_dq
                written.split(0, rows)
            else:
                if dq is None:
                    dq = q.new_empty((batch, rows, q.size(1), q.size(3))).transpose(1, 2)
                for start, stop, seen in written.split(piece.row_start, piece.row_stop):
                    into = dq[:, :, start:stop]
                    (into.add_ if seen else into.copy_)(part_dq[:, :, start - piece.row_start : stop - piece.row_start])
            del part_dq
        if dq is None:  # no piece: no row sees a key here
            return q.new_zeros((batch, rows, q.size(1), q.size(3))).transpose(1, 2)
        for start, stop in written.gaps(rows):
            dq[:, :, start:stop] = 0.0
        return dq
