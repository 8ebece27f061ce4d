from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from distributed import WorkerPool, close_pools

_pools: dict[int, WorkerPool] = {}


@pytest.fixture(scope="session")
def workers() -> Iterator[Callable[[int], WorkerPool]]:
    """``workers(P)``: a live pool of P gloo ranks, started on first use and rebuilt after a failure."""

    def get(world_size: int) -> WorkerPool:
        pool = _pools.get(world_size)
        if pool is None or pool.broken:
            pool = _pools[world_size] = WorkerPool(world_size)
        return pool

    yield get
    close_pools([pool for pool in _pools.values() if not pool.broken])
