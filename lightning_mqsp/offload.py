"""Copies of device tensors in host memory, on a copy stream of their own, and the order of every read of them.

On CUDA a copy from the device into pinned host memory is asynchronous: ``copy_(..., non_blocking=True)``
returns before the bytes land. A host-side read of that memory (a host ``copy_``, a staging copy, numpy) made
before then reads stale bytes, and nothing on the CPU shows it, because there every copy is synchronous. So the
copies and their reads go through this module. The copies run on a copy stream per device, beside the compute
stream, so that on a GPU they hide behind the kernels instead of adding to them; events order them:

- :func:`to_host` starts the copy on the copy stream after the compute stream's work so far (the kernels that
  write the source), keeps the source's memory from the caching allocator until the copy has read it, and records
  an event after the copy, kept with the copy's storage;
- :func:`to_device` brings rows of a copy back: on the copy stream, after the copy to the host (its event), and
  the compute stream waits for the copy back (an event, no host sync) before anything uses the rows; a read that
  must happen on the host first (a staging copy of strided rows) waits for the event on the host. MQSP's backward
  asks for micro-step j + 1's rows before it computes step j: with the copy on its own stream that is a prefetch;
- :func:`offloaded_saved_tensors` is the strategies' ``offload_activations``: the saved-tensor hooks that move
  what forward saves to host memory through :func:`to_host`, leave a tensor that is in host memory already where it
  is (the offloaded queries: ``save_on_cpu`` would copy them a second time, with a host read that races the copy),
  and in backward, when a saved tensor is unpacked, start bringing back the ones saved before it (the next layer's
  in backward's order) while the current one is used.

The copies go through :data:`ENGINE`, whose primitives a test replaces with a double whose bytes land only at a
wait (``tests/test_offload.py``), so that a read that comes too early sees wrong values on the CPU as it would on
a GPU.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch
from torch import Tensor


class CopyEngine:
    """How copies between device and host memory are made and waited for: CUDA's pinned, asynchronous copies on a
    copy stream per device, and events.

    A tensor on the CPU is its own host copy (no copy, nothing to wait for)."""

    def __init__(self) -> None:
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

    def needs_copy(self, x: Tensor) -> bool:
        """Whether ``x`` is in device memory (and so needs a copy to be in host memory)."""
        return x.device.type != "cpu"

    def copy_stream(self, device: torch.device) -> torch.cuda.Stream:
        """The stream of ``device`` that every copy to and from it runs on (made on first use)."""
        device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def start(self, x: Tensor) -> tuple[Tensor, Any]:
        """A host tensor stored as ``x`` is (same strides: no contiguous temporary on the device) and the event
        after which its bytes are there (``None`` when the copy was synchronous)."""
        pinned = x.device.type == "cuda"
        host = torch.empty_like(x, device="cpu", pin_memory=pinned)
        if not pinned:
            return host.copy_(x), None
        stream = self.copy_stream(x.device)
        stream.wait_stream(torch.cuda.current_stream(x.device))  # the kernels that write x are queued there
        with torch.cuda.stream(stream):
            host.copy_(x, non_blocking=True)
        # x may be freed by the caller as soon as this returns: its memory must not be handed to a kernel of the
        # compute stream until the copy stream has read it.
        x.record_stream(stream)
        return host, _recorded_event(stream)

    def bring(self, x: Tensor, device: torch.device, after: Any) -> tuple[Tensor, Any]:
        """A copy of host tensor ``x`` on ``device``, read after event ``after`` (the copy that wrote ``x``; None:
        nothing to wait for), and the event after which its bytes are there (``None`` when it is synchronous).
        The caller makes the reader wait for that event (:meth:`wait_on_device`) before it uses the copy."""
        if device.type != "cuda" or not x.is_pinned():  # a synchronous copy: the host reads x
            if after is not None:
                self.wait_on_host(after)
            return x.to(device), None
        stream = self.copy_stream(device)
        if after is not None:
            stream.wait_event(after)
        with torch.cuda.stream(stream):
            copy = x.to(device, non_blocking=True)
        # Made on the copy stream (allocated on the compute stream, the copy would have to wait for every kernel
        # queued there, and a prefetch would hide nothing), used on the compute stream: its memory is not reused
        # until the compute stream is done with it. It returns to the copy stream's pool of the caching allocator.
        copy.record_stream(torch.cuda.current_stream(device))
        return copy, _recorded_event(stream)

    def wait_on_host(self, event: Any) -> None:
        event.synchronize()

    def wait_on_device(self, event: Any, device: torch.device) -> None:
        if device.type == "cuda":
            torch.cuda.current_stream(device).wait_event(event)
        else:  # the reader runs on the host
            event.synchronize()


def _recorded_event(stream: torch.cuda.Stream) -> torch.cuda.Event:
    event = torch.cuda.Event()
    event.record(stream)
    return event


#: The engine every copy goes through (tests swap it for a double).
ENGINE = CopyEngine()

# The event of each host copy still in flight or not yet waited for on the host, by its storage's address
# (views of a copy share it). An entry leaves with its copy's storage.
_pending: dict[int, Any] = {}


def _storage_key(x: Tensor) -> int:
    return x.untyped_storage().data_ptr()


def to_host(x: Tensor) -> Tensor:
    """A copy of ``x`` in host memory (pinned on CUDA), started now; ``x`` itself when it is in host memory
    already. Read it only through :func:`to_device` or after :func:`wait_on_host`."""
    if not ENGINE.needs_copy(x):
        return x
    host, event = ENGINE.start(x)
    if event is not None:
        key = _storage_key(host)
        _pending[key] = event
        weakref.finalize(host, _pending.pop, key, None)
    return host


def wait_on_host(x: Tensor) -> None:
    """Block until the bytes of the host copy ``x`` (or a view of it) have landed; nothing for any other tensor."""
    event = _pending.pop(_storage_key(x), None)
    if event is not None:
        ENGINE.wait_on_host(event)


def to_device(x: Tensor, device: torch.device) -> Tensor:
    """Rows of a :func:`to_host` copy on ``device``, ordered after the copy (``x`` itself when it is there and no
    copy into it is in flight): the device's stream waits for the copy back, which waits for the copy to the host."""
    copy, event = _start_to_device(x, device)
    if event is not None:
        ENGINE.wait_on_device(event, device)
    return copy


