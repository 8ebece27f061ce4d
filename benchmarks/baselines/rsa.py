"""Ring Self-Attention (RSA), as in ColossalAI's sequence parallelism (Li et al., 2021).

Keys travel around the ring to fill this rank's l x L row block of the score map (RingQK),
softmax runs on the whole block, then values travel around the ring to multiply it (RingAV).
The block is materialised, so per-rank memory is quadratic: l x L = L^2 / P.

Backward follows ColossalAI: the query gradient (RingQK) and the probabilities' gradient
(RingAV) ring K and V around again; the key and value gradients are computed for all L rows on
every rank and summed onto their owners. ColossalAI does that with an all-reduce followed by a
slice; a reduce-scatter moves half the bytes for the same result, and that is what runs here.
Causal: the block's scores of keys after the row's global position are set to -inf before the
softmax (ColossalAI's attention mask, applied to the assembled block).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .common import (
    Method,
    ProcessGroup,
    Shape,
    causal_mask,
    default_scale,
    inputs_and_grads_bytes,
    rank_and_size,
    ring_blocks,
    scatter_sequence_sum,
)

#: l x L float32 maps alive at the peak (measured with MemTracker): in backward, the saved
#: probabilities, their gradient and the score gradient.
SCORE_MAPS_AT_PEAK = 3


def _block(x: Tensor, owner: int, local_length: int) -> Tensor:
    """The columns of a [B, H, l, L] map that belong to rank ``owner``'s keys."""
    return x[..., owner * local_length : (owner + 1) * local_length]


class RingQK(torch.autograd.Function):
    """scores [B, H, l, L] = q k_all^T * scale, with k_all assembled block by block around the ring."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, group: ProcessGroup | None, scale: float) -> Tensor:  # type: ignore[override]
        _, size = rank_and_size(group)
        local_length = k.size(2)
        scores = q.new_empty(*q.shape[:3], size * local_length)
        for owner, k_block in ring_blocks(k, group):
            _block(scores, owner, local_length).copy_(q @ k_block.transpose(-1, -2))
        scores.mul_(scale)
        ctx.group, ctx.scale = group, scale
        ctx.save_for_backward(q, k)
        return scores

    @staticmethod
    def backward(ctx, grad_scores: Tensor) -> tuple[Tensor, Tensor, None, None]:  # type: ignore[override]
        q, k = ctx.saved_tensors
        local_length = k.size(2)
        grad_q = torch.zeros_like(q)
        for owner, k_block in ring_blocks(k, ctx.group):
            grad_q += _block(grad_scores, owner, local_length) @ k_block
        grad_k_all = grad_scores.transpose(-1, -2) @ q  # [B, H, L, D]: every rank's keys
        return grad_q * ctx.scale, scatter_sequence_sum(grad_k_all, ctx.group) * ctx.scale, None, None


class RingAV(torch.autograd.Function):
    """out [B, H, l, D] = probs v_all, with v_all visiting block by block around the ring."""

    @staticmethod
    def forward(ctx, probs: Tensor, v: Tensor, group: ProcessGroup | None) -> Tensor:  # type: ignore[override]
        local_length = v.size(2)
        out = torch.zeros(*probs.shape[:3], v.size(-1), dtype=v.dtype)
        for owner, v_block in ring_blocks(v, group):
            out += _block(probs, owner, local_length) @ v_block
        ctx.group = group
        ctx.save_for_backward(probs, v)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, Tensor, None]:  # type: ignore[override]
        probs, v = ctx.saved_tensors
        local_length = v.size(2)
        grad_probs = torch.empty_like(probs)
        for owner, v_block in ring_blocks(v, ctx.group):
            _block(grad_probs, owner, local_length).copy_(grad_out @ v_block.transpose(-1, -2))
        grad_v_all = probs.transpose(-1, -2) @ grad_out  # [B, H, L, D]: every rank's values
        return grad_probs, scatter_sequence_sum(grad_v_all, ctx.group), None


def attention(q: Tensor, k: Tensor, v: Tensor, group: ProcessGroup | None, causal: bool = False) -> Tensor:
    scores = RingQK.apply(q, k, group, default_scale(q))
    if causal:
        scores = scores.masked_fill(~causal_mask(q.size(2), *rank_and_size(group)), float("-inf"))
    return RingAV.apply(torch.softmax(scores, dim=-1), v, group)


def communication_bytes(shape: Shape) -> dict[str, int]:
    """K and V ring around once each in forward and again in backward ((P-1) shards per ring);
    dK and dV of all L rows are reduce-scattered."""
    p, shard = shape.world_size, shape.local_elements() * shape.itemsize
    if p == 1:
        return {}
    return {"send_recv": 4 * (p - 1) * shard, "reduce_scatter": 2 * (p - 1) * shard}


def peak_memory_bytes(shape: Shape) -> int:
    full_length_grads = 2 * shape.world_size * shape.local_elements() * shape.itemsize
    maps = SCORE_MAPS_AT_PEAK * shape.score_block_elements() * shape.itemsize
    return inputs_and_grads_bytes(shape) + full_length_grads + maps


METHOD = Method("rsa", attention, communication_bytes, peak_memory_bytes)
