"""The exact full-sequence loss from per-token losses on this rank's shard.

Each rank holds some tokens of every sequence, so a mean over its local tokens is not the loss
of the sequence. :func:`sequence_parallel_loss` sums the token losses and the count of valid
tokens over the sequence-parallel group and divides, so **every rank of the group returns the
same full-sequence loss**. The sum is an all-reduce whose backward is again an all-reduce (sum):
each rank then back-propagates P times its share, and since DDP averages gradients over all
dp x sp ranks, the averaged gradient is exactly the data-parallel mean of the full-sequence
gradients (``docs/design.md``, "Loss").

Outside a sequence-parallel context (one process, plain DDP) the helpers are the ordinary
mean over valid tokens, so one LightningModule runs unchanged under every strategy.

Causal language models: :class:`~lightning_mqsp.MQSPStrategy` shifts ``labels`` left by one
before sharding, so ``labels[t]`` is already the target of ``logits[t]``. Do not pass the labels
to a Hugging Face ``*ForCausalLM`` (it would shift them again, and average over local tokens);
compute the loss with :func:`causal_lm_cross_entropy` on the logits instead, which shifts the
labels itself only when no strategy did, so one LightningModule is right under every strategy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_mqsp import comm
from lightning_mqsp.adapters import active_context
from lightning_mqsp.comm import ProcessGroup
from lightning_mqsp.sharding import IGNORE_INDEX, shift_left


def _sequence_group(group: ProcessGroup | None) -> tuple[bool, ProcessGroup | None]:
    """Whether to reduce, and over which group: ``group`` if given, else the active strategy's."""
    if group is not None:
        return True, group
    context = active_context()
    if context is not None and context.world_size > 1:
        return True, context.group  # None here is the default group
    return False, None


def sequence_parallel_loss(token_losses: Tensor, valid: Tensor, group: ProcessGroup | None = None) -> Tensor:
    """Sum of ``token_losses`` over the valid tokens of the whole sequence, divided by their count.

    Args:
        token_losses: per-token losses of this rank's shard, any shape.
        valid: bool mask of the same shape, True where the token counts.
        group: the sequence-parallel group; default: the active MQSP strategy's (none outside one).

    Returns:
        A scalar, identical on every rank of the group (0 if no token is valid anywhere).
    """
    total = torch.where(valid, token_losses, torch.zeros_like(token_losses)).sum()
    count = valid.sum().to(total.dtype)
    reduce, group = _sequence_group(group)
    if reduce:
        total = comm.differentiable_all_reduce(total, group, "the sequence-parallel loss's sum")
        count = comm.all_reduce(count.detach(), group, "the sequence-parallel loss's token count")
    return total / count.clamp(min=1)


def sequence_parallel_cross_entropy(
    logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX, group: ProcessGroup | None = None,
) -> Tensor:
    """Token-level cross entropy over the full sequence: logits [..., V], labels [...] (no shift here).

    Equals ``F.cross_entropy(full_logits.flatten(0, -2), full_labels.flatten(), ignore_index=...)``
    of the unsharded sequence on every rank of the group.
    """
    flat_logits = logits.flatten(0, -2)
    if flat_logits.dtype in (torch.float16, torch.bfloat16):  # the log-softmax over the vocabulary wants float32
        flat_logits = flat_logits.float()
    token_losses = F.cross_entropy(flat_logits, labels.flatten(), ignore_index=ignore_index, reduction="none")
    return sequence_parallel_loss(token_losses, labels.flatten() != ignore_index, group)


def causal_lm_cross_entropy(
    logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX, group: ProcessGroup | None = None,
) -> Tensor:
    """Next-token cross entropy over the full sequence, from labels as the data gives them ([B, S], unshifted).

    Under :class:`~lightning_mqsp.MQSPStrategy` the labels were shifted before sharding; anywhere
    else (one device, plain DDP) they are shifted here. Equals the Hugging Face causal-LM loss.
    """
    context = active_context()
    if context is None or not context.labels_shifted:
        labels = shift_left(labels)
    return sequence_parallel_cross_entropy(logits, labels, ignore_index, group)
