"""What the attention methods compared in ``benchmarks/attention.py`` share.

Every method takes this rank's shard of the sequence, q/k/v [B, H, l, D] with l = L / P, in the
method's layout (:attr:`Method.layout`: contiguous, or zigzag for the causal load balancing of
MQSP and ring attention), and returns this rank's rows of the output, unmasked, causal or not
(the benchmark's settings). The pieces here are the substrate they are built on: the counted
collectives of :mod:`lightning_mqsp.comm`, a counted ring shift for point-to-point methods, the
aten CPU flash kernel, and the float64 reference every method is checked against before it is
timed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from lightning_mqsp import comm, shard_sequence
from lightning_mqsp.comm import Pending, ProcessGroup
from lightning_mqsp.layout import Layout

_flash_forward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward

#: Relative error (max abs error / max abs value) a float32 method may have against float64 SDPA.
FP32_TOLERANCE = 1e-4

#: (q, k, v, group, causal) -> this rank's output rows.
AttentionFn = Callable[[Tensor, Tensor, Tensor, "ProcessGroup | None", bool], Tensor]


@dataclass(frozen=True)
class Shape:
    """One benchmark configuration: the full sequence ``length`` L split over ``world_size`` ranks."""

    batch: int
    heads: int
    length: int
    head_dim: int
    world_size: int
    causal: bool = False
    itemsize: int = 4  # float32

    @property
    def local_length(self) -> int:
        return self.length // self.world_size

    def local_elements(self) -> int:
        """Elements of one local q, k or v shard: B x H x l x D."""
        return self.batch * self.heads * self.local_length * self.head_dim

    def score_block_elements(self) -> int:
        """Elements of one rank's l x L row block of the score map, over batch and heads."""
        return self.batch * self.heads * self.local_length * self.length


@dataclass(frozen=True)
class Method:
    """An attention method, its analytic bytes sent per rank per fwd+bwd call, its analytic
    per-rank memory peak (used to skip sizes that would not fit, before running them), and the
    layout of its shards under a causal mask (without one every method is contiguous)."""

    name: str
    attention: AttentionFn
    communication_bytes: Callable[[Shape], dict[str, int]]
    peak_memory_bytes: Callable[[Shape], int]
    causal_layout: Layout = "contiguous"

    def layout(self, causal: bool) -> Layout:
        return self.causal_layout if causal else "contiguous"


def inputs_and_grads_bytes(shape: Shape) -> int:
    """q, k, v, the output gradient, the output and dq, dk, dv: the floor every method pays."""
    return 8 * shape.local_elements() * shape.itemsize


def rank_and_size(group: ProcessGroup | None) -> tuple[int, int]:
    size = comm.group_size(group)
    return (dist.get_rank(group) if size > 1 else 0), size


def ring_shift(x: Tensor, group: ProcessGroup | None) -> Pending:
    """Send ``x`` to the next rank of the ring and receive the previous rank's, asynchronously.

    Counted as ``send_recv`` by :func:`lightning_mqsp.count_communication`: every byte of ``x``
    leaves this rank once. On a group of one rank it returns ``x`` and sends nothing."""
    rank, size = rank_and_size(group)
    if size == 1:
        return Pending(x, None)
    x = x.contiguous()
    received = torch.empty_like(x)
    to_rank = dist.get_global_rank(group, (rank + 1) % size) if group is not None else (rank + 1) % size
    from_rank = dist.get_global_rank(group, (rank - 1) % size) if group is not None else (rank - 1) % size
    comm.record_bytes_sent("send_recv", x.numel() * x.element_size())
    works = dist.batch_isend_irecv([
        dist.P2POp(dist.isend, x, to_rank, group), dist.P2POp(dist.irecv, received, from_rank, group),
    ])
    return _RingPending(received, works)


class _RingPending(Pending):
    """A ring shift in flight: both the send and the receive must finish before the buffers are reused."""

    def __init__(self, result: Tensor, works: list[dist.Work]) -> None:
        super().__init__(result, None)
        self._works = works

    def wait(self) -> Tensor:
        for work in self._works:
            work.wait()
        self._works = []
        return super().wait()


def ring_blocks(x: Tensor, group: ProcessGroup | None) -> Iterator[tuple[int, Tensor]]:
    """Yield ``(owner, block)`` for every rank's ``x``, own block first, then the previous rank's,
    and so on around the ring. The next block is already travelling while the caller computes on
    the current one (P - 1 shifts in all)."""
    rank, size = rank_and_size(group)
    for step in range(size):
        pending = ring_shift(x, group) if step + 1 < size else None
        yield (rank - step) % size, x
        if pending is not None:
            x = pending.wait()


def flash_forward(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool = False) -> tuple[Tensor, Tensor]:
    """aten's CPU flash kernel: out [B, H, M, D] and float32 log-sum-exp [B, H, M]; no M x N map is
    kept. ``causal``: row i sees keys 0..i (top-left aligned, as ``is_causal`` of SDPA)."""
    out, lse = _flash_forward(q, k, v, 0.0, causal, scale=scale)
    return out, lse


