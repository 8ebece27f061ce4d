"""What the kernels are told about visibility, from the custom ops' arguments.

The ops take plain values (custom-op schemas have no room for a dataclass or an optional float):
a window side of -1 is unbounded, a softcap of 0.0 is none. Everything here is metadata: no
tensor value is read on the host, so a call never waits for the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
from torch import Tensor

from lightning_mqsp.dropout import keep_threshold


def block_head_dim(head_dim: int) -> int:
    """The tile width along the head dimension: a power of two, and at least 16 for tl.dot."""
    return max(16, triton.next_power_of_2(head_dim))


def same_strides(*tensors: Tensor) -> bool:
    """Whether tensors of one shape are laid out alike, so that one set of strides addresses each (a dimension of size
    one has no stride that matters: its index is always 0)."""
    first = tensors[0]
    return all(t.shape == first.shape and all(a == b for a, b, n in zip(t.stride(), first.stride(), first.shape) if n > 1)
               for t in tensors)


def dot_precision(dtype: torch.dtype) -> str:
    """float32 inputs are multiplied in full precision (not TF32): the partials must be exact to fp32."""
    return "ieee" if dtype == torch.float32 else "tf32"


@dataclass(frozen=True)
class KernelVisibility:
    """The visibility arguments every kernel takes, in the kernels' order."""

    query_positions: Tensor
    key_positions: Tensor
    key_padding_mask: Tensor | None
    query_documents: Tensor | None
    key_documents: Tensor | None
    dropout_seed: Tensor | None
    query_segments: int
    window_left: int  # -1: unbounded
    window_right: int
    softcap: float  # 0.0: none
    dropout_p: float

    @property
    def pointers(self) -> tuple[Tensor, ...]:
        """QueryPos, KeyPos, KeyPadding, QueryDoc, KeyDoc, DropoutSeed; a tensor the kernel never reads
        stands in for an absent one (its flag is off)."""
        absent = self.key_positions
        # The kernel reads the padding mask as bytes: a bool tensor views as uint8 without a copy.
        padding = absent if self.key_padding_mask is None else self.key_padding_mask.view(torch.uint8)
        return (self.query_positions, self.key_positions, padding,
                absent if self.query_documents is None else self.query_documents,
                absent if self.key_documents is None else self.key_documents,
                absent if self.dropout_seed is None else self.dropout_seed)

    @property
    def strides(self) -> tuple[int, ...]:
        """stride_pad_b, stride_pad_n, stride_qdoc_b, stride_kdoc_b."""
        padding = (0, 0) if self.key_padding_mask is None else self.key_padding_mask.stride()
        query_documents = 0 if self.query_documents is None else self.query_documents.stride(0)
        key_documents = 0 if self.key_documents is None else self.key_documents.stride(0)
        return (*padding, query_documents, key_documents)

    def scalars(self, scale: float) -> tuple[int | float, ...]:
        """window_left, window_right, cap_scale, unit, dropout_threshold, dropout_rescale.

        Scores are kept in units of ``unit``: raw q.k (unit = scale) or tanh(q.k * cap_scale) with
        cap_scale = scale / softcap (unit = softcap)."""
        softcap = self.softcap != 0.0
        return (
            max(self.window_left, 0), max(self.window_right, 0),
            scale / self.softcap if softcap else 1.0, self.softcap if softcap else scale,
            keep_threshold(self.dropout_p), 1.0 / (1.0 - self.dropout_p),
        )

    def flags(self, head_dim: int) -> dict[str, int | bool]:
        return dict(
            HEAD_DIM=head_dim, BLOCK_D=block_head_dim(head_dim),
            HAS_LEFT=self.window_left >= 0, HAS_RIGHT=self.window_right >= 0,
            HAS_PADDING=self.key_padding_mask is not None, HAS_DOCUMENTS=self.key_documents is not None,
            SOFTCAP=self.softcap != 0.0, DROPOUT=self.dropout_p > 0.0,
        )
