"""CPU backend on aten's fused flash-attention kernel (``_scaled_dot_product_flash_attention_for_cpu``).

The kernel tiles the score map itself and returns the log-sum-exp, so no M x N block is
allocated for the common masks. It knows two of them: none, and "top-left" causal (row i sees
keys 0..i), plus an additive bias. A visibility by *global* positions is therefore cut into
pieces it understands, from the host-known runs of positions alone (no tensor is read):

- each (query run, key run) pair whose window hides every pair is skipped;
- one that the window shows whole is one call without a mask (key padding as a [B, 1, 1, n]
  bias, broadcast by the kernel, not copied);
- under a causal window, the rest is the keys before the first row (whole) and a diagonal that,
  trimmed to start at the same position on both sides, is exactly top-left causal;
- anything else (sliding windows, documents) is cut into tiles of at most ``TILE`` x ``TILE``,
  each skipped, taken whole, or given an explicit [B, 1, m, n] bias.

The pieces' partial results are merged by :func:`lightning_mqsp.merge.merge_into`, like the
ranks' partials are. Inputs are computed in float32; the kernel returns one float32 log-sum-exp
per row, so each partial's ``row_max`` here is that log-sum-exp (and ``row_log_sum`` 0): its
rounding, up to 6e-8 x |log-sum-exp|, is the one place where this backend is less precise than
the others (``docs/design.md``, "The merge"). Dropout and soft-capping need the counter-based
mask or a score transform this kernel cannot take: ``supports`` says so and ``backend="auto"``
falls back to the reference backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from lightning_mqsp.backends import expand_kv_heads, reduce_kv_heads
from lightning_mqsp.merge import Partial, empty_partial, finite_max, log_sum_exp, merge_into
from lightning_mqsp.visibility import Visibility, Window

_flash_forward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward

#: Largest side of a piece that needs an explicit [B, 1, m, n] bias (sliding windows, documents).
TILE = 512


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


def _pieces(visibility: Visibility) -> list[_Piece]:
    window, documents = visibility.window, visibility.has_documents
    pieces = []
    for row_start, row_stop, row_pos in visibility.query_runs:
        last_row_pos = row_pos + (row_stop - row_start) - 1
        for key_start, key_stop, key_pos in visibility.key_runs:
            last_key_pos = key_pos + (key_stop - key_start) - 1
            if not window.sees_any(row_pos, last_row_pos, key_pos, last_key_pos):
                continue
            if not documents and window.sees_all(row_pos, last_row_pos, key_pos, last_key_pos):
                pieces.append(_Piece(row_start, row_stop, key_start, key_stop, "whole"))
            elif not documents and window.is_causal:
                pieces.extend(_causal_pieces(row_start, row_stop, row_pos, key_start, key_stop, key_pos))
            else:
                pieces.extend(_tiles(window, documents, row_start, row_stop, row_pos, key_start, key_stop, key_pos))
    return pieces


def _causal_pieces(row_start: int, row_stop: int, row_pos: int, key_start: int, key_stop: int, key_pos: int) -> list[_Piece]:
    """A causal (row run, key run) pair some of whose pairs are hidden: whole keys before the first row, then a diagonal."""
    pieces = []
    diagonal_pos = max(row_pos, key_pos)
    if diagonal_pos > key_pos:  # keys before the first row's position: seen by every row
        pieces.append(_Piece(row_start, row_stop, key_start, min(key_stop, key_start + (diagonal_pos - key_pos)), "whole"))
    diagonal_key = key_start + (diagonal_pos - key_pos)
    if diagonal_key < key_stop:  # rows and keys both starting at diagonal_pos: top-left causal
        pieces.append(_Piece(row_start + (diagonal_pos - row_pos), row_stop, diagonal_key, key_stop, "causal"))
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
    block = visibility.block(piece.rows, piece.keys)
    if piece.kind == "masked":
        return block.visible_pairs(batch_size)
    return None if block.key_padding_mask is None else block.key_padding_mask[:, None, None, :]


def _bias(attend: Tensor | None) -> Tensor | None:
    """Additive 0 / -inf bias for the kernel."""
    if attend is None:
        return None
    return torch.zeros(attend.shape, dtype=torch.float32, device=attend.device).masked_fill_(~attend, float("-inf"))


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
    delta = rowsum(dout * O): u * delta / (peak * |u|^2) with u = dout / peak and peak = max|dout|
    has exactly that row sum, so the rows' outputs need not travel between ranks. Working on u,
    whose squared norm lies in [1, D], keeps it exact however large or small dout is (|dout|^2
    itself overflows float32 at 1e19 and underflows at 1e-23). Rows with dout = 0 get 0."""
    peak = dout.abs().amax(dim=-1, keepdim=True)
    peak = torch.where(peak > 0, peak, torch.ones_like(peak))
    unit = dout / peak
    norm = (unit * unit).sum(dim=-1, keepdim=True)
    return unit * (delta.unsqueeze(-1) / peak) / torch.where(norm > 0, norm, torch.ones_like(norm))


