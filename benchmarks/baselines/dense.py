"""Dense attention: all-gather K and V, materialise this rank's l x L rows of the score map.

What sequence sharding without a sequence-parallel attention does: each rank gathers every key
and value and runs plain softmax attention for its own queries, composed from autograd ops, so
autograd keeps the l x L probabilities for backward and backward builds two more l x L maps.
Causal: the scores of keys after the row's global position are set to -inf before the softmax.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .common import GatherSequence, Method, ProcessGroup, Shape, causal_mask, default_scale, inputs_and_grads_bytes, rank_and_size

#: l x L float32 maps alive at the peak (measured with MemTracker): in backward, the saved
#: probabilities, their gradient and the score gradient.
SCORE_MAPS_AT_PEAK = 3


def attention(q: Tensor, k: Tensor, v: Tensor, group: ProcessGroup | None, causal: bool = False) -> Tensor:
    keys, values = GatherSequence.apply(k, group), GatherSequence.apply(v, group)
    scores = (q @ keys.transpose(-1, -2)) * default_scale(q)
    if causal:
        scores = scores.masked_fill(~causal_mask(q.size(2), *rank_and_size(group)), float("-inf"))
    return torch.softmax(scores, dim=-1) @ values


def communication_bytes(shape: Shape) -> dict[str, int]:
    """Forward all-gathers K and V ((P-1) shards each); backward reduce-scatters dK and dV of all L rows."""
    p, shard = shape.world_size, shape.local_elements() * shape.itemsize
    if p == 1:
        return {}
    return {"all_gather": 2 * (p - 1) * shard, "reduce_scatter": 2 * (p - 1) * shard}


def peak_memory_bytes(shape: Shape) -> int:
    gathered = 4 * shape.world_size * shape.local_elements() * shape.itemsize  # K, V and their full-length gradients
    maps = SCORE_MAPS_AT_PEAK * shape.score_block_elements() * shape.itemsize
    return inputs_and_grads_bytes(shape) + gathered + maps


METHOD = Method("dense", attention, communication_bytes, peak_memory_bytes)