def _start_to_device(x: Tensor, device: torch.device) -> tuple[Tensor, Any]:
    """:func:`to_device`, less the reader's wait: the copy and the event the reader waits for (None: none)."""
    event = _pending.get(_storage_key(x)) if _pending else None
    if event is None and x.device == device:  # no copy in flight (always so without offload): nothing to order
        return x, None
    if not _dense(x):
        # A group of heads' rows lie strided in the copy. A strided source would be staged in pageable memory, which
        # makes the copy to the device synchronous; a pinned staging copy keeps it asynchronous. It is a host read.
        wait_on_host(x)
        x, event = torch.empty(x.shape, dtype=x.dtype, pin_memory=x.is_pinned()).copy_(x), None
    return ENGINE.bring(x, device, event)


def _dense(x: Tensor) -> bool:
    """Whether ``x``'s elements fill a block of its storage without gaps, in any order of its dimensions (such a
    tensor is copied as it is stored; any other is first made contiguous)."""
    expected = 1
    for stride, size in sorted((t, s) for s, t in zip(x.shape, x.stride()) if s != 1):
        if stride != expected:
            return False
        expected *= size
    return True


class _Saved:
    """A tensor forward saved, in host memory, with the copy back to its device once one is started."""

    __slots__ = ("__weakref__", "device", "host", "index", "nbytes", "returning", "taken")

    def __init__(self, index: int, device: torch.device, host: Tensor) -> None:
        self.index, self.device, self.host = index, device, host
        self.nbytes = host.numel() * host.element_size()
        self.returning: tuple[Tensor, Any] | None = None  # (copy on the device, its event), until unpacked
        self.taken = False  # unpacked once: no copy back is started for it ahead of time again

    def start(self) -> None:
        if self.returning is None:
            self.returning = _start_to_device(self.host, self.device)

    def take(self) -> Tensor:
        self.start()
        assert self.returning is not None
        (copy, event), self.returning, self.taken = self.returning, None, True
        if event is not None:
            ENGINE.wait_on_device(event, self.device)
        return copy


_kept_on_device = 0  # > 0 inside kept_on_device()


@contextmanager
def kept_on_device() -> Iterator[None]:
    """What is saved for backward inside stays on the device, offloaded or not outside: for tensors backward needs
    first, which would come straight back (the loss's inputs: offloaded, they were one hidden state a token more on
    the host at the end of forward, the host's peak)."""
    global _kept_on_device
    _kept_on_device += 1
    try:
        yield
    finally:
        _kept_on_device -= 1


def offloaded_saved_tensors(offloading: Callable[[], bool] | None = None, prefetch: bool = True) -> AbstractContextManager:
    """Saved-tensor hooks that keep what forward saves for backward in host memory until backward unpacks it (while
    ``offloading()`` says so, when given: ``offload_activation_layers`` offloads only the first layers' saves; never
    inside :func:`kept_on_device`).

    Unlike ``torch.autograd.graph.save_on_cpu``, a tensor already in host memory is kept as it is (no second
    pinned copy, no host read of a copy in flight), the copies are ordered by events, not by a host sync, and with
    ``prefetch`` unpacking a tensor starts bringing back the tensors saved before it, up to as many bytes (backward
    unpacks in about the reverse order of saving: with activation checkpointing, the next layer's input while this
    layer is recomputed and differentiated). The prefetched tensor is on the device through that layer's backward,
    one checkpoint (a hidden state a token) at its peak; without ``prefetch`` each copy back starts when backward
    needs it, and waits."""
    saved: list[weakref.ref[_Saved]] = []  # in the order of saving; dead once backward has released a tensor

    def pack(tensor: Tensor) -> Tensor | _Saved:
        if _kept_on_device or (offloading is not None and not offloading()):
            return tensor
        host = to_host(tensor)
        if host is tensor:  # in host memory already: its reads are ordered where they happen (to_device)
            return tensor
        record = _Saved(len(saved), tensor.device, host)
        saved.append(weakref.ref(record))
        return record

    def unpack(packed: Tensor | _Saved) -> Tensor:
        if isinstance(packed, Tensor):
            return packed
        tensor = packed.take()
        if prefetch:
            _prefetch(saved, packed.index, packed.nbytes)
        return tensor

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


def _prefetch(saved: list[weakref.ref[_Saved]], index: int, budget: int) -> None:
    """Start the copies back of the tensors saved before ``saved[index]``, the nearest first, until ``budget`` bytes
    (at least one tensor) are on their way; those already on their way count against it."""
    for earlier in range(index - 1, -1, -1):
        record = saved[earlier]()
        if record is None or record.taken:
            continue
        record.start()
        budget -= record.nbytes
        if budget <= 0:
            return
