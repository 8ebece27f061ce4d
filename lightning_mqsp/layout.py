"""How a full sequence is split over the ranks of a sequence-parallel group, and back.

``"contiguous"``: rank r holds tokens [r*l, (r+1)*l).
``"zigzag"``: the sequence is cut into 2P equal chunks and rank r holds chunks r and
2P-1-r, so that under a causal mask every rank does the same amount of work.

``shard_sequence`` and ``unshard_sequence`` are exact inverses of each other.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor

Layout = Literal["contiguous", "zigzag"]
LAYOUTS: tuple[str, ...] = get_args(Layout)


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}.")


def chunks_per_rank(layout: str) -> int:
    """How many equal chunks of the full sequence each rank holds."""
    check_layout(layout)
    return 2 if layout == "zigzag" else 1


def chunk_ids(rank: int, world_size: int, layout: str) -> list[int]:
    """Indices of the chunks (of ``world_size * chunks_per_rank``) that ``rank`` holds, in order."""
    if layout == "zigzag":
        return [rank, 2 * world_size - 1 - rank]
    check_layout(layout)
    return [rank]


def check_divisible(full_length: int, world_size: int, layout: str) -> None:
    parts = world_size * chunks_per_rank(layout)
    if full_length % parts != 0:
        raise ValueError(
            f"A sequence of length {full_length} cannot be split in the {layout!r} layout over "
            f"{world_size} ranks: the length must be a multiple of {parts}. Pad the sequence "
            f"to {-(-full_length // parts) * parts} tokens (and mask the padding)."
        )


def global_positions(local_length: int, rank: int, world_size: int, layout: str, device: torch.device | str = "cpu") -> Tensor:
    """Global position of each of the ``local_length`` tokens that ``rank`` holds (int64 [l])."""
    per_rank = chunks_per_rank(layout)
    if local_length % per_rank != 0:
        raise ValueError(f"The {layout!r} layout needs a local length divisible by {per_rank}, got {local_length}.")
    chunk = local_length // per_rank
    return torch.cat(
        [torch.arange(c * chunk, (c + 1) * chunk, device=device, dtype=torch.int64) for c in chunk_ids(rank, world_size, layout)]
    )


def shard_sequence(x: Tensor, dim: int, rank: int, world_size: int, layout: Layout = "contiguous") -> Tensor:
    """The part of the full-length tensor ``x`` that ``rank`` holds, along ``dim``."""
    check_divisible(x.size(dim), world_size, layout)
    chunks = x.chunk(world_size * chunks_per_rank(layout), dim=dim)
    return torch.cat([chunks[c] for c in chunk_ids(rank, world_size, layout)], dim=dim)


def unshard_sequence(shards: list[Tensor] | tuple[Tensor, ...], dim: int, layout: Layout = "contiguous") -> Tensor:
    """The full-length tensor from every rank's shard (``shards[r]`` from rank r)."""
    world_size = len(shards)
    per_rank = chunks_per_rank(layout)
    ordered: list[Tensor | None] = [None] * (world_size * per_rank)
    for rank, shard in enumerate(shards):
        for chunk_id, piece in zip(chunk_ids(rank, world_size, layout), shard.chunk(per_rank, dim=dim)):
            ordered[chunk_id] = piece
    return torch.cat(ordered, dim=dim)  # type: ignore[arg-type]
