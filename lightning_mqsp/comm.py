"""Every collective lightning-mqsp issues: async calls with a uniform handle, a byte counter, and
failures that say what failed.

The helpers take and return a leading rank dimension of size P so callers never reshape around
the communication. On a group of one rank they return their input and issue nothing.

``CommCounter`` records, per collective, the bytes each rank *sends* under the usual
algorithms (ring all-gather and reduce-scatter, pairwise all-to-all): (P-1) x its shard for an
all-gather, (P-1)/P of the buffer for a reduce-scatter or an all-to-all.

When a collective fails (a peer crashed, raised, or never came and the group's timeout
expired) :class:`CollectiveError` names the collective and, when known, the rank that failed
first: a rank that raises reports itself in the process group's store (:func:`report_failure`,
called by :class:`~lightning_mqsp.MQSPStrategy` when a step raises) before its peers notice.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

ProcessGroup = dist.ProcessGroup

_FAILURE_KEY = "lightning_mqsp/failed_rank/{}"
_ANY_FAILURE_KEY = "lightning_mqsp/a_rank_failed"  # one key for the watchdog to poll (lightning_mqsp/watchdog.py)
# Set by the watchdog when a rank reported a failure: collectives raise instead of waiting for it.
_peer_failure: str | None = None
# torch 2.13 renamed the tensor collectives (the old names warn); torch 2.11 has only the old ones.
_all_gather_tensor = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_tensor = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@dataclass
class CommCounter:
    """Bytes sent by this rank and number of calls, per collective name."""

    bytes_sent: Counter[str] = field(default_factory=Counter)
    calls: Counter[str] = field(default_factory=Counter)

    def record(self, name: str, nbytes: float) -> None:
        self.bytes_sent[name] += int(nbytes)
        self.calls[name] += 1


_active_counters: list[CommCounter] = []


@contextmanager
def count_communication() -> Iterator[CommCounter]:
    """Count the bytes lightning-mqsp's collectives send from this rank inside the ``with`` block."""
    counter = CommCounter()
    _active_counters.append(counter)
    try:
        yield counter
    finally:
        _active_counters.remove(counter)


def record_bytes_sent(name: str, nbytes: float) -> None:
    """Add ``nbytes`` sent by this rank under ``name`` to every active counter (for collectives built elsewhere,
    e.g. point-to-point rings)."""
    for counter in _active_counters:
        counter.record(name, nbytes)


class CollectiveError(RuntimeError):
    """A collective over a sequence-parallel group failed on this rank."""


def report_failure(error: BaseException) -> None:
    """Tell the other ranks, through the default process group's store, that this rank failed and why.

    Called before this rank gives up, so that a peer whose collective then fails can name it."""
    store = _store()
    if store is None:
        return
    try:
        store.set(_FAILURE_KEY.format(dist.get_rank()), f"{type(error).__name__}: {error}"[:300])
        store.add(_ANY_FAILURE_KEY, 1)
    except Exception:  # noqa: BLE001 - the store may be gone already; the peers then name no rank
        pass


def failures_reported() -> int | None:
    """How many failures the ranks have reported so far (one look at the store; ``None`` without a store). The
    watchdog compares it with the count when it started, so that a failure of an earlier run in the same processes
    does not end this one."""
    store = _store()
    if store is None:
        return None
    try:
        return store.add(_ANY_FAILURE_KEY, 0)
    except Exception:  # noqa: BLE001 - a store that is gone: its owner, rank 0, ended; the collectives will say so
        return None


def forget_own_failure() -> None:
    """A new run: this rank's report of an earlier failure no longer names it, and its collectives run again."""
    global _peer_failure
    _peer_failure = None
    store = _store()
    try:
        if store is not None:
            store.delete_key(_FAILURE_KEY.format(dist.get_rank()))
    except Exception:  # noqa: BLE001 - nothing to forget
        pass


def mark_peer_failure(cause: str) -> None:
    """From now on every collective of this process raises :class:`CollectiveError` with ``cause``."""
    global _peer_failure
    _peer_failure = cause


def _raise_if_a_peer_failed(what: str, group: ProcessGroup | None) -> None:
    if _peer_failure is not None:
        ranks = dist.get_process_group_ranks(group or dist.group.WORLD)
        raise CollectiveError(f"{what} over the sequence-parallel group (global ranks {ranks}) was abandoned: {_peer_failure}.")


def _store() -> dist.Store | None:
    if not dist.is_initialized():
        return None
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001 - a process group without a store (fake groups in estimates)
        return None


def reported_failures(group: ProcessGroup | None) -> list[str]:
    store = _store()
    if store is None:
        return []
    found = []
    for rank in dist.get_process_group_ranks(group or dist.group.WORLD):
        key = _FAILURE_KEY.format(rank)
        try:
            if store.check([key]):
                found.append(f"rank {rank} failed first: {store.get(key).decode()}")
        except Exception:  # noqa: BLE001 - an unreachable store: name no rank
            break
    return found


