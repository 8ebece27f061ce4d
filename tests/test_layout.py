from __future__ import annotations

import pytest
import torch

from lightning_mqsp import global_positions, shard_sequence, unshard_sequence


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_shard_then_unshard_is_the_identity(layout: str, world_size: int) -> None:
    x = torch.randn(2, 3, 48, 5)
    shards = [shard_sequence(x, 2, r, world_size, layout) for r in range(world_size)]
    assert all(s.shape == (2, 3, 48 // world_size, 5) for s in shards)
    assert torch.equal(unshard_sequence(shards, 2, layout), x)


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_global_positions_name_the_tokens_each_rank_holds(layout: str, world_size: int) -> None:
    full = torch.arange(32)
    for rank in range(world_size):
        expected = shard_sequence(full, 0, rank, world_size, layout)
        assert torch.equal(global_positions(32 // world_size, rank, world_size, layout), expected)


def test_zigzag_balances_causal_work() -> None:
    world_size, length = 4, 64
    work = []
    for rank in range(world_size):
        positions = global_positions(length // world_size, rank, world_size, "zigzag")
        work.append(int((positions + 1).sum()))  # keys visible to each of the rank's queries
    assert len(set(work)) == 1, work
    assert [p.tolist() for p in (global_positions(4, 0, 2, "zigzag"), global_positions(4, 1, 2, "zigzag"))] == [[0, 1, 6, 7], [2, 3, 4, 5]]


def test_lengths_that_do_not_divide_are_refused_with_the_fix() -> None:
    with pytest.raises(ValueError, match=r"multiple of 8\. Pad the sequence to 40"):
        shard_sequence(torch.zeros(33), 0, 0, 4, "zigzag")
    with pytest.raises(ValueError, match="layout must be one of"):
        shard_sequence(torch.zeros(32), 0, 0, 4, "striped")  # type: ignore[arg-type]
