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

from lightning_mqsp import chunked_cross_entropy, mqsp_attention, offload


class _LateCopy:
    """A copy in flight: its bytes land at the first wait."""

    def __init__(self, copy: Tensor, source: Tensor) -> None:
        self.copy, self.source = copy, source.detach().clone()

    def land(self) -> None:
        if self.source is not None:
            self.copy.copy_(self.source)
            self.source = None


def _storage(x: Tensor) -> int:
    return x.untyped_storage().data_ptr()


class LateCopyEngine(offload.CopyEngine):
    """Every floating-point tensor is copied (the CPU stands in for the device): a copy to the host and a copy back
    read NaN until a wait lands them. A copy back reads its source when it starts, after the event it is given (as
    the copy stream waits for it): without that event, it reads a copy to the host that has not landed."""

    def __init__(self) -> None:
        super().__init__()
        self.started = self.brought = self.host_waits = 0
        self.copies: set[int] = set()  # storages of the tensors in "host memory" (a CPU tensor on a GPU)
        self.log: list[str] = []  # "bring" at each copy back started (the test of the prefetch adds its own marks)

    def needs_copy(self, x: Tensor) -> bool:
        return x.is_floating_point() and _storage(x) not in self.copies

    def start(self, x: Tensor) -> tuple[Tensor, Any]:
        self.started += 1
        host = torch.full_like(x, float("nan"))
        self.copies.add(_storage(host))
        weakref.finalize(host, self.copies.discard, _storage(host))
        return host, _LateCopy(host, x)

    def bring(self, x: Tensor, device: torch.device, after: Any) -> tuple[Tensor, Any]:
        self.brought += 1
        self.log.append("bring")
        if after is not None:  # the copy stream's wait for the copy to the host
            after.land()
        copy = torch.full_like(x, float("nan"))
        return copy, _LateCopy(copy, x)

    def wait_on_host(self, event: Any) -> None:
        self.host_waits += 1
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
    """Rows stored densely (the sequence-major query's) come back on the copy stream after the copy to the host, and
    the reader waits for them on the device, not on the host; a head group's strided rows go through a staging copy,
    a host read that waits on the host first; a tensor with no copy in flight is moved as it is."""
    cpu = torch.device("cpu")
    with late_copies() as engine:
        source = torch.arange(24.0).view(1, 3, 2, 4).transpose(1, 2)  # [batch, heads, rows, dim], sequence-major
        copy = offload.to_host(source)
        assert torch.isnan(copy).all()  # in flight
        rows = offload.to_device(copy[:, :, 1:], cpu)
        torch.testing.assert_close(rows, source[:, :, 1:])
        assert (engine.brought, engine.host_waits) == (1, 0)
        head_rows = offload.to_device(copy[:, :1, 1:], cpu)
        torch.testing.assert_close(head_rows, source[:, :1, 1:])
        assert (engine.brought, engine.host_waits) == (2, 1)
        plain = torch.ones(3)
        assert offload.to_device(plain, cpu) is plain
        later = offload.to_host(source * 2)
        offload.wait_on_host(later)
        torch.testing.assert_close(later, source * 2)


@pytest.mark.parametrize("prefetch", [True, False])
def test_backward_brings_the_next_layers_input_back_while_this_layer_runs(prefetch: bool) -> None:
    """Under activation checkpointing forward saves each layer's input; backward recomputes the layers last to first.
    Unpacking a layer's input starts the copy back of the one before it, so it is on its way while this layer is
    recomputed and differentiated: the gradients are exact, and every copy back but the first starts a layer early.
    Without prefetch each copy back starts when its layer asks for it (one checkpoint less on the device)."""
    torch.manual_seed(0)
    layers = [torch.nn.Linear(8, 8) for _ in range(3)]
    x = torch.randn(4, 8)

    def gradients(offloaded: bool) -> list[Tensor]:
        inputs = x.clone().requires_grad_()
        with offload.offloaded_saved_tensors(prefetch=prefetch) if offloaded else nullcontext():
            y = inputs * 1
            for layer in layers:
                y = checkpoint(lambda t, layer=layer: layer(t).tanh(), y, use_reentrant=False)
        y.square().sum().backward()
        grads = [inputs.grad, *(p.grad.clone() for layer in layers for p in layer.parameters())]
        for layer in layers:
            layer.zero_grad()
        return grads

    expected = gradients(offloaded=False)
    with late_copies() as engine:
        for i, layer in enumerate(layers):
            layer.register_forward_pre_hook(lambda module, args, i=i: engine.log.append(f"layer {i}"))
        actual = gradients(offloaded=True)
    assert all(torch.equal(a, e) for a, e in zip(actual, expected))
    forward = ["layer 0", "layer 1", "layer 2"]
    if prefetch:
        assert engine.log == [*forward, "bring", "bring", "layer 2", "bring", "layer 1", "layer 0"]
    else:
        assert engine.log == [*forward, "bring", "layer 2", "bring", "layer 1", "bring", "layer 0"]


def test_what_is_saved_inside_kept_on_device_stays_there() -> None:
    """The chunked loss's inputs, which backward needs first, stay on the device under offload_activations: no copy
    is made of them, and the gradients are exact."""
    torch.manual_seed(0)
    hidden, head = torch.randn(16, 8), torch.nn.Linear(8, 11)
    labels = torch.randint(0, 11, (16,))

    def gradients(offloaded: bool) -> tuple[list[Tensor], int]:
        inputs = hidden.clone().requires_grad_()
        copies = []
        to_host = offload.to_host
        offload.to_host = lambda t: copies.append(t) or to_host(t)  # type: ignore[assignment]
        try:
            with offload.offloaded_saved_tensors() if offloaded else nullcontext():
                loss = chunked_cross_entropy(inputs * 1, head, labels, chunk_size=4)
        finally:
            offload.to_host = to_host  # type: ignore[assignment]
        loss.backward()
        grads = [inputs.grad, *(p.grad.clone() for p in head.parameters())]
        head.zero_grad()
        return grads, len(copies)

    expected, _ = gradients(offloaded=False)
    actual, copies = gradients(offloaded=True)
    assert copies == 0 and all(torch.equal(a, e) for a, e in zip(actual, expected))
