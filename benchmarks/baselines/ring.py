"""Ring attention with online softmax (ring-flash-attention, PyTorch ``context_parallel`` style).

Forward: K and V (one packed buffer) travel around the ring; each block is attended with aten's
CPU flash kernel and folded into a running float32 (out, lse). No score block outlives a call.
Backward: the blocks travel around again, and the flash backward is fed the *global* out and
lse, so each call yields exactly this block's share of dK and dV. Those float32 accumulators
travel with the blocks and arrive back at their owner after one more shift.

Causal: zigzag-balanced as in ring-flash-attention's ``zigzag_ring_flash_attn`` (rank r holds
chunks r and 2P-1-r of 2P). Each block is cut to its visible part, which is always one kernel
call: the rank's own block causally (top-left: its positions ascend), a block of a lower rank
whole for its first chunk only (all rows see it, none see its second chunk), and a block of a
higher rank whole for the second chunk of rows only (the first chunk sees none of it).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_mqsp.merge import Partial, empty_partial, log_sum_exp, merge_into

from .common import (
    Method,
    ProcessGroup,
    Shape,
    default_scale,
    flash_backward,
    flash_forward,
    inputs_and_grads_bytes,
    rank_and_size,
    ring_blocks,
    ring_shift,
)

#: Local-shard-sized buffers at the peak beyond inputs and gradients: the packed K/V block in hand
#: and the one arriving (2 x 2), the travelling dK/dV accumulator and the one arriving (2 x 2),
#: the saved out and the kernel's partial dq/dk/dv.
SHARD_BUFFERS_AT_PEAK = 12

_ALL = slice(None)


def _visible(owner: int, rank: int, local_length: int, causal: bool) -> tuple[slice, slice, bool]:
    """(local rows, block keys, top-left causal) of the block of rank ``owner`` that rank ``rank`` attends."""
    if not causal:
        return _ALL, _ALL, False
    half = local_length // 2
    if owner == rank:
        return _ALL, _ALL, True
    if owner < rank:
        return _ALL, slice(0, half), False
    return slice(half, None), _ALL, False


class RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, group: ProcessGroup | None, scale: float, causal: bool) -> Tensor:  # type: ignore[override]
        rank, _ = rank_and_size(group)
        merged = empty_partial(q.shape, torch.float32, q.device)
        for owner, kv in ring_blocks(torch.stack([k, v]), group):
            rows, keys, diagonal = _visible(owner, rank, q.size(2), causal)
            out, lse = flash_forward(q[:, :, rows], kv[0][:, :, keys], kv[1][:, :, keys], scale, diagonal)
            merge_into(Partial(*(t[:, :, rows] for t in merged)), Partial(out, lse, torch.zeros_like(lse)))
        lse = log_sum_exp(merged.row_max, merged.row_log_sum)
        ctx.group, ctx.scale, ctx.causal = group, scale, causal
        result = merged.out.to(q.dtype)
        ctx.save_for_backward(q, k, v, result, lse)  # the kernel's backward takes out in the inputs' dtype
        return result

    @staticmethod
    def backward(ctx, dout: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        q, k, v, out, lse = ctx.saved_tensors
        rank, _ = rank_and_size(ctx.group)
        dout = dout.contiguous()
        grad_q = torch.zeros_like(out, dtype=torch.float32)
        grad_kv = torch.zeros((2, *k.shape), dtype=torch.float32)  # the accumulator of the block in hand
        arriving = None
        for owner, kv in ring_blocks(torch.stack([k, v]), ctx.group):
            rows, keys, diagonal = _visible(owner, rank, q.size(2), ctx.causal)
            part_dq, part_dk, part_dv = flash_backward(
                dout[:, :, rows], q[:, :, rows], kv[0][:, :, keys], kv[1][:, :, keys], out[:, :, rows], lse[:, :, rows],
                ctx.scale, diagonal,
            )
            grad_q[:, :, rows] += part_dq
            if arriving is not None:
                grad_kv = arriving.wait()
            grad_kv[0][:, :, keys] += part_dk
            grad_kv[1][:, :, keys] += part_dv
            # After P shifts in all, every accumulator is back at the rank that owns its keys.
            arriving = ring_shift(grad_kv, ctx.group)
        assert arriving is not None
        grad_kv = arriving.wait()
        return grad_q.to(q.dtype), grad_kv[0].to(k.dtype), grad_kv[1].to(v.dtype), None, None, None


def attention(q: Tensor, k: Tensor, v: Tensor, group: ProcessGroup | None, causal: bool = False) -> Tensor:
    return RingAttention.apply(q, k, v, group, default_scale(q), causal)


def communication_bytes(shape: Shape) -> dict[str, int]:
    """Packed K/V around the ring in forward and again in backward ((P-1) shifts each), and the
    float32 dK/dV accumulators P shifts in backward; causal or not (whole blocks travel)."""
    p, shard = shape.world_size, shape.local_elements() * shape.itemsize
    if p == 1:
        return {}
    return {"send_recv": 2 * 2 * (p - 1) * shard + 2 * p * shape.local_elements() * 4}


def peak_memory_bytes(shape: Shape) -> int:
    return inputs_and_grads_bytes(shape) + SHARD_BUFFERS_AT_PEAK * shape.local_elements() * shape.itemsize


METHOD = Method("ring", attention, communication_bytes, peak_memory_bytes, causal_layout="zigzag")
