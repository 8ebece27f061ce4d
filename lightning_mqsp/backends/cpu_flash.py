"""CPU backend on aten's fused flash-attention kernel (``_scaled_dot_product_flash_attention_for_cpu``).

The kernel tiles the score map itself and returns the log-sum-exp, so no M x N block is ever
allocated. It knows only two masks: none, and "top-left" causal (row i sees keys 0..i). A causal
mask by *global* positions is therefore cut into pieces it does understand: query rows and keys
are split into runs of consecutive positions, and each (query run, key run) pair is either
invisible (skipped), fully visible (no mask), or visible up to a diagonal, which after trimming
both sides to start at the same position is exactly top-left causal. The pieces' partial results
are merged by log-sum-exp, like the ranks' partials are.

Inputs are computed in float32 so that partial outputs and their merge are exact to float32.
Dropout needs the counter-based mask, which this kernel cannot take: ``supports`` says so and
``backend="auto"`` falls back to the reference backend.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_mqsp.backends import AttentionMask, expand_kv_heads, reduce_kv_heads

_flash_forward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


@dataclass(frozen=True)
class _Piece:
    """Rows [row_start, row_stop) attend keys [key_start, key_stop), causally (top-left) or fully."""

    row_start: int
    row_stop: int
    key_start: int
    key_stop: int
    causal: bool


def _runs(positions: Tensor) -> list[tuple[int, int, int]]:
    """(start index, stop index, first position) of each run of consecutive positions."""
    breaks = (torch.nonzero(positions.diff() != 1).flatten() + 1).tolist()
    starts = [0, *breaks]
    stops = [*breaks, positions.numel()]
    firsts = positions[starts].tolist()
    return list(zip(starts, stops, firsts))


def _pieces(mask: AttentionMask, num_rows: int, num_keys: int) -> list[_Piece]:
    if not mask.causal:
        return [_Piece(0, num_rows, 0, num_keys, False)]
    pieces = []
    for row_start, row_stop, row_pos in _runs(mask.query_positions):
        last_row_pos = row_pos + (row_stop - row_start) - 1
        for key_start, key_stop, key_pos in _runs(mask.key_positions):
            if key_pos > last_row_pos:
                continue  # every key of the run lies after every row: invisible
            diagonal_pos = max(row_pos, key_pos)
            if diagonal_pos > key_pos:  # keys before the first row's position: seen by every row
                full_stop = min(key_stop, key_start + (diagonal_pos - key_pos))
                pieces.append(_Piece(row_start, row_stop, key_start, full_stop, False))
            diagonal_key = key_start + (diagonal_pos - key_pos)
            if diagonal_key < key_stop:  # rows and keys both starting at diagonal_pos: top-left causal
                pieces.append(_Piece(row_start + (diagonal_pos - row_pos), row_stop, diagonal_key, key_stop, True))
    return pieces


def _is_whole_block(pieces: list[_Piece], num_rows: int, num_keys: int) -> bool:
    """One call covers the block (no causal diagonal): use the kernel's results as they are."""
    return pieces == [_Piece(0, num_rows, 0, num_keys, False)]


def _padding_bias(mask: AttentionMask, piece: _Piece) -> Tensor | None:
    """Additive [B, 1, 1, n] mask (0 or -inf) for the piece's keys; broadcast by the kernel, not copied."""
    if mask.key_padding_mask is None:
        return None
    attend = mask.key_padding_mask[:, piece.key_start : piece.key_stop]
    bias = torch.zeros(attend.shape, dtype=torch.float32, device=attend.device).masked_fill_(~attend, float("-inf"))
    return bias[:, None, None, :]


def _rows_without_keys(mask: AttentionMask, piece: _Piece) -> Tensor | None:
    """Bool [B, 1, rows]: rows of the piece whose every visible key is padding (the kernel leaves
    lse = 0 there, which must read -inf)."""
    if mask.key_padding_mask is None:
        return None
    attend = mask.key_padding_mask[:, piece.key_start : piece.key_stop]
    rows = piece.row_stop - piece.row_start
    if not piece.causal:
        return (~attend.any(dim=1)).view(-1, 1, 1).expand(-1, 1, rows)
    seen = attend.cummax(dim=1).values  # seen[b, j]: some key <= j attends
    last_key = torch.arange(rows, device=attend.device).clamp(max=attend.size(1) - 1)
    return (~seen[:, last_key]).view(-1, 1, rows)


