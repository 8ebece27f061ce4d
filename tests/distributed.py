"""A pool of gloo worker processes that tests hand functions to.

Starting processes and importing torch costs seconds, so each world size gets one pool for the
whole session. Every call has a deadline: a deadlock fails the test (and the pool is rebuilt),
it never hangs CI. The process group itself has a short timeout too, so a collective that
waits for a rank that never comes raises inside the worker.
"""

from __future__ import annotations

import datetime
import os
import queue
import tempfile
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

COLLECTIVE_TIMEOUT_S = 30


def _worker_context() -> Any:
    """Workers forked from a fork server that has imported torch and lightning_mqsp once (which takes 13 s of CPU on
    a slow host: each spawned worker paid it, P of them per pool). The server is a fresh single-threaded process, so
    forking it is safe where forking the test process, with its threads, would not be."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed", "lightning_mqsp"])
    return ctx


def _worker(rank: int, world_size: int, init_method: str, tasks: Any, results: Any, pg_timeout_s: float) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=init_method, rank=rank, world_size=world_size,
        timeout=datetime.timedelta(seconds=pg_timeout_s),
    )
    while True:
        task = tasks.get()
        if task is None:
            break
        fn, args = task
        try:
            results.put((rank, True, fn(*args)))
        except BaseException:  # noqa: BLE001 - reported to the test, which fails with it
            results.put((rank, False, traceback.format_exc()))
    dist.destroy_process_group()


class WorkerPool:
    def __init__(self, world_size: int, pg_timeout_s: float = COLLECTIVE_TIMEOUT_S) -> None:
        self.world_size = world_size
        ctx = _worker_context()
        fd, path = tempfile.mkstemp(prefix="mqsp-pg-")
        os.close(fd)
        os.remove(path)  # file:// rendezvous wants a path that does not exist yet
        self.tasks = [ctx.Queue() for _ in range(world_size)]
        self.results = ctx.Queue()
        self.processes = [
            ctx.Process(target=_worker, args=(r, world_size, f"file://{path}", self.tasks[r], self.results, pg_timeout_s), daemon=True)
            for r in range(world_size)
        ]
        for p in self.processes:
            p.start()
        self.broken = False

    def run(self, fn: Callable[..., Any], *args: Any, timeout: float = 120.0) -> list[Any]:
        """Run ``fn(*args)`` on every rank; return the per-rank results or raise the first failure."""
        for task_queue in self.tasks:
            task_queue.put((fn, args))
        outcomes: dict[int, tuple[bool, Any]] = {}
        try:
            while len(outcomes) < self.world_size:
                rank, ok, value = self.results.get(timeout=timeout)
                outcomes[rank] = (ok, value)
        except queue.Empty:
            self.close(force=True)
            missing = sorted(set(range(self.world_size)) - set(outcomes))
            raise TimeoutError(f"{fn.__name__} did not finish on ranks {missing} within {timeout}s (deadlock?)") from None
        failures = {r: v for r, (ok, v) in outcomes.items() if not ok}
        if failures:
            rank = min(failures)
            raise WorkerError(rank, failures[rank], failures)
        return [outcomes[r][1] for r in range(self.world_size)]

    def close(self, force: bool = False) -> None:
        close_pools([self], force)


def close_pools(pools: list[WorkerPool], force: bool = False) -> None:
    """Stop the ranks of every pool at once (``force``: kill them); each rank takes a moment to leave its group and
    exit, and pools closed one after another added those moments up (19 s at the end of the suite on a slow host)."""
    processes = []
    for pool in pools:
        pool.broken = True
        for process, task_queue in zip(pool.processes, pool.tasks, strict=True):
            if force:
                process.kill()
            else:
                task_queue.put(None)
        processes += pool.processes
    for process in processes:
        process.join(timeout=10)
        if process.is_alive():
            process.kill()


def call_without_a_partner(call: Callable[[dist.ProcessGroup], object], timeout_s: float) -> str:
    """On a new two-rank group with a ``timeout_s`` timeout, rank 0 runs ``call(group)`` and rank 1 never does:
    rank 0 returns "raised: <message>" (or "no error"), rank 1 "skipped the call". The pool should then be closed
    with ``force=True``: rank 0's connection may be left half-open."""
    group = dist.new_group([0, 1], timeout=datetime.timedelta(seconds=timeout_s))
    if dist.get_rank() == 1:
        return "skipped the call"
    try:
        call(group)
    except RuntimeError as error:
        return f"raised: {error}"
    return "no error"


class WorkerError(AssertionError):
    def __init__(self, rank: int, trace: str, failures: dict[int, str]) -> None:
        super().__init__(f"rank {rank} failed (failed ranks: {sorted(failures)}):\n{trace}")
        self.failures = failures
