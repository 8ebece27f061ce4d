"""``lightning_mqsp.comm``: the exchange in which some pairs of ranks send nothing, its byte count and its failure."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from distributed import call_without_a_partner

from lightning_mqsp import comm, count_communication


def _exchange_lower_triangle() -> tuple[list[float], int, tuple[int, ...]]:
    """Rank r sends a slice to each rank s <= r (its value 10 r + s) and receives from every s >= r."""
    rank, size = dist.get_rank(), dist.get_world_size()
    send_to, receive_from = tuple(range(rank + 1)), tuple(range(rank, size))
    x = torch.tensor([[10.0 * rank + s, -1.0] for s in send_to])
    with count_communication() as counter:
        received = comm.exchange(x, send_to, receive_from, None).wait()
    return received[:, 0].tolist(), counter.bytes_sent["all_to_all"], tuple(received.shape)


def test_exchange_delivers_each_slice_to_its_rank_and_counts_only_remote_bytes(workers) -> None:
    for rank, (values, sent, shape) in enumerate(workers(3).run(_exchange_lower_triangle)):
        assert values == [10.0 * s + rank for s in range(rank, 3)]  # slice i came from receive_from[i]
        assert shape == (3 - rank, 2)
        assert sent == rank * 2 * 4  # one float32 pair to each lower rank; nothing counted for its own slice


def _exchange_once(group: dist.ProcessGroup) -> None:
    comm.exchange(torch.ones(1, 4), (1,), (1,), group, "the test exchange").wait()


@pytest.mark.timeout(90)
def test_an_exchange_whose_partner_never_comes_fails_with_a_named_error(workers) -> None:
    pool = workers(2)
    rank0, rank1 = pool.run(call_without_a_partner, _exchange_once, 2.0, timeout=60)
    assert rank1 == "skipped the call"
    assert rank0.startswith("raised: the test exchange over the sequence-parallel group"), rank0
    assert "within the group's timeout" in rank0, rank0
    pool.close(force=True)  # rank 0's connection may be left half-open: start the next tests on a fresh pool
