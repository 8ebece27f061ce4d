"""Counter-based attention dropout.

The keep decision for one attention probability is a pure function of
``(seed, batch, query head, global query position, global key position)``. It therefore
does not depend on how rows are split into micro-queries or over ranks, and the backward
recompute draws exactly the mask the forward drew, with no mask stored in between.

The hash is two rounds of MurmurHash3's 32-bit finaliser on uint32 arithmetic, written with
int64 tensors masked to 32 bits so that the Triton kernels can reproduce it bit for bit.
"""

from __future__ import annotations

import torch
from torch import Tensor

_MASK32 = 0xFFFFFFFF
# Odd multipliers that spread small integers (head, position) over all 32 bits.
_HEAD_MULT = 0x9E3779B1
_QUERY_MULT = 0x85EBCA77
_KEY_MULT = 0xC2B2AE3D


def _fmix32(x: Tensor) -> Tensor:
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _MASK32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _MASK32
    return x ^ (x >> 16)


def draw_seed(device: torch.device | str = "cpu") -> Tensor:
    """A fresh dropout seed: an int64 tensor of one element drawn from ``device``'s default generator.

    It stays on the device (no host read), ``torch.manual_seed`` governs it, and activation
    checkpointing, which restores the generators' state before recomputing, draws it again equal.
    """
    return torch.randint(0, 2**31 - 1, (1,), device=device, dtype=torch.int64)


def keep_threshold(dropout_p: float) -> int:
    """Hash values at or above this 32-bit threshold are kept: P(keep) = 1 - dropout_p."""
    return min(round(dropout_p * 2**32), 2**32)


def keep_mask(
    seed: int | Tensor,
    num_heads: int,
    batch_size: int,
    query_positions: Tensor,
    key_positions: Tensor,
    dropout_p: float,
) -> Tensor:
    """Boolean keep mask of shape [B, H, M, N] for queries at ``query_positions`` [M] and
    keys at ``key_positions`` [N] (global positions, int64)."""
    device = query_positions.device
    batch = torch.arange(batch_size, device=device, dtype=torch.int64).view(-1, 1, 1, 1)
    head = torch.arange(num_heads, device=device, dtype=torch.int64).view(1, -1, 1, 1)
    row = (seed & _MASK32) ^ (((batch * num_heads + head) * _HEAD_MULT) & _MASK32)
    row = _fmix32(row ^ ((query_positions.view(1, 1, -1, 1) * _QUERY_MULT) & _MASK32))
    bits = _fmix32(row ^ ((key_positions.view(1, 1, 1, -1) * _KEY_MULT) & _MASK32))
    return bits >= keep_threshold(dropout_p)
