"""Plain PyTorch models: ``F.scaled_dot_product_attention`` routed to ``mqsp_attention``.

While the strategy runs a step or its backward, :class:`RouteScaledDotProductAttention` puts a
routing function in place of ``torch.nn.functional.scaled_dot_product_attention``, so every call
made through the module (``F.scaled_dot_product_attention(...)``) is computed over the whole
sequence with MQSP, without editing the model. The call must use [B, H, S_local, D] tensors and
a mask MQSP can keep local: ``None``, or a key-padding mask broadcast over heads and queries
([B, 1, 1, S] or [B, S]; bool True = attend, or additive 0 / -inf).

Why a swapped module attribute rather than a ``TorchFunctionMode``: the autograd engine runs
activation checkpointing's recompute with no function mode active, so a mode would route the
forward but not the recompute, and reentrant checkpointing would then silently compute local
attention in backward. The swapped attribute is seen by forward and recompute alike. A model
that imported the function by name (``from torch.nn.functional import
scaled_dot_product_attention``) is not routed, in either: the strategy's attention audit fails
its first step with a message that says so.
"""

from __future__ import annotations

import functools
from types import TracebackType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_mqsp.adapters import SequenceParallelContext


def key_padding_mask_from_sdpa(attn_mask: Tensor | None, batch: int, local_length: int) -> Tensor | None:
    """The [B, S_local] bool key mask that an SDPA ``attn_mask`` expresses, or a clear error."""
    if attn_mask is None:
        return None
    if attn_mask.shape[-1] != local_length or attn_mask.numel() not in (local_length, batch * local_length):
        raise ValueError(
            f"MQSP can route scaled_dot_product_attention only with a key-padding mask ([B, 1, 1, S] or [B, S] with "
            f"S = {local_length} local keys), got attn_mask of shape {tuple(attn_mask.shape)}. Pass causal masking "
            "as `is_causal=True` and padding as a key mask; a full [S, S] mask cannot be split across ranks."
        )
    keep = attn_mask if attn_mask.dtype == torch.bool else attn_mask == 0
    if attn_mask.dtype != torch.bool and not bool(torch.isneginf(attn_mask[~keep]).all()):
        raise ValueError("MQSP routes additive SDPA masks only when they hold 0 (attend) or -inf (masked); pass a bool mask instead.")
    return keep.reshape(-1, local_length).expand(batch, local_length)


def routed_sdpa(
    context: SequenceParallelContext, query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None,
    dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False,
) -> Tensor:
    """``F.scaled_dot_product_attention``'s signature, computed over the whole sequence by MQSP."""
    if query.dim() != 4:
        raise ValueError(
            f"MQSP routes scaled_dot_product_attention on 4-D [B, H, S, D] tensors only, got query of shape {tuple(query.shape)}."
        )
    if key.size(1) != query.size(1) and not enable_gqa:
        raise ValueError("scaled_dot_product_attention got fewer key/value heads than query heads without enable_gqa=True.")
    batch, _, local_length, _ = query.shape
    return context.attention(
        query, key, value, key_padding_mask=key_padding_mask_from_sdpa(attn_mask, batch, local_length),
        causal=is_causal, scale=scale, dropout_p=dropout_p,
    )


class RouteScaledDotProductAttention:
    """Inside ``with RouteScaledDotProductAttention(context):``, ``F.scaled_dot_product_attention`` runs MQSP over
    ``context``'s group (nested uses restore what they found)."""

    def __init__(self, context: SequenceParallelContext) -> None:
        self.context = context
        self._replaced: list[Any] = []

    def __enter__(self) -> RouteScaledDotProductAttention:
        original = F.scaled_dot_product_attention

        @functools.wraps(original)
        def routed(*args: Any, **kwargs: Any) -> Tensor:
            return routed_sdpa(self.context, *args, **kwargs)

        self._replaced.append(original)
        F.scaled_dot_product_attention = routed
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None) -> None:
        F.scaled_dot_product_attention = self._replaced.pop()