def describe_failure(what: str, group: ProcessGroup | None, error: BaseException) -> str:
    """The message of a failed collective: what it was, who failed (when known), and what to check."""
    reported = reported_failures(group)
    said = str(error).lower()
    if reported:
        cause = "; ".join(reported)
    elif "timed out" in said or "timeout" in said:
        cause = (
            "a rank of the group did not reach this collective within the group's timeout: it hangs, is far behind, "
            "or made a different number of attention calls than this rank"
        )
    elif "closed" in said or "reset" in said or "broken pipe" in said:
        cause = "the process of a peer rank is gone (it crashed or was killed; see its log)"
    else:
        cause = "a rank of the group failed"
    ranks = dist.get_process_group_ranks(group or dist.group.WORLD)
    return f"{what} over the sequence-parallel group (global ranks {ranks}) failed: {cause}. The collective said: {error}"


class Pending:
    """The result of an async collective; ``wait()`` returns it once it has arrived."""

    def __init__(self, result: Tensor, work: dist.Work | None, what: str = "", group: ProcessGroup | None = None) -> None:
        self._result: Tensor | None = result
        self._work = work
        self._what = what
        self._group = group
        self._device: torch.device | None = None  # where the result goes when it was computed on host copies
        self._into: Tensor | None = None  # the caller's tensor the staged result is copied into

    def to(self, device: torch.device) -> Pending:
        """Hand the result over on ``device`` (a collective staged through host memory, :func:`_staged_on_host`)."""
        self._device = device
        return self

    def into(self, out: Tensor) -> Pending:
        """Hand the result over in ``out`` (a collective staged through host memory into a device tensor the caller
        made)."""
        self._into = out
        return self

    def wait(self) -> Tensor:
        """The result, once; the handle lets go of it so that the caller alone decides its lifetime."""
        if self._work is not None:
            work, self._work = self._work, None
            try:
                work.wait()
            except Exception as error:
                raise CollectiveError(describe_failure(self._what, self._group, error)) from error
            _raise_if_a_peer_failed(self._what, self._group)  # on NCCL wait() returns before the data is there
        result, self._result = self._result, None
        if result is None:
            raise RuntimeError("Pending.wait() was already called: the result was handed over then.")
        if self._into is not None:
            return self._into.copy_(result)
        return result if self._device is None else result.to(self._device, non_blocking=True)


def _staged_on_host(x: Tensor, group: ProcessGroup | None) -> bool:
    """Whether a collective of ``x`` runs on a host copy: a device tensor over gloo. gloo takes CUDA tensors for only
    some collectives; P processes that share one GPU (``benchmarks/gpu_ranks.py``; NCCL refuses two ranks on one
    device) go through host memory for all of them."""
    return x.device.type != "cpu" and x.device.type != "meta" and dist.is_initialized() and dist.get_backend(group) == "gloo"


def group_size(group: ProcessGroup | None) -> int:
    return dist.get_world_size(group) if dist.is_initialized() else 1


def group_rank(group: ProcessGroup | None) -> int:
    return dist.get_rank(group) if dist.is_initialized() else 0


def gather_to_first_rank(x: Tensor, group: ProcessGroup | None, what: str = "gather") -> Tensor | None:
    """[...] on every rank -> [P, ...] (rank order) on the group's first rank, ``None`` on the others; the others
    allocate nothing for the result."""
    _raise_if_a_peer_failed(what, group)
    if _staged_on_host(x, group):
        gathered = gather_to_first_rank(x.cpu(), group, what)
        return None if gathered is None else gathered.to(x.device)
    size = group_size(group)
    if size == 1:
        return x.unsqueeze(0)
    x = x.contiguous()
    first = group_rank(group) == 0
    out = x.new_empty((size, *x.shape)) if first else None
    if not first:
        record_bytes_sent("gather", x.numel() * x.element_size())
    try:
        dist.gather(x, list(out.unbind(0)) if out is not None else None, group=group, group_dst=0)
    except Exception as error:
        raise CollectiveError(describe_failure(what, group, error)) from error
    return out


def all_gather(x: Tensor, group: ProcessGroup | None, what: str = "all-gather") -> Pending:
    """[...] on every rank -> [P, ...] (rank order), asynchronously."""
    _raise_if_a_peer_failed(what, group)
    if _staged_on_host(x, group):
        return all_gather(x.cpu(), group, what).to(x.device)
    size = group_size(group)
    if size == 1:
        return Pending(x.unsqueeze(0), None)
    x = x.contiguous().unsqueeze(0)
    out = x.new_empty((size, *x.shape[1:]))
    record_bytes_sent("all_gather", (size - 1) * x.numel() * x.element_size())
    work = _all_gather_tensor(out, x, group=group, async_op=True)
    return Pending(out, work, what, group)


def all_to_all(x: Tensor, group: ProcessGroup | None, what: str = "all-to-all") -> Pending:
    """[P, ...] with slice s meant for rank s -> [P, ...] with slice s received from rank s."""
    _raise_if_a_peer_failed(what, group)
    if _staged_on_host(x, group):
        return all_to_all(x.cpu(), group, what).to(x.device)
    size = group_size(group)
    if size == 1:
        return Pending(x, None)
    x = x.contiguous()
    out = torch.empty_like(x)
    record_bytes_sent("all_to_all", (size - 1) / size * x.numel() * x.element_size())
    work = dist.all_to_all_single(out, x, group=group, async_op=True)
    return Pending(out, work, what, group)


