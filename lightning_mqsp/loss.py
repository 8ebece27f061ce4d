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

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lightning_mqsp import comm, offload
from lightning_mqsp.adapters import active_context
from lightning_mqsp.backends.triton import triton_input_error
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
    return _full_sequence_mean(total, valid.sum(), group)


def _full_sequence_mean(total: Tensor, count: Tensor, group: ProcessGroup | None) -> Tensor:
    """This rank's loss sum and token count -> the group's sum over the group's count (0 if no token counts)."""
    count = count.to(total.dtype)
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
    token_losses = F.cross_entropy(_at_least_float32(logits.flatten(0, -2)), labels.flatten(), ignore_index=ignore_index, reduction="none")
    return sequence_parallel_loss(token_losses, labels.flatten() != ignore_index, group)


def causal_lm_cross_entropy(
    logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX, group: ProcessGroup | None = None,
) -> Tensor:
    """Next-token cross entropy over the full sequence, from labels as the data gives them ([B, S], unshifted).

    Under :class:`~lightning_mqsp.MQSPStrategy` the labels were shifted before sharding; anywhere
    else (one device, plain DDP) they are shifted here. Equals the Hugging Face causal-LM loss.
    """
    return sequence_parallel_cross_entropy(logits, _next_token_labels(labels), ignore_index, group)


def _next_token_labels(labels: Tensor) -> Tensor:
    """The target of each position: the labels as they are if the strategy shifted them before sharding, else shifted here."""
    context = active_context()
    return labels if context is not None and context.labels_shifted else shift_left(labels)


