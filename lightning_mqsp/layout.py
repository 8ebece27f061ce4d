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

#: A run of consecutive global positions: (first index, stop index, global position of the first index).
Run = tuple[int, int, int]


def layout_error(layout: object) -> str | None:
    """Why ``layout`` is not a layout, or None."""
    return None if layout in LAYOUTS else f"layout must be one of {LAYOUTS}, got {layout!r}."


def check_layout(layout: str) -> None:
    if (error := layout_error(layout)) is not None:
        raise ValueError(error)


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
    return run_positions(position_runs(local_length, rank, world_size, layout), device)


def run_positions(runs: tuple[Run, ...], device: torch.device | str = "cpu") -> Tensor:
    """The positions of ``runs`` (which tile their indices in order), int64 [sum of the runs' lengths]."""
    parts = [torch.arange(position, position + last - first, device=device, dtype=torch.int64) for first, last, position in runs]
    if len(parts) == 1:
        return parts[0]
    return torch.cat(parts) if parts else torch.empty(0, device=device, dtype=torch.int64)


def position_runs(local_length: int, rank: int, world_size: int, layout: str) -> tuple[Run, ...]:
    """The runs of consecutive positions ``rank`` holds, known on the host (no tensor is read).

    One run in the contiguous layout, two in the zigzag layout; each rank's positions ascend.
    """
    per_rank = chunks_per_rank(layout)
    chunk = local_length // per_rank
    return tuple((i * chunk, (i + 1) * chunk, c * chunk) for i, c in enumerate(chunk_ids(rank, world_size, layout)))


def slice_runs(runs: tuple[Run, ...], start: int, stop: int, offset: int = 0) -> tuple[Run, ...]:
    """The runs of indices [start, stop) of ``runs``, re-indexed to begin at ``offset``."""
    sliced = []
    for first, last, position in runs:
        lo, hi = max(first, start), min(last, stop)
        if lo < hi:
            sliced.append((lo - start + offset, hi - start + offset, position + lo - first))
    return tuple(sliced)


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
