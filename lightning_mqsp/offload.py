"""Copies of device tensors in host memory, and the order of every read of them.

On CUDA a copy from the device into pinned host memory is asynchronous: ``copy_(..., non_blocking=True)``
returns before the bytes land. A host-side read of that memory (a host ``copy_``, a staging copy, numpy,
``save_on_cpu``'s pack hook) made before then reads stale bytes, and nothing on the CPU shows it, because
there every copy is synchronous. So the copy and its reads go through this module:

- :func:`to_host` starts the copy and records an event after it, kept with the copy's storage;
- :func:`to_device` brings rows of a copy back: the device's current stream waits for the event (no host
  sync) before the copy to the device, and a read that must happen on the host first (a staging copy of
  strided rows) waits for the event on the host;
- :func:`offloaded_saved_tensors` is the strategies' ``offload_activations``: the saved-tensor hooks that move
  what forward saves to host memory through the same two functions, and leave a tensor that is in host
  memory already where it is (the offloaded queries: ``save_on_cpu`` would copy them a second time, with a
  host read that races the copy).

The copies go through :data:`ENGINE`, whose three primitives a test replaces with a double whose bytes land
only at a wait (``tests/test_offload.py``), so that a read that comes too early sees wrong values on the CPU
as it would on a GPU.
"""

from __future__ import annotations

import weakref
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import Tensor


class CopyEngine:
    """How a copy into host memory is made and waited for: CUDA's pinned, asynchronous copies and events.

    A tensor on the CPU is its own host copy (no copy, nothing to wait for)."""

    def needs_copy(self, x: Tensor) -> bool:
        return x.device.type != "cpu"

    def start(self, x: Tensor) -> tuple[Tensor, Any]:
        """A host tensor stored as ``x`` is (same strides: no contiguous temporary on the device) and the event
        after which its bytes are there (``None`` when the copy was synchronous)."""
        pinned = x.device.type == "cuda"
        host = torch.empty_like(x, device="cpu", pin_memory=pinned).copy_(x, non_blocking=pinned)
        if not pinned:
            return host, None
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(x.device))
        return host, event

    def wait_on_host(self, event: Any) -> None:
        event.synchronize()

    def wait_on_device(self, event: Any, device: torch.device) -> None:
        if device.type == "cuda":
            torch.cuda.current_stream(device).wait_event(event)
        else:  # the reader runs on the host
            event.synchronize()


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
    """Rows of a :func:`to_host` copy on ``device``, ordered after the copy (``x`` itself when it is there).

    The device's stream waits for the copy's event; a read on the host waits on the host. The rows of a group of
    heads lie strided in the copy: they go through a pinned staging copy first (a strided source would otherwise be
    staged in pageable memory, which makes the copy to the device synchronous), and that staging copy is a host read.
    """
    if not _pending and x.device == device:  # no copy in flight (always so without offload): nothing to order
        return x
    strided = x.is_pinned() and not (x.is_contiguous() or x.transpose(1, 2).is_contiguous())
    event = _pending.get(_storage_key(x))
    if event is not None:
        if x.device == device or strided:
            wait_on_host(x)
        else:
            ENGINE.wait_on_device(event, device)
    if x.device == device:
        return x
    if strided:
        x = torch.empty(x.shape, dtype=x.dtype, pin_memory=True).copy_(x)
    return x.to(device, non_blocking=x.is_pinned())


def offloaded_saved_tensors() -> AbstractContextManager:
    """Saved-tensor hooks that keep what forward saves for backward in host memory until backward unpacks it.

    Unlike ``torch.autograd.graph.save_on_cpu``, a tensor already in host memory is kept as it is (no second
    pinned copy, no host read of a copy in flight), and the copies are ordered by events, not by a host sync."""

    def pack(tensor: Tensor) -> tuple[torch.device, Tensor]:
        return tensor.device, to_host(tensor)

    def unpack(packed: tuple[torch.device, Tensor]) -> Tensor:
        device, host = packed
        return to_device(host, device)

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)