def exchange(x: Tensor, send_to: tuple[int, ...], receive_from: tuple[int, ...], group: ProcessGroup | None,
             what: str = "exchange", counted_as: str = "all_to_all", out: Tensor | None = None) -> Pending:
    """An all-to-all in which some pairs of ranks exchange nothing: slice i of ``x`` [len(send_to), ...] goes to
    group rank ``send_to[i]``; returns [len(receive_from), ...], slice i from group rank ``receive_from[i]``.

    Both ascending; every rank calls it, and rank a lists b in ``send_to`` exactly when b lists a in
    ``receive_from`` (callers derive both from host-known facts all ranks share). A pair that exchanges
    nothing costs nothing. With every rank in both lists this is :func:`all_to_all`. Counted under ``counted_as``
    (an all-gather made of copies for every rank counts as one). ``out``: where to receive (contiguous,
    [len(receive_from), ...]), else a new tensor."""
    _raise_if_a_peer_failed(what, group)
    if _staged_on_host(x, group):
        staged = exchange(x.cpu(), send_to, receive_from, group, what, counted_as)
        return staged.into(out) if out is not None else staged.to(x.device)
    size = group_size(group)
    if size == 1:
        return Pending(x, None)
    rank = dist.get_rank(group)
    x = x.contiguous()
    if out is None:
        out = x.new_empty((len(receive_from), *x.shape[1:]))
    elif out.shape != (len(receive_from), *x.shape[1:]) or not out.is_contiguous():
        raise ValueError(f"exchange: out must be a contiguous {(len(receive_from), *x.shape[1:])} tensor, got {tuple(out.shape)}")
    record_bytes_sent(counted_as, sum(r != rank for r in send_to) * x[0].numel() * x.element_size() if len(x) else 0)
    sends, receives = set(send_to), set(receive_from)
    send_counts = [int(r in sends) for r in range(size)]
    receive_counts = [int(r in receives) for r in range(size)]
    work = dist.all_to_all_single(out, x, receive_counts, send_counts, group=group, async_op=True)
    return Pending(out, work, what, group)


def exchange_is_cheaper_than_all_gather(group: ProcessGroup | None) -> bool:
    """Whether sending a copy of the same rows to every other rank (:func:`exchange`) costs less than :func:`all_gather`:
    on gloo it does (the forward's query gathers sent so: MQSP / Ulysses 1-5% lower at P=4, L=4k in six A/B runs of
    ``benchmarks/attention_ab.py``, ``docs/design.md``); elsewhere the all-gather, which needs no copies, is kept."""
    return dist.is_initialized() and dist.get_backend(group) == "gloo"


def reduce_scatter(x: Tensor, group: ProcessGroup | None, what: str = "reduce-scatter") -> Pending:
    """[P, ...] -> [...]: the sum over ranks of slice ``rank``, asynchronously."""
    _raise_if_a_peer_failed(what, group)
    if _staged_on_host(x, group):
        return reduce_scatter(x.cpu(), group, what).to(x.device)
    size = group_size(group)
    if size == 1:
        return Pending(x[0], None)
    x = x.contiguous()
    out = x.new_empty((1, *x.shape[1:]))
    record_bytes_sent("reduce_scatter", (size - 1) / size * x.numel() * x.element_size())
    work = _reduce_scatter_tensor(out, x, op=dist.ReduceOp.SUM, group=group, async_op=True)
    return Pending(out[0], work, what, group)


def all_reduce(x: Tensor, group: ProcessGroup | None, what: str = "all-reduce") -> Tensor:
    """The sum of ``x`` over ``group`` (a new tensor; ``x`` is left as it is)."""
    _raise_if_a_peer_failed(what, group)
    if _staged_on_host(x, group):
        return all_reduce(x.cpu(), group, what).to(x.device)
    size = group_size(group)
    summed = x.clone()
    if size == 1:
        return summed
    record_bytes_sent("all_reduce", 2 * (size - 1) / size * x.numel() * x.element_size())
    work = dist.all_reduce(summed, op=dist.ReduceOp.SUM, group=group, async_op=True)
    return Pending(summed, work, what, group).wait()


class _AllReduceSum(torch.autograd.Function):
    """all_reduce(SUM) whose backward is all_reduce(SUM) of the gradients (the adjoint when every rank
    uses the sum). Written here because torch.distributed.nn's version misbehaves on subgroups."""

    @staticmethod
    def forward(ctx, x: Tensor, group: ProcessGroup | None, what: str) -> Tensor:
        ctx.group, ctx.what = group, what
        return all_reduce(x, group, what)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        return all_reduce(grad, ctx.group, f"{ctx.what} (backward)"), None, None


def differentiable_all_reduce(x: Tensor, group: ProcessGroup | None, what: str = "all-reduce") -> Tensor:
    """Differentiable sum of ``x`` over ``group``."""
    return _AllReduceSum.apply(x, group, what)
