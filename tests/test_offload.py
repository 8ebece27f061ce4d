"""Host copies and the order of their reads (lightning_mqsp/offload.py), on the CPU.

On a GPU a device-to-host copy lands after the call that starts it returns. The CPU's copies are synchronous, so
these tests swap the copy engine for a double whose copies hold NaN until a wait (on the host or on the device's
stream) lands the real bytes: a read that the code does not order after its copy sees NaN, as it would see stale
bytes on a GPU, and the results stop matching the reference.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import pytest
import torch
from reference import relative_error
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from lightning_mqsp import mqsp_attention, offload


class _LateCopy:
    """A copy in flight: its bytes land at the first wait."""

    def __init__(self, host: Tensor, source: Tensor) -> None:
        self.host, self.source = host, source.detach().clone()

    def land(self) -> None:
        if self.source is not None:
            self.host.copy_(self.source)
            self.source = None


class LateCopyEngine(offload.CopyEngine):
    """Every tensor is copied (the CPU stands in for the device); a copy reads NaN until a wait lands it."""

    def __init__(self) -> None:
        self.started = 0
        self.copies: set[int] = set()  # ids of the tensors in "host memory" (a CPU tensor on a GPU)

    def needs_copy(self, x: Tensor) -> bool:
        return x.is_floating_point() and id(x) not in self.copies

    def start(self, x: Tensor) -> tuple[Tensor, Any]:
        self.started += 1
        host = torch.full_like(x, float("nan"))
        self.copies.add(id(host))
        weakref.finalize(host, self.copies.discard, id(host))
        return host, _LateCopy(host, x)

    def wait_on_host(self, event: Any) -> None:
        event.land()

    def wait_on_device(self, event: Any, device: torch.device) -> None:
        event.land()


@contextmanager
def late_copies() -> Iterator[LateCopyEngine]:
    engine, real = LateCopyEngine(), offload.ENGINE
    offload.ENGINE = engine
    try:
        yield engine
    finally:
        offload.ENGINE = real


def _attention_step(head_groups: int, hooks: str, checkpointed: bool) -> dict[str, Tensor]:
    """Output and gradients of a causal GQA attention on this rank (24 tokens of a sequence split over the pool's
    ranks, micro-steps of 4 rows), with the queries offloaded under ``hooks`` ("none", "ours", "save_on_cpu")."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 4, 24, 8, requires_grad=True) for _ in range(3))
    dout = torch.randn(1, 4, 24, 8)

    def attend(query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        return mqsp_attention(query * 1, key[:, :2], value[:, :2], causal=True, micro_q_size=4, offload_queries=hooks != "plain",
                              head_groups=head_groups)

    hook = {"ours": offload.offloaded_saved_tensors, "save_on_cpu": _save_on_cpu_as_on_a_gpu}.get(hooks)
    with hook() if hook is not None else nullcontext():
        out = checkpoint(attend, q, k, v, use_reentrant=False) if checkpointed else attend(q, k, v)
    out.backward(dout)
    return {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}


def _save_on_cpu_as_on_a_gpu() -> Any:
    """``torch.autograd.graph.save_on_cpu(pin_memory=True)`` as it runs on a GPU: every saved tensor copied into new
    host memory with a host ``copy_`` (on a CPU it keeps the tensor itself, which would show nothing)."""

    def pack(tensor: Tensor) -> tuple[torch.device, Tensor]:
        return tensor.device, torch.empty(tensor.size(), dtype=tensor.dtype).copy_(tensor)

    def unpack(packed: tuple[torch.device, Tensor]) -> Tensor:
        device, host = packed
        return host.to(device)

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


def _errors(actual: dict[str, Tensor], expected: dict[str, Tensor]) -> dict[str, float]:
    return {name: relative_error(actual[name], expected[name]) for name in expected}


def late_copy_errors(head_groups: int, hooks: str, checkpointed: bool) -> tuple[dict[str, float], int]:
    """Errors of the offloaded step under late copies against the plain step, and the number of copies started."""
    expected = _attention_step(head_groups, "plain", checkpointed=False)
    with late_copies() as engine:
        actual = _attention_step(head_groups, hooks, checkpointed)
    return _errors(actual, expected), engine.started


@pytest.mark.parametrize("checkpointed", [False, True], ids=["saved", "checkpointed"])
@pytest.mark.parametrize("hooks", ["none", "ours"], ids=["attention", "with-offloaded-activations"])
@pytest.mark.parametrize("head_groups", [1, 2])
def test_every_read_of_an_offloaded_query_waits_for_its_copy(workers, head_groups: int, hooks: str, checkpointed: bool) -> None:
    """Offloaded queries under copies that land late: backward's reads of each micro-step's rows (through a pinned
    staging copy for a head group's strided rows), the checkpoint's recompute, and the strategies' offload of what
    forward saves all wait for the copy: output and gradients exact, on one rank and on two."""
    results = [late_copy_errors(head_groups, hooks, checkpointed)]
    results += workers(2).run(late_copy_errors, head_groups, hooks, checkpointed)
    for errors, started in results:
        assert all(error < 1e-6 for error in errors.values()), errors  # False for NaN
        assert started > 0


def test_offloaded_activations_keep_a_host_copy_as_it_is() -> None:
    """The strategies' offload copies what forward saves once: the query, in host memory already, is not copied again
    (``save_on_cpu`` pinned it a second time, with a host read of the copy in flight)."""
    _, started_alone = late_copy_errors(1, "none", checkpointed=False)
    _, started_with_hooks = late_copy_errors(1, "ours", checkpointed=False)
    saved_on_device = 5  # key, value, output and the two row statistics: the query is saved as its host copy
    assert started_alone == 1 and started_with_hooks == 1 + saved_on_device


def test_the_double_sees_a_read_before_the_copy_lands() -> None:
    """The double is sharp: ``save_on_cpu`` (what the strategies used before) copies the offloaded query on the host as
    soon as forward saves it, before the copy has landed, and the result is wrong."""
    errors, _ = late_copy_errors(1, "save_on_cpu", checkpointed=False)
    assert not all(error < 1e-6 for error in errors.values()), errors


def test_to_device_orders_reads_on_the_device_and_on_the_host() -> None:
    """Contiguous rows wait on the device's stream; strided rows and host reads wait on the host; a tensor that is
    not a pending copy is moved as it is."""
    with late_copies():
        source = torch.arange(24.0).view(1, 2, 3, 4)
        copy = offload.to_host(source)
        assert torch.isnan(copy).all()  # in flight
        rows = offload.to_device(copy[:, :, 1:], torch.device("cpu"))
        torch.testing.assert_close(rows, source[:, :, 1:])
        plain = torch.ones(3)
        assert offload.to_device(plain, torch.device("cpu")) is plain
        later = offload.to_host(source * 2)
        offload.wait_on_host(later)
        torch.testing.assert_close(later, source * 2)
