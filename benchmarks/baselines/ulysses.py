"""Ulysses sequence parallelism (DeepSpeed): all-to-all from sequence shards to head shards.

Q, K and V [B, H, l, D] are exchanged so that every rank holds H/P heads over the whole
sequence, [B, H/P, L, D]; local attention runs there on aten's CPU flash kernel, and a last
all-to-all brings the output back to sequence shards. Backward mirrors it. Causal: the local
attention takes the full-sequence causal mask (``is_causal``; the sequence is whole and in
order after the all-to-all, so the shards are contiguous). Needs H % P == 0.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_mqsp import comm

from .common import LocalFlashAttention, Method, ProcessGroup, Shape, default_scale, inputs_and_grads_bytes, rank_and_size

#: Local-shard-sized buffers at the peak beyond inputs and gradients: head-sharded q, k, v, out
#: (saved for backward), the head-sharded output gradient, dq, dk, dv and their return buffers.
SHARD_BUFFERS_AT_PEAK = 12


def sequence_to_heads(x: Tensor, group: ProcessGroup | None) -> Tensor:
    """[B, H, l, D] (this rank's tokens) -> [B, H/P, L, D] (this rank's heads, every token)."""
    _, size = rank_and_size(group)
    per_rank = x.unflatten(1, (size, x.size(1) // size)).movedim(1, 0)  # [P, B, H/P, l, D], slice s -> rank s
    received = comm.all_to_all(per_rank, group).wait()  # slice s: rank s's tokens of my heads
    return received.movedim(0, 2).flatten(2, 3)


def heads_to_sequence(x: Tensor, group: ProcessGroup | None) -> Tensor:
    """[B, H/P, L, D] -> [B, H, l, D], the inverse of :func:`sequence_to_heads`."""
    _, size = rank_and_size(group)
    per_rank = x.unflatten(2, (size, x.size(2) // size)).movedim(2, 0)  # [P, B, H/P, l, D], slice s -> rank s
    received = comm.all_to_all(per_rank, group).wait()  # slice s: my tokens of rank s's heads
    return received.movedim(0, 1).flatten(1, 2)


class SequenceToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group: ProcessGroup | None) -> Tensor:  # type: ignore[override]
        ctx.group = group
        return sequence_to_heads(x, group)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return heads_to_sequence(grad, ctx.group), None


class HeadsToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group: ProcessGroup | None) -> Tensor:  # type: ignore[override]
        ctx.group = group
        return heads_to_sequence(x, group)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return sequence_to_heads(grad, ctx.group), None


def attention(q: Tensor, k: Tensor, v: Tensor, group: ProcessGroup | None, causal: bool = False) -> Tensor:
    _, size = rank_and_size(group)
    if q.size(1) % size != 0:
        raise ValueError(f"Ulysses needs the heads ({q.size(1)}) to divide by the ranks ({size}).")
    q_heads, k_heads, v_heads = (SequenceToHeads.apply(x, group) for x in (q, k, v))
    out_heads = LocalFlashAttention.apply(q_heads, k_heads, v_heads, default_scale(q), causal)
    return HeadsToSequence.apply(out_heads, group)


def communication_bytes(shape: Shape) -> dict[str, int]:
    """Four all-to-alls each way (q, k, v, out forward; dout, dq, dk, dv backward), (P-1)/P of a shard each."""
    p, shard = shape.world_size, shape.local_elements() * shape.itemsize
    if p == 1:
        return {}
    return {"all_to_all": 8 * (p - 1) * shard // p}


def peak_memory_bytes(shape: Shape) -> int:
    return inputs_and_grads_bytes(shape) + SHARD_BUFFERS_AT_PEAK * shape.local_elements() * shape.itemsize


METHOD = Method("ulysses", attention, communication_bytes, peak_memory_bytes)
