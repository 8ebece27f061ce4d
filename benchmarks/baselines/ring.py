"""Ring attention with online softmax (ring-flash-attention, PyTorch ``context_parallel`` style).

Forward: K and V (one packed buffer) travel around the ring; each block is attended with aten's
CPU flash kernel and folded into a running float32 (out, lse). No score block outlives a call.
Backward: the blocks travel around again, and the flash backward is fed the *global* out and
lse, so each call yields exactly this block's share of dK and dV. Those float32 accumulators
travel with the blocks and arrive back at their owner after one more shift.
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
    ring_blocks,
    ring_shift,
)

#: Local-shard-sized buffers at the peak beyond inputs and gradients: the packed K/V block in hand
#: and the one arriving (2 x 2), the travelling dK/dV accumulator and the one arriving (2 x 2),
#: the saved out and the kernel's partial dq/dk/dv.
SHARD_BUFFERS_AT_PEAK = 12


class RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, group: ProcessGroup | None, scale: float) -> Tensor:  # type: ignore[override]
        merged = empty_partial(q.shape, torch.float32, q.device)
        for _, kv in ring_blocks(torch.stack([k, v]), group):
            out, lse = flash_forward(q, kv[0], kv[1], scale)
            merge_into(merged, Partial(out, lse, torch.zeros_like(lse)))
        lse = log_sum_exp(merged.row_max, merged.row_log_sum)
        ctx.group, ctx.scale = group, scale
        result = merged.out.to(q.dtype)
        ctx.save_for_backward(q, k, v, result, lse)  # the kernel's backward takes out in the inputs' dtype
        return result

    @staticmethod
    def backward(ctx, dout: Tensor) -> tuple[Tensor, Tensor, Tensor, None, None]:  # type: ignore[override]
        q, k, v, out, lse = ctx.saved_tensors
        dout = dout.contiguous()
        grad_q = torch.zeros_like(out, dtype=torch.float32)
        grad_kv = torch.zeros((2, *k.shape), dtype=torch.float32)  # the accumulator of the block in hand
        arriving = None
        for _, kv in ring_blocks(torch.stack([k, v]), ctx.group):
            part_dq, part_dk, part_dv = flash_backward(dout, q, kv[0], kv[1], out, lse, ctx.scale)
            grad_q += part_dq
            if arriving is not None:
                grad_kv = arriving.wait()
            grad_kv[0] += part_dk
            grad_kv[1] += part_dv
            # After P shifts in all, every accumulator is back at the rank that owns its keys.
            arriving = ring_shift(grad_kv, ctx.group)
        assert arriving is not None
        grad_kv = arriving.wait()
        return grad_q.to(q.dtype), grad_kv[0].to(k.dtype), grad_kv[1].to(v.dtype), None, None


def attention(q: Tensor, k: Tensor, v: Tensor, group: ProcessGroup | None) -> Tensor:
    return RingAttention.apply(q, k, v, group, default_scale(q))


def communication_bytes(shape: Shape) -> dict[str, int]:
    """Packed K/V around the ring in forward and again in backward ((P-1) shifts each), and the
    float32 dK/dV accumulators P shifts in backward."""
    p, shard = shape.world_size, shape.local_elements() * shape.itemsize
    if p == 1:
        return {}
    return {"send_recv": 2 * 2 * (p - 1) * shard + 2 * p * shape.local_elements() * 4}


def peak_memory_bytes(shape: Shape) -> int:
    return inputs_and_grads_bytes(shape) + SHARD_BUFFERS_AT_PEAK * shape.local_elements() * shape.itemsize


METHOD = Method("ring", attention, communication_bytes, peak_memory_bytes)