def flash_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float, causal: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """The kernel's backward. Fed the *global* out and lse of the rows, it gives exactly the
    gradient share of the keys ``k``/``v`` passed in (the ring-attention trick)."""
    return _flash_backward(dout, q, k, v, out, lse, 0.0, causal, scale=scale)


class LocalFlashAttention(torch.autograd.Function):
    """Single-device attention on the aten CPU flash kernel (what CPU SDPA runs for these inputs),
    saving only out and lse for backward."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool) -> Tensor:  # type: ignore[override]
        out, lse = flash_forward(q, k, v, scale, causal)
        ctx.scale, ctx.causal = scale, causal
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, dout: Tensor) -> tuple[Tensor, Tensor, Tensor, None, None]:  # type: ignore[override]
        q, k, v, out, lse = ctx.saved_tensors
        return (*flash_backward(dout.contiguous(), q, k, v, out, lse, ctx.scale, ctx.causal), None, None)


def gather_sequence(x: Tensor, group: ProcessGroup | None) -> Tensor:
    """[B, H, l, D] -> [B, H, P*l, D] in rank order (a blocking all-gather)."""
    gathered = comm.all_gather(x, group).wait()  # [P, B, H, l, D]
    return gathered.movedim(0, 2).flatten(2, 3)


def scatter_sequence_sum(x: Tensor, group: ProcessGroup | None) -> Tensor:
    """[B, H, P*l, D] on every rank -> [B, H, l, D]: this rank's rows, summed over ranks."""
    _, size = rank_and_size(group)
    per_rank = x.unflatten(2, (size, x.size(2) // size)).movedim(2, 0)
    return comm.reduce_scatter(per_rank, group).wait()


class GatherSequence(torch.autograd.Function):
    """All-gather along the sequence; backward reduce-scatters the gradient to the rows' owners."""

    @staticmethod
    def forward(ctx, x: Tensor, group: ProcessGroup | None) -> Tensor:  # type: ignore[override]
        ctx.group = group
        return gather_sequence(x, group)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return scatter_sequence_sum(grad, ctx.group), None


def default_scale(q: Tensor) -> float:
    return q.size(-1) ** -0.5


def causal_mask(local_length: int, rank: int, world_size: int) -> Tensor:
    """Bool [l, L]: which keys of the whole sequence the rows of this rank's contiguous shard see."""
    rows = torch.arange(rank * local_length, (rank + 1) * local_length).view(-1, 1)
    return torch.arange(world_size * local_length).view(1, -1) <= rows


# ---------------------------------------------------------------------------------------------
# Correctness: every method against single-process float64 SDPA, before anything is timed.


def make_inputs(shape: Shape, seed: int = 0) -> dict[str, Tensor]:
    """Full-sequence float32 q, k, v and an output gradient, the same on every rank (seeded)."""
    g = torch.Generator().manual_seed(seed)
    size = (shape.batch, shape.heads, shape.length, shape.head_dim)
    return {name: torch.randn(size, generator=g) for name in ("q", "k", "v", "dout")}


def local_shard(x: Tensor, rank: int, world_size: int, layout: Layout = "contiguous") -> Tensor:
    """This rank's shard of a full [B, H, L, D] tensor in ``layout``."""
    return shard_sequence(x, 2, rank, world_size, layout).contiguous()


def float64_reference(inputs: dict[str, Tensor], causal: bool = False) -> dict[str, Tensor]:
    """out, dq, dk, dv of full-sequence ``scaled_dot_product_attention`` in float64."""
    q, k, v = (inputs[n].double().requires_grad_() for n in "qkv")
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    out.backward(inputs["dout"].double())
    return {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}


def relative_error(actual: Tensor, expected: Tensor) -> float:
    """max |actual - expected| / max |expected|."""
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


def reference_errors(method: Method, shape: Shape, group: ProcessGroup | None = None, seed: int = 0) -> dict[str, float]:
    """Relative errors of this rank's out, dq, dk, dv against the float64 reference's shard (in the
    method's layout), causal when ``shape`` is."""
    rank, world_size = rank_and_size(group)
    layout = method.layout(shape.causal)
    inputs = make_inputs(shape, seed)
    expected = float64_reference(inputs, shape.causal)
    q, k, v = (local_shard(inputs[n], rank, world_size, layout).requires_grad_() for n in "qkv")
    out = method.attention(q, k, v, group, shape.causal)
    out.backward(local_shard(inputs["dout"], rank, world_size, layout))
    actual = {"out": out, "dq": q.grad, "dk": k.grad, "dv": v.grad}
    return {name: relative_error(value, local_shard(expected[name], rank, world_size, layout)) for name, value in actual.items()}
