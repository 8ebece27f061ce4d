"""Tensor-parallel attention with sequence parallelism (Megatron-LM 3 style): the map split by heads.

Megatron-LM 3 keeps the activations outside attention sequence-sharded and runs attention
tensor-parallel: each rank owns H/P heads, for which it holds Q, K and V over the *whole*
sequence (after an all-gather of the layer input and a column-parallel projection) and the
full L x L score map of those heads; a row-parallel output projection reduce-scatters the
result back to sequence shards. Given this rank's sequence shard of q, k and v, the same
placement is reached with one all-to-all per tensor, [B, H, l, D] -> [B, H/P, L, D] (the
helpers of :mod:`.ulysses`). The core is the textbook one, composed from autograd ops, so the
H/P x L x L scores and probabilities are materialised; as in Megatron-LM 3's selective
activation recomputation it is checkpointed, so those maps are rebuilt in backward instead of
being kept from forward. Causal: the full-sequence causal mask on the H/P x L x L scores (the
sequence is whole and in order after the all-to-all). Needs H % P == 0.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .common import Method, ProcessGroup, Shape, causal_mask, default_scale, inputs_and_grads_bytes, rank_and_size
from .ulysses import HeadsToSequence, SequenceToHeads
from .ulysses import communication_bytes as ulysses_communication_bytes

#: H/P x L x L float32 maps alive at the peak (in the recomputing backward): the recomputed
#: probabilities, their gradient, the score gradient and softmax backward's temporary.
SCORE_MAPS_AT_PEAK = 4
#: Local-shard-sized buffers beyond inputs and gradients: head-sharded q, k, v, out and their
#: gradients, as in Ulysses.
SHARD_BUFFERS_AT_PEAK = 12


def _attention_core(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool) -> Tensor:
    """softmax(q k^T * scale) v over [B, H/P, L, D], materialising the H/P x L x L map."""
    scores = (q @ k.transpose(-1, -2)) * scale
    if causal:
        scores = scores.masked_fill(~causal_mask(q.size(2), 0, 1), float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def attention(q: Tensor, k: Tensor, v: Tensor, group: ProcessGroup | None, causal: bool = False) -> Tensor:
    _, size = rank_and_size(group)
    if q.size(1) % size != 0:
        raise ValueError(f"Tensor-parallel attention needs the heads ({q.size(1)}) to divide by the ranks ({size}).")
    q_heads, k_heads, v_heads = (SequenceToHeads.apply(x, group) for x in (q, k, v))
    out_heads = checkpoint(_attention_core, q_heads, k_heads, v_heads, default_scale(q), causal, use_reentrant=False)
    return HeadsToSequence.apply(out_heads, group)


def communication_bytes(shape: Shape) -> dict[str, int]:
    """The all-to-alls that place H/P heads of the whole sequence on each rank, and back: four each
    way, (P-1)/P of a shard each (Ulysses' traffic). The recompute reuses the head-sharded inputs
    saved by the checkpoint, so it sends nothing."""
    return ulysses_communication_bytes(shape)


def peak_memory_bytes(shape: Shape) -> int:
    # B x H/P x L x L is the same number of elements as B x H x l x L: score_block_elements.
    maps = SCORE_MAPS_AT_PEAK * shape.score_block_elements() * shape.itemsize
    return inputs_and_grads_bytes(shape) + SHARD_BUFFERS_AT_PEAK * shape.local_elements() * shape.itemsize + maps


METHOD = Method("megatron_sp", attention, communication_bytes, peak_memory_bytes)