def merge_into(out: Tensor, lse: Tensor, part_out: Tensor, part_lse: Tensor) -> None:
    """out, lse <- the exact softmax merge of (out, lse) with (part_out, part_lse), in place."""
    merged = torch.logaddexp(lse, part_lse)
    finite = torch.where(torch.isneginf(merged), torch.zeros_like(merged), merged)
    out.mul_(torch.exp(lse - finite).unsqueeze(-1)).add_(part_out * torch.exp(part_lse - finite).unsqueeze(-1))
    lse.copy_(merged)


def _output_with_delta(dout: Tensor, delta: Tensor) -> Tensor:
    """A stand-in for the global output O, whose only use in the kernel's backward is
    delta = rowsum(dout * O): dout * delta / |dout|^2 has exactly that row sum, so the rows'
    outputs need not travel between ranks. Rows with dout = 0 have delta = 0 and get 0."""
    norm = (dout * dout).sum(dim=-1, keepdim=True)
    return dout * torch.where(norm > 0, delta.unsqueeze(-1) / norm, torch.zeros_like(norm))


class CpuFlashBackend:
    name = "cpu_flash"

    def supports(self, q: Tensor, mask: AttentionMask) -> str | None:
        if q.device.type != "cpu":
            return f"it runs on CPU tensors only, got {q.device.type}"
        if mask.dropout_p > 0.0:
            return "attention dropout needs the counter-based mask of the 'reference' or 'triton' backend"
        return None

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask, scale: float) -> tuple[Tensor, Tensor]:
        batch, heads, rows, _ = q.shape
        q, k, v = q.float(), expand_kv_heads(k.float(), heads), expand_kv_heads(v.float(), heads)
        pieces = _pieces(mask, rows, k.size(2))
        if _is_whole_block(pieces, rows, k.size(2)):
            out, lse = _flash_forward(q, k, v, 0.0, False, attn_mask=_padding_bias(mask, pieces[0]), scale=scale)
            empty = _rows_without_keys(mask, pieces[0])
            return out, lse if empty is None else lse.masked_fill(empty, float("-inf"))
        out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        lse = torch.full((batch, heads, rows), float("-inf"), dtype=torch.float32, device=q.device)
        for piece in pieces:
            r, c = slice(piece.row_start, piece.row_stop), slice(piece.key_start, piece.key_stop)
            part_out, part_lse = _flash_forward(
                q[:, :, r], k[:, :, c], v[:, :, c], 0.0, piece.causal, attn_mask=_padding_bias(mask, piece), scale=scale
            )
            empty = _rows_without_keys(mask, piece)
            if empty is not None:
                part_lse = part_lse.masked_fill(empty, float("-inf"))
            merge_into(out[:, :, r], lse[:, :, r], part_out, part_lse)
        return out, lse

    def backward(
        self, q: Tensor, k: Tensor, v: Tensor, dout: Tensor, lse: Tensor, delta: Tensor, mask: AttentionMask, scale: float,
    ) -> tuple[Tensor, Tensor, Tensor]:
        heads, num_kv_heads = q.size(1), k.size(1)
        q, k, v = q.float(), expand_kv_heads(k.float(), heads), expand_kv_heads(v.float(), heads)
        dout = dout.float()
        out = _output_with_delta(dout, delta)
        # The kernel recomputes p = exp(s - lse): a row with no key anywhere (lse = -inf) must give p = 0.
        lse = torch.where(torch.isneginf(lse), torch.full_like(lse, float("inf")), lse)
        pieces = _pieces(mask, q.size(2), k.size(2))
        if _is_whole_block(pieces, q.size(2), k.size(2)):
            dq, dk, dv = _flash_backward(dout, q, k, v, out, lse, 0.0, False, attn_mask=_padding_bias(mask, pieces[0]), scale=scale)
            return dq, reduce_kv_heads(dk, num_kv_heads), reduce_kv_heads(dv, num_kv_heads)
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for piece in pieces:
            r, c = slice(piece.row_start, piece.row_stop), slice(piece.key_start, piece.key_stop)
            part_dq, part_dk, part_dv = _flash_backward(
                dout[:, :, r], q[:, :, r], k[:, :, c], v[:, :, c], out[:, :, r], lse[:, :, r], 0.0, piece.causal,
                attn_mask=_padding_bias(mask, piece), scale=scale,
            )
            dq[:, :, r] += part_dq
            dk[:, :, c] += part_dk
            dv[:, :, c] += part_dv
        return dq, reduce_kv_heads(dk, num_kv_heads), reduce_kv_heads(dv, num_kv_heads)
