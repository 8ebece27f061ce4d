"""Failures end every rank of a run together, within seconds, on NCCL as on gloo.

On gloo a rank that raises and exits closes its connections, and a peer waiting in a collective with it fails at
once with :class:`~lightning_mqsp.comm.CollectiveError` naming it (the failed rank reported itself in the store
first). On NCCL nothing of that happens: ``work.wait()`` only makes the current stream wait, so a peer's host
runs on until its next synchronisation and then blocks inside CUDA until the NCCL watchdog's timeout, whose
message names no rank. And a failed rank whose process lingers (a hung teardown) holds its peers on any backend.

:class:`PeerFailureWatchdog` closes that gap. Each rank runs one in a daemon thread while the strategy trains.
It polls one counter in the process group's store; when any rank has reported a failure it

1. marks the failure in :mod:`~lightning_mqsp.comm`, so that this rank's next collective (or the wait of one
   in flight) raises ``CollectiveError`` naming the failed rank instead of waiting;
2. aborts this rank's sequence-parallel communicators where the backend can (NCCL): kernels waiting on a
   dead peer end, and the host gets back to Python to raise;
3. if the run has still not ended after ``grace_s`` (the main thread is stuck where no error reaches it),
   ends the processes this one launched (``on_give_up``), and after another ``grace_s`` writes the
   ``CollectiveError`` to stderr and ends this process with exit code 1.

A rank that reported a failure of its own is covered too: if it lingers, its watchdog ends it.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable

import torch.distributed as dist

from lightning_mqsp import comm
from lightning_mqsp.comm import ProcessGroup

#: Seconds between two looks at the store, and the time the run gets to end by itself at each stage.
DEFAULT_POLL_S = 0.5
DEFAULT_GRACE_S = 5.0


class PeerFailureWatchdog:
    """Watches the store for a failure reported by any rank and ends this rank's part of the run (module docs)."""

    def __init__(self, group: ProcessGroup | None, on_give_up: Callable[[], None] | None = None,
                 poll_s: float = DEFAULT_POLL_S, grace_s: float = DEFAULT_GRACE_S) -> None:
        self.group = group
        self.on_give_up = on_give_up
        self.poll_s, self.grace_s = poll_s, grace_s
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._reported_at_start: int | None = None

    def start(self) -> None:
        if self._thread is not None:
            return
        comm.forget_own_failure()
        self._reported_at_start = comm.failures_reported()
        if self._reported_at_start is None:  # no store (a fake or single process group): nothing to watch
            return
        self._stopped.clear()
        self._thread = threading.Thread(target=self._watch, name="lightning_mqsp-peer-failure-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """End the watch (the run is over, normally or through an exception this rank raised)."""
        self._stopped.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=self.poll_s + 1)

    def _watch(self) -> None:
        while not self._stopped.wait(self.poll_s):
            reported = comm.failures_reported()
            if reported is not None and self._reported_at_start is not None and reported > self._reported_at_start:
                break
        else:
            return
        cause = "; ".join(comm.reported_failures(None)) or "a rank reported a failure"
        comm.mark_peer_failure(cause)
        _abort_communicators(self.group)
        if self._stopped.wait(self.grace_s):
            return
        if self.on_give_up is not None:
            self.on_give_up()
        if self._stopped.wait(self.grace_s):
            return
        sys.stderr.write(
            f"\nCollectiveError: lightning_mqsp: ending rank {dist.get_rank()} {2 * self.grace_s:.0f} s after a failure, which "
            f"its collectives did not see (NCCL does not raise on a peer's failure): {cause}\n"
        )
        sys.stderr.flush()
        os._exit(1)


def _abort_communicators(group: ProcessGroup | None) -> None:
    """Abort ``group``'s NCCL communicators so that kernels waiting on a failed peer end; gloo's abort does not end a
    collective in flight (its peers' exit does), so other backends are left alone."""
    if group is None or dist.get_backend(group) != "nccl":
        return
    try:
        dist.distributed_c10d._abort_process_group(group)
    except Exception:  # noqa: BLE001 - the fallbacks (processes ended, then this one) still end the run
        pass