class CpuFlashBackend:
    name = "cpu_flash"

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

    def forward(self, q: Tensor, k: Tensor, v: Tensor, visibility: Visibility, scale: float) -> Partial:
        batch, heads = q.shape[:2]
        q, k, v = q.float(), expand_kv_heads(k.float(), heads), expand_kv_heads(v.float(), heads)
        pieces = _pieces(visibility)
        result = empty_partial(q.shape, torch.float32, q.device)
        for piece in pieces:
            attend = _attend(visibility, piece, batch)
            out, lse = _flash_forward(
                q[:, :, piece.rows], k[:, :, piece.keys], v[:, :, piece.keys], 0.0, piece.kind == "causal",
                attn_mask=_bias(attend), scale=scale,
            )
            empty = _rows_without_keys(attend, piece)
            if empty is not None:
                out, lse = out.masked_fill(empty.unsqueeze(-1), 0.0), lse.masked_fill(empty, float("-inf"))
            part = Partial(out, lse, torch.zeros_like(lse))
            if len(pieces) == 1 and (piece.row_start, piece.row_stop) == (0, q.size(2)):
                return part  # one call covered every row: its result is the partial
            merge_into(Partial(*(t[:, :, piece.rows] for t in result)), part)
        return result

    def backward(
        self, q: Tensor, k: Tensor, v: Tensor, dout: Tensor, row_max: Tensor, row_log_sum: Tensor, delta: Tensor,
        visibility: Visibility, scale: float, grad_key: Tensor, grad_value: Tensor,
    ) -> Tensor:
        batch, heads, num_kv_heads = q.size(0), q.size(1), k.size(1)
        q, k, v = q.float(), expand_kv_heads(k.float(), heads), expand_kv_heads(v.float(), heads)
        dout = dout.float()
        out = _output_with_delta(dout, delta)
        # The kernel recomputes p = exp(s - lse): a row with no key anywhere (row_max = -inf) must give p = 0.
        lse = torch.where(torch.isneginf(row_max), torch.full_like(row_max, float("inf")), log_sum_exp(finite_max(row_max), row_log_sum))
        dq = torch.zeros_like(q)
        dk = torch.zeros_like(k)
        dv = torch.zeros_like(v)
        for piece in _pieces(visibility):
            r, c = piece.rows, piece.keys
            part_dq, part_dk, part_dv = _flash_backward(
                dout[:, :, r], q[:, :, r], k[:, :, c], v[:, :, c], out[:, :, r], lse[:, :, r], 0.0, piece.kind == "causal",
                attn_mask=_bias(_attend(visibility, piece, batch)), scale=scale,
            )
            dq[:, :, r] += part_dq
            dk[:, :, c] += part_dk
            dv[:, :, c] += part_dv
        grad_key.add_(reduce_kv_heads(dk, num_kv_heads))
        grad_value.add_(reduce_kv_heads(dv, num_kv_heads))
        return dq
