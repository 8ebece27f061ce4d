"""The few collectives MQSP needs, as async calls with a uniform handle, and a byte counter.

Every helper takes and returns a leading rank dimension of size P so callers never reshape
around the communication. On a group of one rank they return their input and issue nothing.

``CommCounter`` records, per collective, the bytes each rank *sends* under the usual
algorithms (ring all-gather and reduce-scatter, pairwise all-to-all): (P-1) x its shard for an
all-gather, (P-1)/P of the buffer for a reduce-scatter or an all-to-all.
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.distributed as dist
from torch import Tensor

ProcessGroup = dist.ProcessGroup


@dataclass
class CommCounter:
    """Bytes sent by this rank and number of calls, per collective name."""

    bytes_sent: Counter[str] = field(default_factory=Counter)
    calls: Counter[str] = field(default_factory=Counter)

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes_sent.values())

    def record(self, name: str, nbytes: float) -> None:
        self.bytes_sent[name] += int(nbytes)
        self.calls[name] += 1


_active_counters: list[CommCounter] = []


@contextmanager
def count_communication() -> Iterator[CommCounter]:
    """Count the bytes MQSP's collectives send from this rank inside the ``with`` block."""
    counter = CommCounter()
    _active_counters.append(counter)
    try:
        yield counter
    finally:
        _active_counters.remove(counter)


def record_bytes_sent(name: str, nbytes: float) -> None:
    """Add ``nbytes`` sent by this rank under ``name`` to every active counter (for collectives built elsewhere, e.g. point-to-point rings)."""
    for counter in _active_counters:
        counter.record(name, nbytes)


class Pending:
    """The result of an async collective; ``wait()`` returns it once it has arrived."""

    def __init__(self, result: Tensor, work: dist.Work | None) -> None:
        self._result: Tensor | None = result
        self._work = work

    def wait(self) -> Tensor:
        """The result, once; the handle lets go of it so that the caller alone decides its lifetime."""
        if self._work is not None:
            self._work.wait()
            self._work = None
        result, self._result = self._result, None
        if result is None:
            raise RuntimeError("Pending.wait() was already called: the result was handed over then.")
        return result


def group_size(group: ProcessGroup | None) -> int:
    return dist.get_world_size(group) if dist.is_initialized() else 1


def all_gather(x: Tensor, group: ProcessGroup | None) -> Pending:
    """[...] on every rank -> [P, ...] (rank order), asynchronously."""
    size = group_size(group)
    if size == 1:
        return Pending(x.unsqueeze(0), None)
    x = x.contiguous().unsqueeze(0)
    out = x.new_empty((size, *x.shape[1:]))
    record_bytes_sent("all_gather", (size - 1) * x.numel() * x.element_size())
    return Pending(out, dist.all_gather_single(out, x, group=group, async_op=True))


def all_to_all(x: Tensor, group: ProcessGroup | None) -> Pending:
    """[P, ...] with slice s meant for rank s -> [P, ...] with slice s received from rank s."""
    size = group_size(group)
    if size == 1:
        return Pending(x, None)
    x = x.contiguous()
    out = torch.empty_like(x)
    record_bytes_sent("all_to_all", (size - 1) / size * x.numel() * x.element_size())
    return Pending(out, dist.all_to_all_single(out, x, group=group, async_op=True))


def reduce_scatter(x: Tensor, group: ProcessGroup | None) -> Pending:
    """[P, ...] -> [...]: the sum over ranks of slice ``rank``, asynchronously."""
    size = group_size(group)
    if size == 1:
        return Pending(x[0], None)
    x = x.contiguous()
    out = x.new_empty((1, *x.shape[1:]))
    record_bytes_sent("reduce_scatter", (size - 1) / size * x.numel() * x.element_size())
    return Pending(out[0], dist.reduce_scatter_single(out, x, op=dist.ReduceOp.SUM, group=group, async_op=True))
