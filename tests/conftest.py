from __future__ import annotations

import os
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


@pytest.fixture(autouse=True)
def _environment_restored() -> Iterator[None]:
    """Each test leaves os.environ as it found it. A Trainer run in the test process sets MASTER_ADDR, MASTER_PORT,
    NODE_RANK and LOCAL_RANK there; a later test's launched Trainer script inherited them, took itself for an
    already-launched rank, started no other, and waited for them until its timeout."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