def _at_least_float32(logits: Tensor) -> Tensor:
    """The log-softmax over the vocabulary wants float32: half-precision logits are upcast, float64 stay."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def _chunk_loss_sum(head: Callable[[Tensor], Tensor], hidden_states: Tensor, labels: Tensor, ignore_index: int) -> Tensor:
    return F.cross_entropy(_at_least_float32(head(hidden_states)), labels, ignore_index=ignore_index, reduction="sum")


#: ``kernel`` of the chunked losses: "torch" (chunks of logits, checkpointed), "liger" (liger-kernel's fused linear
#: cross entropy over the whole shard), "auto" (liger on CUDA where it holds no more memory than the chunks).
LOSS_KERNELS = ("auto", "torch", "liger")


def _fused_linear_cross_entropy() -> Callable[..., Tensor]:
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError as missing:
        raise ImportError(
            "kernel='liger' needs liger-kernel: `pip install liger-kernel` (the Makefile installs it), or pass kernel='torch'."
        ) from missing
    return liger_fused_linear_cross_entropy


def _liger_is_installed() -> bool:
    try:
        _fused_linear_cross_entropy()
    except ImportError:
        return False
    return True


def _fused_loss_sum(head: nn.Linear, hidden_states: Tensor, labels: Tensor, ignore_index: int) -> Tensor:
    """The sum of the token losses by liger-kernel's fused linear cross entropy, computed *as the head's forward*: the
    hooks on the head run around it as around its own forward (FSDP2's, which gathers its sharded weight before and
    reduce-scatters the weight's gradient after backward). Weight gradients accumulate in float32."""
    fused = _fused_linear_cross_entropy()

    def forward(hidden: Tensor) -> Tensor:
        return fused(hidden, head.weight, labels, bias=head.bias, ignore_index=ignore_index, reduction="sum",
                     accum_dtype=torch.float32)

    own_forward = head.__dict__.get("forward")
    head.forward = forward  # type: ignore[method-assign,assignment]
    try:
        return head(hidden_states)
    finally:
        if own_forward is None:
            del head.forward
        else:
            head.forward = own_forward  # type: ignore[method-assign]


def _loss_kernel(kernel: str, hidden_states: Tensor, head: Callable[[Tensor], Tensor], tokens: int, chunk_size: int) -> str:
    """"torch" or "liger" for ``kernel``. "auto": liger on CUDA for a linear head when it is installed and its
    memory, the shard's input gradient and a block of logits as large as the shard's hidden states (liger's own
    chunking) plus a float32 weight gradient, is no more than a chunk's float32 and input-dtype logits."""
    if kernel not in LOSS_KERNELS:
        raise ValueError(f"kernel must be one of {LOSS_KERNELS}, got {kernel!r}.")
    if kernel == "liger":
        if not isinstance(head, nn.Linear):
            raise ValueError(
                f"kernel='liger' fuses the output head's matmul into the loss and needs the head as an nn.Linear (its weight "
                f"and bias), got {type(head).__name__}; pass kernel='torch' for any other head."
            )
        _fused_linear_cross_entropy()
        error = triton_input_error(hidden_states)
        if error is not None:  # liger's kernels are Triton's: on a CPU they would fail with "0 active drivers"
            raise ValueError(f"kernel='liger' runs Triton kernels, which cannot take these hidden states: {error}; "
                             "pass kernel='torch'.")
        return "liger"
    if kernel == "torch" or not (hidden_states.is_cuda and isinstance(head, nn.Linear) and _liger_is_installed()
                                 and triton_input_error(hidden_states) is None):
        return "torch"
    vocabulary, width = head.weight.shape
    size = hidden_states.element_size()
    fused_bytes = 2 * tokens * width * size + vocabulary * width * 4
    chunk_bytes = min(chunk_size, tokens) * vocabulary * (size + 4)
    return "liger" if fused_bytes <= chunk_bytes else "torch"


def chunked_cross_entropy(
    hidden_states: Tensor, head: Callable[[Tensor], Tensor], labels: Tensor, chunk_size: int = 4096,
    ignore_index: int = IGNORE_INDEX, group: ProcessGroup | None = None, kernel: str = "auto",
) -> Tensor:
    """``sequence_parallel_cross_entropy(head(hidden_states), labels)`` without the logits of every token at once.

    The output head (e.g. a model's ``lm_head``, or ``get_output_embeddings()``) runs on ``chunk_size``
    tokens of this rank's shard at a time, in forward and again, one chunk at a time, in backward
    (activation checkpointing per chunk): the [tokens, vocabulary] logits never exist for more than
    one chunk, which at long sequences and 128k vocabularies is the largest tensor of a step. With
    ``kernel="liger"`` (or "auto" on CUDA where it fits, see :data:`LOSS_KERNELS`) liger-kernel's fused
    linear cross entropy computes it instead, over the whole shard at once (it chunks by itself).

    Args:
        hidden_states: the final hidden states of this rank's tokens, [..., hidden].
        head: maps [n, hidden] to [n, vocabulary] logits; an ``nn.Linear`` for the fused kernel.
        labels: [...], the targets (already aligned: no shift here; see :func:`chunked_causal_lm_cross_entropy`).
        chunk_size: tokens per chunk.
        kernel: "auto", "torch" or "liger".
    """
    if not (isinstance(chunk_size, int) and chunk_size >= 1):
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}.")
    flat_hidden, flat_labels = hidden_states.flatten(0, -2), labels.flatten()
    count = (flat_labels != ignore_index).sum()
    # With offload_activations, what the loss saves stays on the device: backward needs it first, so offloaded it would
    # come straight back, and at the end of forward it was a hidden state a token more on the host, at the host's peak.
    with offload.kept_on_device():
        if _loss_kernel(kernel, hidden_states, head, flat_labels.numel(), chunk_size) == "liger":
            assert isinstance(head, nn.Linear)
            return _full_sequence_mean(_fused_loss_sum(head, flat_hidden, flat_labels, ignore_index), count, group)
        total = hidden_states.new_zeros((), dtype=torch.float64 if hidden_states.dtype == torch.float64 else torch.float32)
        for start in range(0, flat_labels.numel(), chunk_size):
            chunk = slice(start, start + chunk_size)
            total = total + checkpoint(_chunk_loss_sum, head, flat_hidden[chunk], flat_labels[chunk], ignore_index,
                                       use_reentrant=False)
        return _full_sequence_mean(total, count, group)


def chunked_causal_lm_cross_entropy(
    hidden_states: Tensor, head: Callable[[Tensor], Tensor], labels: Tensor, chunk_size: int = 4096,
    ignore_index: int = IGNORE_INDEX, group: ProcessGroup | None = None, kernel: str = "auto",
) -> Tensor:
    """:func:`causal_lm_cross_entropy` of ``head(hidden_states)``, computed chunk by chunk (see :func:`chunked_cross_entropy`)."""
    return chunked_cross_entropy(hidden_states, head, _next_token_labels(labels), chunk_size, ignore_index, group, kernel)
