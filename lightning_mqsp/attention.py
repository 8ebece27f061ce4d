"""``mqsp_attention``: exact attention over a sequence split across the ranks of a group.

Per rank (``docs/design.md``, "The algorithm"): queries are all-gathered one micro-step of
``micro_q_size`` rows at a time, keys and values never leave the rank, each rank computes the
column block of the attention map that belongs to its keys, and a distributed softmax merges
the P partial results of every row at the row's owner (:mod:`lightning_mqsp.merge`). Backward
recomputes each micro-step from the saved inputs; nothing of size (P x micro_q_size) x S_local
outlives a step. On one rank the local kernel runs on blocks of query rows, without collectives.

Communication overlaps compute: the next micro-step's gather is issued before the current
step computes, and each step's outputs travel back while the next step computes.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any, Literal, TypeVar, overload

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_mqsp import comm, merge, offload
from lightning_mqsp.backends import LocalAttentionBackend, accumulation_dtype, joined_rows, resolve_backend
from lightning_mqsp.comm import ProcessGroup
from lightning_mqsp.dropout import draw_seed
from lightning_mqsp.layout import Layout, Run, position_runs, run_positions, slice_runs
from lightning_mqsp.validation import FIELDS as SIGNATURE_FIELDS
from lightning_mqsp.validation import Signature, check_across_ranks, group_membership_error, local_input_error
from lightning_mqsp.visibility import Visibility, Window

Gathered = TypeVar("Gathered")
Inputs = TypeVar("Inputs")

#: With micro_q_size=None each micro-step gathers about this many query rows from the whole group
#: (2048: each step has a fixed cost, in collectives and in adding the step's dK/dV of every local key
#: into the accumulators; 1024 was 2-4% slower on causal CPU runs at L=8k-16k, docs/benchmarks.md).
AUTO_GATHERED_ROWS = 2048


#: With micro_q_size=None on a GPU, the bytes one micro-step's buffers may take (its gathered rows and their prefetched
#: successors, the partial results in flight both ways): 256 MiB, 0.3% of an 80 GB device. For Llama-8B's 32 heads of
#: 128 that is about 4000 gathered rows a step, whose kernels keep an H100 busy about 2 ms at L = 128k, P = 8, where the step's
#: launches take some 0.1 ms of host time: steps sized on the CPU (2048 rows) left the device waiting on the host.
DEVICE_STEP_BYTES = 256 * 2**20


def step_bytes_per_gathered_row(heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Device bytes a micro-step holds per gathered row: the larger of the forward (the row and its prefetched successor,
    its partial result sent and the partials received: 2 s D + 2 x 4 (D + 2)) and the backward (the gathered row of
    ``backward_row_width`` and its successor, the partial dQ sent and received: 2 s W + 2 x 4 D), times the heads."""
    itemsize, accumulator = dtype.itemsize, accumulation_dtype(dtype).itemsize
    forward = 2 * itemsize * head_dim + 2 * accumulator * (head_dim + 2)
    backward = 2 * itemsize * backward_row_width(head_dim, dtype) + 2 * accumulator * head_dim
    return heads * max(forward, backward)


def auto_micro_q_size(local_length: int, world_size: int, row_bytes: int | None = None) -> int:
    """Rows per rank per micro-step when none is given.

    On the CPU (``row_bytes`` None): about AUTO_GATHERED_ROWS gathered rows a step, so the step's buffers stay a
    constant size however long the sequence grows; and no more than half the rank's own rows, l/2: a step holds
    about seven times its gathered queries (the queries and output gradients with their prefetched successors, the
    output stand-in and dQ of the cpu_flash backward), next to about eight of the rank's own q-sized tensors, so on
    shorter sequences (l < 2 x AUTO_GATHERED_ROWS, e.g. L=4k over P=2 or 4) a full-size step would outweigh them.
    But at least AUTO_GATHERED_ROWS / 4 rows (all of them on tiny sequences): below that the step's fixed costs
    outweigh what it saves.

    On a GPU (``row_bytes``: :func:`step_bytes_per_gathered_row`): as many gathered rows as DEVICE_STEP_BYTES holds,
    at least AUTO_GATHERED_ROWS, at most the rank's rows: a step's launches cost the host the same at any size, so
    steps as large as the memory budget allows keep the device busy."""
    if row_bytes is None:
        gathered = min(AUTO_GATHERED_ROWS, max(local_length // 2, AUTO_GATHERED_ROWS // 4))
    else:
        gathered = max(AUTO_GATHERED_ROWS, DEVICE_STEP_BYTES // row_bytes)
    return max(1, min(local_length, math.ceil(gathered / world_size)))


def communication_bytes(
    *, batch: int, heads: int, kv_heads: int, local_length: int, head_dim: int, world_size: int,
    dtype: torch.dtype, backward: bool = True, include_check: bool = False, causal: bool = False,
    window: tuple[int | None, int | None] | None = None, layout: Layout = "contiguous", micro_q_size: int | None = None,
    rank: int = 0, head_groups: int = 1, aligned_rows: bool = True,
) -> dict[str, int]:
    """Bytes rank ``rank`` sends in one call (forward, plus backward if asked), per collective.

    Per micro-step of c rows a rank: its queries, c x H x D in the input dtype, go to every other rank whose keys
    see some of them (``docs/design.md``, "Sparse exchange"), and it returns the partial outputs with their two row
    statistics, c x H x (D+2) in float32, to every other rank whose rows its keys saw. Backward: the queries and
    output gradients (2D, input dtype) with three float32 row statistics (with ``aligned_rows``, as the Triton
    backend sends them, the row padded to 16 elements: ``backward_row_width``) go the same way as the queries, the
    partial query gradients (D, float32) the same way as the outputs. Without a mask every rank sees every row:
    (P-1)/P x L x H x (D + D+2) forward. A step whose rows every rank sees (all of them without a mask) all-gathers
    its queries (on gloo the forward sends them by ``comm.exchange``: the same bytes, counted as an all-gather) and
    reduce-scatters its query gradients; every other transfer is an all-to-all (``comm.exchange``). Independent of
    the key/value heads: keys and values never travel. ``include_check`` adds the check of a new signature (the
    first call of its kind on a group): one row of int64s. Not counted: document ids and a dropout seed, when those
    are used. Under a causal mask or a window the ranks send different amounts. With ``head_groups`` the backward's
    steps take that many times the rows for as many times fewer heads: the same bytes, unless wider steps change
    which ranks see a step's rows.
    """
    if world_size == 1:
        return {}
    itemsize = torch.empty((), dtype=dtype).element_size()
    accumulator = accumulation_dtype(dtype).itemsize
    visible = Window.of(causal, window)
    sent: Counter[str] = Counter()
    step = micro_q_size or auto_micro_q_size(local_length, world_size)

    def routes(rows_per_step: int) -> Iterator[tuple[_Route, int]]:
        for start in range(0, local_length, rows_per_step):
            stop = min(start + rows_per_step, local_length)
            yield _route(world_size, rank, layout, local_length, visible, start, stop), batch * heads * (stop - start)

    for route, rows in routes(step):
        sent["all_gather" if route.dense else "all_to_all"] += (len(route.destinations) - 1) * rows * head_dim * itemsize
        sent["all_to_all"] += (len(route.sources) - 1) * rows * (head_dim + 2) * accumulator
    gathered_row = backward_row_width(head_dim, dtype, aligned_rows) * itemsize  # queries, output gradients, statistics
    for route, rows in routes(min(local_length, step * head_groups)) if backward else ():
        sent["all_gather" if route.dense else "all_to_all"] += (len(route.destinations) - 1) * rows * gathered_row
        sent["reduce_scatter" if route.dense else "all_to_all"] += (len(route.sources) - 1) * rows * head_dim * accumulator
    if include_check:
        sent["all_gather"] += (world_size - 1) * (1 + len(SIGNATURE_FIELDS)) * 8
    return {name: n for name, n in sent.items() if n}


def backward_row_width(head_dim: int, dtype: torch.dtype, aligned: bool = True) -> int:
    """Elements of ``dtype`` in a row that a backward micro-step gathers: the query, its output gradient and three
    float32 statistics (row_max, row_log_sum, delta); ``aligned`` (for backends that read the rows where they
    arrive: Triton) padded to a multiple of 16 elements, so that every row starts 16-element aligned (the kernels'
    loads of Q and dO vectorise)."""
    width = 2 * head_dim + -(-3 * accumulation_dtype(dtype).itemsize // dtype.itemsize)
    return -(-width // 16) * 16 if aligned else width


@dataclass(frozen=True)
class _Route:
    """Which ranks exchange one micro-step's rows (``docs/design.md``, "Sparse exchange"): this rank's keys
    see some rows of each rank in ``sources`` (it receives their queries and returns their partials), and
    the keys of each rank in ``destinations`` see some of this rank's rows. Both ascend and hold this rank
    (window sides are >= 0: every row sees its own position). ``dense``: every rank of the group sees
    rows of every rank, so the rows travel by all-gather and the query gradients return by reduce-scatter."""

    sources: tuple[int, ...]
    destinations: tuple[int, ...]
    dense: bool


@functools.cache
def _route(world_size: int, rank: int, layout: Layout, local_length: int, window: Window, start: int, stop: int) -> _Route:
    """``rank``'s route for the rows [start, stop) of every rank, from the host-known runs and the window alone
    (padding and documents may hide more; they are not known on the host, so such rows still travel). Every
    rank derives the routes of all ranks alike, so their exchanges match. Cached: each step of a signature
    is planned once per process (P^2 pair checks for a dense step)."""
    def first_and_last(runs: tuple[Run, ...]) -> list[tuple[int, int]]:
        return [(position, position + (stop_ - start_) - 1) for start_, stop_, position in runs]

    rows = [first_and_last(slice_runs(position_runs(local_length, r, world_size, layout), start, stop)) for r in range(world_size)]
    keys = [first_and_last(position_runs(local_length, r, world_size, layout)) for r in range(world_size)]

    def sees(key_rank: int, row_rank: int) -> bool:
        return any(window.sees_any(*row, *key) for row in rows[row_rank] for key in keys[key_rank])

    sources = tuple(s for s in range(world_size) if sees(rank, s))
    destinations = tuple(r for r in range(world_size) if sees(r, rank))
    dense = window.is_full or all(sees(r, s) for r in range(world_size) for s in range(world_size))
    return _Route(sources, destinations, dense)


@dataclass(frozen=True)
class _Plan:
    """Everything about one call that is not a tensor: the same on every call with the same signature."""

    group: ProcessGroup | None
    world_size: int
    rank: int
    device: torch.device
    backend: LocalAttentionBackend
    layout: Layout
    local_length: int
    micro_q_size: int
    window: Window
    softcap: float | None
    scale: float
    dropout_p: float
    head_groups: int
    offload_queries: bool

    def steps(self, rows: int) -> list[tuple[int, int]]:
        return [(start, min(start + rows, self.local_length)) for start in range(0, self.local_length, rows)]

    @property
    def backward_rows(self) -> int:
        """Local rows a backward step takes: a forward step's, times ``head_groups``, for that many times fewer heads
        (the same bytes a step)."""
        return min(self.local_length, self.micro_q_size * self.head_groups)

    def runs(self, rank: int) -> tuple[Run, ...]:
        return position_runs(self.local_length, rank, self.world_size, self.layout)

    def route(self, start: int, stop: int) -> _Route:
        return _route(self.world_size, self.rank, self.layout, self.local_length, self.window, start, stop)

    def gathered_runs(self, start: int, stop: int, sources: tuple[int, ...]) -> tuple[Run, ...]:
        """The runs of the rows [start, stop) of the ranks ``sources``, gathered rank after rank."""
        return tuple(run for i, r in enumerate(sources) for run in slice_runs(self.runs(r), start, stop, i * (stop - start)))


@dataclass(frozen=True)
class _Masks:
    """The tensors that say what is visible: this rank's key padding [B, l], every rank's document ids [P, B, l],
    the group's dropout seed. Positions are not among them: a step's are made from the plan's runs when it runs, as
    every rank's [P, l] would be 8 bytes a token of the whole sequence, kept per layer until its backward (7 GB of a
    Llama-8B step at L = 28M, P = 32)."""

    key_padding_mask: Tensor | None
    documents: Tensor | None
    dropout_seed: Tensor | None

    @property
    def may_hide_every_key(self) -> bool:
        """Whether a row may see no key on any rank: only padding or documents can do that (every window shows a
        row its own position)."""
        return self.key_padding_mask is not None or self.documents is not None

    def visibility(self, plan: _Plan, step: tuple[int, int, tuple[int, ...]]) -> Visibility:
        """Rows [start, stop) of the ranks ``sources`` (``step``), gathered rank after rank, against this rank's keys."""
        start, stop, sources = step
        key_documents = None if self.documents is None else self.documents[plan.rank]
        query_documents = None
        if self.documents is not None:
            documents = _of_ranks(self.documents, sources)[:, :, start:stop]
            query_documents = documents.movedim(0, 1).reshape(self.documents.size(1), -1)
        query_runs, key_runs = plan.gathered_runs(start, stop, sources), plan.runs(plan.rank)
        return Visibility(
            query_positions=_positions(query_runs, plan.device), key_positions=_positions(key_runs, plan.device),
            query_runs=query_runs, key_runs=key_runs, query_segments=len(sources), window=plan.window,
            key_padding_mask=self.key_padding_mask, query_documents=query_documents, key_documents=key_documents,
            softcap=plan.softcap, dropout_p=plan.dropout_p, dropout_seed=self.dropout_seed,
        )


#: Position tensors kept for reuse, one a micro-step signature (8 bytes a gathered row each: every step of a layer
#: shape, forward and backward, 16 MB at L = 1M; no more than this many, at most 8 bytes x this x the rows of a step).
_CACHED_POSITIONS = 1024


def _positions(runs: tuple[Run, ...], device: torch.device) -> Tensor:
    """The positions of ``runs`` on ``device``: made once per micro-step signature and reused by every layer and step
    that has the same runs (each step made them anew: four to six launches a step, ``docs/design.md``, "Launches").
    Fake tensors (memory estimates) and graphs being traced make their own."""
    if torch.compiler.is_compiling() or torch._guards.detect_fake_mode() is not None:
        return run_positions(runs, device)
    return _cached_positions(runs, device)


@functools.lru_cache(maxsize=_CACHED_POSITIONS)
def _cached_positions(runs: tuple[Run, ...], device: torch.device) -> Tensor:
    with torch.inference_mode(False):  # a normal tensor, usable outside inference mode too
        return run_positions(runs, device)


def _of_ranks(x: Tensor, ranks: tuple[int, ...]) -> Tensor:
    """The slices ``ranks`` of x [P, ...] (a view when they are consecutive, as they are for windows)."""
    if ranks == tuple(range(ranks[0], ranks[-1] + 1)):
        return x[ranks[0] : ranks[-1] + 1]
    return x[list(ranks)]


@overload
def _share_rows(
    rows: Tensor, route: _Route, plan: _Plan, what: str, all_gather_dense: bool = ..., one_buffer: Literal[True] = ...,
) -> Callable[[], Tensor]: ...
@overload
def _share_rows(
    rows: Tensor, route: _Route, plan: _Plan, what: str, all_gather_dense: bool = ..., one_buffer: bool = ...,
) -> Callable[[], Tensor | list[Tensor]]: ...
def _share_rows(
    rows: Tensor, route: _Route, plan: _Plan, what: str, all_gather_dense: bool = True, one_buffer: bool = True,
) -> Callable[[], Tensor] | Callable[[], Tensor | list[Tensor]]:
    """Send this rank's rows of a micro-step [B, H, c, X] to the ranks whose keys see them. The call returned waits
    for the rows of ``route.sources`` and returns them where they arrived, [n, B, H, c, X] (source order), with no
    copy joining them. Dense steps all-gather (unless ``all_gather_dense`` is false: then they exchange a copy with
    every other rank, as the sparse steps do); the others exchange only between ranks that see something. Rows go
    in the order they are stored: sequence-major queries ([B, c, H, X] in memory, as a Hugging Face layer makes
    them) travel without a copy into head-major order. Without ``one_buffer`` (for a caller that joins the rows by
    a copy anyway) an exchange returns a list, one [B, H, c, X] per source, whose own rows are ``rows`` themselves:
    no slot is made for them."""
    sequence_major = not rows.is_contiguous() and rows.transpose(1, 2).is_contiguous()
    stored = rows.transpose(1, 2) if sequence_major else rows
    buffer: Tensor | None = None
    if route.dense and all_gather_dense:
        pending = comm.all_gather(stored, plan.group, what)
    elif one_buffer:
        pending, buffer = _exchange_rows(stored, route, plan, what)
    else:
        to, received_from = (tuple(r for r in ranks if r != plan.rank) for ranks in (route.destinations, route.sources))
        pending = comm.exchange(stored.unsqueeze(0).expand(len(to), *stored.shape), to, received_from, plan.group, what,
                                counted_as="all_gather" if route.dense else "all_to_all")

    def arrive() -> Tensor | list[Tensor]:
        received = pending.wait()
        if not one_buffer and not (route.dense and all_gather_dense):
            others = iter(received.transpose(2, 3) if sequence_major else received)
            return [rows if source == plan.rank else next(others) for source in route.sources]
        arrived = received if buffer is None else buffer
        return arrived.transpose(2, 3) if sequence_major else arrived

    return arrive


def _exchange_rows(stored: Tensor, route: _Route, plan: _Plan, what: str) -> tuple[comm.Pending, Tensor | None]:
    """The exchange of a micro-step's rows, and the [n, ...] buffer the rows of ``route.sources`` arrive in (None: the
    exchange's own result). A rank sends its rows to the others only, and its own go into their slot by a copy:
    sending them to itself too took a copy in the send buffer and one in the receive buffer (10% of the backward's
    peak at P = 2, causal). Where its own slot is the first or the last (every causal route), the others' rows
    arrive around it in one piece; otherwise (the middle ranks of a window) its own rows go through the exchange."""
    own = route.sources.index(plan.rank)
    counted_as = "all_gather" if route.dense else "all_to_all"
    if own not in (0, len(route.sources) - 1):
        copies = stored.unsqueeze(0).expand(len(route.destinations), *stored.shape)
        return comm.exchange(copies, route.destinations, route.sources, plan.group, what, counted_as), None
    to = tuple(r for r in route.destinations if r != plan.rank)
    buffer = stored.new_empty((len(route.sources), *stored.shape))
    others = buffer[1:] if own == 0 else buffer[:-1]
    pending = comm.exchange(stored.unsqueeze(0).expand(len(to), *stored.shape), to,
                            tuple(s for s in route.sources if s != plan.rank), plan.group, what, counted_as, out=others)
    buffer[own].copy_(stored)
    return pending, buffer


def _return_to_sources(parts: Tensor, route: _Route, plan: _Plan, what: str) -> comm.Pending:
    """Slice i of ``parts`` [len(sources), ...] back to ``route.sources[i]``; arrives as [len(destinations), ...]:
    what the ranks that see this rank's rows computed for them."""
    return comm.exchange(parts, route.sources, route.destinations, plan.group, what)


def _run_micro_steps(
    num_steps: int,
    gather: Callable[[int], Gathered],
    unpack: Callable[[Gathered], Inputs],
    compute: Callable[[int, Inputs], comm.Pending],
    finish: Callable[[int, Tensor], None],
) -> None:
    """The micro-step loop of forward and backward, with communication overlapping compute.

    Step j's gathered inputs are unpacked (freeing the raw receive buffers) before step j+1's
    gather is issued; step j's result is sent back while step j+1 computes, and ``finish``
    stores it once it has arrived.
    """
    next_gather = gather(0)
    in_flight: tuple[int, comm.Pending] | None = None
    for j in range(num_steps):
        inputs = unpack(next_gather)
        if j + 1 < num_steps:
            next_gather = gather(j + 1)
        returned = compute(j, inputs)
        del inputs  # free this step's buffers before the next step allocates its own
        if in_flight is not None:
            finish(in_flight[0], in_flight[1].wait())
        in_flight = (j, returned)
    assert in_flight is not None
    finish(in_flight[0], in_flight[1].wait())


def _without_autocast(function: Callable[..., Any]) -> Callable[..., Any]:
    """Run an autograd Function's forward or backward with autocast off: the inputs were cast to the
    autocast dtype already, and partials, merges and statistics must stay in float32."""

    @functools.wraps(function)
    def wrapper(ctx: Any, *args: Any) -> Any:
        device_type = next(a for a in args if isinstance(a, Tensor)).device.type
        with torch.autocast(device_type, enabled=False):
            return function(ctx, *args)

    return wrapper


def _not_twice_differentiable(backward: Callable[..., Any]) -> Callable[..., Any]:
    """Under ``create_graph=True`` the gradients come back, but differentiating them raises (instead of
    silently treating them as constants)."""

    @functools.wraps(backward)
    def wrapper(ctx: Any, *grads: Any) -> Any:
        with torch.no_grad():
            results = backward(ctx, *grads)
        if not torch.is_grad_enabled():
            return results
        tensors = [r for r in results if isinstance(r, Tensor)]
        guard = torch._C._functions.DelayedError(
            b"mqsp_attention is not twice differentiable: its backward cannot be differentiated again "
            b"(create_graph=True, double backward, gradient penalties). Compute such terms with a model that "
            b"runs scaled_dot_product_attention on one device.", len(tensors),
        )
        guarded = iter(guard(*[t.detach().requires_grad_() for t in tensors]))
        return tuple(next(guarded) if isinstance(r, Tensor) else r for r in results)

    return wrapper


#: Rows of [B, H, rows, D] whose float32 copies ``_row_dots`` makes at a time, with every head.
_ROW_DOT_BLOCK = 4096
#: Query rows per kernel call on one rank: Llama-8B's float32 out or dQ of a block is 0.27 GB.
_LOCAL_BLOCK_ROWS = 16384
#: ``_narrow_in_place`` converts in this many pieces: its one temporary is the first piece.
_NARROWING_PIECES = 16


def _row_dots(grad_out: Tensor, out: Tensor, dtype: torch.dtype) -> Tensor:
    """delta = rowsum(grad_out * out) in ``dtype`` ([B, H, rows]), _ROW_DOT_BLOCK rows at a time: the float32 copies of
    the whole sequence would be 4-6 hidden states of a bf16 model at once (P=1). As [1, D] x [D, 1] matmuls: aten's
    sum over a last dimension of 64 is several times slower on CPU."""
    blocks = [
        (g.to(dtype).unsqueeze(-2) @ o.to(dtype).unsqueeze(-1))[..., 0, 0]
        for g, o in zip(grad_out.split(_ROW_DOT_BLOCK, dim=2), out.split(_ROW_DOT_BLOCK, dim=2))
    ]
    return blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=2)


def _narrow_in_place(accumulator: Tensor, dtype: torch.dtype) -> Tensor:
    """``accumulator.to(dtype)`` for a dtype at most half as wide (float32 -> bfloat16), written over the front of the
    accumulator's own storage: the float32 accumulators and their bf16 copies never exist together (at the end of a
    attention backward, 2 KB a token of Llama-8B more: 26.5 -> 26.1 GB at P=1, L=262,144, 3 layers; no change at P=8, whose
    peak falls inside the micro-steps). Piece i
    >= 1 writes bytes that pieces < i have already been read from; piece 0 overlaps its own source, so it goes through
    a temporary. The result keeps the accumulator's storage alive until autograd drops it."""
    if accumulator.dtype == dtype:
        return accumulator
    if not accumulator.is_contiguous() or 2 * dtype.itemsize > accumulator.element_size():
        return accumulator.to(dtype)
    wide = accumulator.view(-1)
    narrow = wide.view(dtype)[: wide.numel()]
    piece = max(1, -(-wide.numel() // _NARROWING_PIECES))
    narrow[:piece].copy_(wide[:piece].to(dtype))
    for start in range(piece, wide.numel(), piece):
        narrow[start : start + piece].copy_(wide[start : start + piece])
    return narrow.view(accumulator.shape)


def _key_value_grads(ctx: Any, grad_key: Tensor, grad_value: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
    """dK and dV in the dtypes of the key and value, from their float32 accumulators: narrowed in the accumulators' own
    storage, except for a leaf tensor, whose ``.grad`` would keep that whole storage (twice its size) for as long as
    it lives: a copy."""
    key_is_leaf, value_is_leaf = ctx.leaf_inputs
    return (grad_key.to(key.dtype) if key_is_leaf else _narrow_in_place(grad_key, key.dtype),
            grad_value.to(value.dtype) if value_is_leaf else _narrow_in_place(grad_value, value.dtype))


def _saved_query(query: Tensor, plan: _Plan) -> Tensor:
    """The query as the forward saves it for backward: in host memory with ``offload_queries`` (the copy is started
    here and read back a micro-step's rows at a time through :func:`offload.to_device`, which orders each read after
    it). The memory estimates replace both to count the copy as host memory (``benchmarks/estimate_memory.py``)."""
    return offload.to_host(query) if plan.offload_queries else query


def _head_groups(groups: int, heads: int, kv_heads: int) -> list[tuple[slice, slice]]:
    """(query heads, key/value heads) of each of the backward's ``groups`` passes: consecutive key/value heads and
    the query heads that share them."""
    q, kv = heads // groups, kv_heads // groups
    return [(slice(g * q, (g + 1) * q), slice(g * kv, (g + 1) * kv)) for g in range(groups)]


#: One backward pass over some heads: (plan, (query, key, value, grad_out, delta, row_max, row_log_sum) of those heads,
#: dQ to fill, dK and dV accumulators to add into); delta = rowsum(grad_out * out), float32.
BackwardPass = Callable[[_Plan, tuple[Tensor, ...], Tensor, Tensor, Tensor], None]


def _backward_by_head_groups(ctx: Any, grad_out: Tensor, run_pass: BackwardPass) -> tuple[Tensor, Tensor, Tensor]:
    """dQ, dK and dV from ``run_pass``: over every head at once, or with ``head_groups`` over each group of heads in
    turn, so that float32 dK and dV accumulators exist for one group's key/value heads at a time (``docs/design.md``,
    "Head groups")."""
    plan: _Plan = ctx.plan
    query, key, value, out, row_max, row_log_sum = ctx.saved_tensors
    dtype = accumulation_dtype(key.dtype)
    # The output is needed for delta alone: once that is made (once for the shard, not a few ops every step), autograd
    # lets go of it (unless the graph is retained) and it is freed here, before the step buffers and dQ exist: one
    # hidden state a token less where a layer's backward peaks. (A compiled graph's saved tensors are AOTAutograd's,
    # which frees them itself.)
    if not torch.compiler.is_compiling():
        ctx.maybe_clear_saved_tensors()
    delta = _row_dots(grad_out, out, dtype)
    del out
    # Each row's query gradient arrives once, summed over ranks in float32: it is stored in the input dtype
    # straight away (the same single rounding as a float32 buffer cast at the end, without that buffer,
    # two bf16 hidden states of memory at the end of a layer's backward). dK and dV add up over the
    # steps: float32 accumulators.
    grad_query = torch.empty_like(query, device=grad_out.device)
    if plan.head_groups == 1:
        grad_key = torch.zeros(key.shape, dtype=dtype, device=key.device)
        grad_value = torch.zeros(value.shape, dtype=dtype, device=value.device)
        run_pass(plan, (query, key, value, grad_out, delta, row_max, row_log_sum), grad_query, grad_key, grad_value)
        return grad_query, *_key_value_grads(ctx, grad_key, grad_value, key, value)
    # Each pass finishes its heads' dK and dV: the results are made in the inputs' dtypes from the start.
    grad_key, grad_value = torch.empty_like(key), torch.empty_like(value)
    for heads, kv_heads in _head_groups(plan.head_groups, query.size(1), key.size(1)):
        tensors = (query[:, heads], key[:, kv_heads], value[:, kv_heads], grad_out[:, heads], delta[:, heads],
                   row_max[:, heads], row_log_sum[:, heads])
        if key.dtype == dtype:  # float32 (or float64) inputs: accumulate in the results themselves
            run_pass(plan, tensors, grad_query[:, heads], grad_key[:, kv_heads].zero_(), grad_value[:, kv_heads].zero_())
            continue
        accumulators = [torch.zeros(t[:, kv_heads].shape, dtype=dtype, device=t.device) for t in (key, value)]
        run_pass(plan, tensors, grad_query[:, heads], *accumulators)
        grad_key[:, kv_heads], grad_value[:, kv_heads] = accumulators
        del accumulators  # before the next group's
    return grad_query, grad_key, grad_value


class _LocalAttention(torch.autograd.Function):
    """One rank (or no process group): the local kernel over the whole sequence, _LOCAL_BLOCK_ROWS query rows a call,
    so that the kernel's float32 outputs (out in forward, dQ in backward: two hidden states of a bf16 model a token)
    exist for one block at a time; keys and values are whole in every call."""

    @staticmethod
    def _blocks(plan: _Plan, rows: int) -> list[tuple[int, int, tuple[int, ...]]]:
        return [(start, stop, (0,)) for start, stop in plan.steps(rows)]

    @staticmethod
    @_without_autocast
    def forward(ctx, query: Tensor, key: Tensor, value: Tensor, masks: _Masks, plan: _Plan) -> Tensor:
        b, h, s, d = query.shape
        # Sequence-major, as _MQSPAttention's: the caller's transpose to [B, S, H*D] is then free.
        out = query.new_empty((b, s, h, d)).transpose(1, 2)
        row_max = torch.empty(query.shape[:3], dtype=accumulation_dtype(query.dtype), device=query.device)
        row_log_sum = torch.empty_like(row_max)
        for start, stop, sources in _LocalAttention._blocks(plan, _LOCAL_BLOCK_ROWS):
            rows = slice(start, stop)
            plan.backend.forward(query[:, :, rows], key, value, masks.visibility(plan, (start, stop, sources)), plan.scale,
                                 into=merge.Partial(out[:, :, rows], row_max[:, :, rows], row_log_sum[:, :, rows]))
        ctx.plan, ctx.masks, ctx.leaf_inputs = plan, masks, (key.is_leaf, value.is_leaf)
        ctx.save_for_backward(_saved_query(query, plan), key, value, out, row_max, row_log_sum)
        return out

    @staticmethod
    @_not_twice_differentiable
    @_without_autocast
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        masks: _Masks = ctx.masks

        def run_pass(plan: _Plan, tensors: tuple[Tensor, ...], grad_query: Tensor, grad_key: Tensor, grad_value: Tensor) -> None:
            query, key, value, grad_out, delta, row_max, row_log_sum = tensors
            # A block of a head group's pass takes head_groups times the rows: the same bytes as one of all heads.
            for start, stop, sources in _LocalAttention._blocks(plan, _LOCAL_BLOCK_ROWS * plan.head_groups):
                rows = slice(start, stop)
                plan.backend.backward(
                    offload.to_device(query[:, :, rows], grad_out.device), key, value, grad_out[:, :, rows],
                    row_max[:, :, rows], row_log_sum[:, :, rows], delta[:, :, rows],
                    masks.visibility(plan, (start, stop, sources)), plan.scale, grad_key, grad_value, grad_query[:, :, rows],
                )

        return *_backward_by_head_groups(ctx, grad_out, run_pass), None, None


class _MQSPAttention(torch.autograd.Function):
    @staticmethod
    def _steps(plan: _Plan, rows: int) -> list[tuple[int, int]]:
        """The micro-steps of ``rows`` local rows in the order forward and backward run them. Zigzag: first, last,
        second, second to last, ... Under a causal mask a step of a rank's first chunk is cheap on the ranks
        that hold early chunks and dear on the others, and one of its second chunk the other way
        round; each rank can run about one step ahead of the slowest (the next step's gather is
        already issued), so alternating them makes every rank wait for the others about as long as
        it would for a balanced step, where running them in order made the ranks take turns being
        the bottleneck (1.2x the work of one rank at P=2). Only the order changes, not the results."""
        steps = plan.steps(rows)
        if plan.layout != "zigzag":
            return steps
        return [steps[i // 2] if i % 2 == 0 else steps[-1 - i // 2] for i in range(len(steps))]

    @staticmethod
    @_without_autocast
    def forward(ctx, query: Tensor, key: Tensor, value: Tensor, masks: _Masks, plan: _Plan) -> Tensor:
        b, h, _, d = query.shape
        dtype = accumulation_dtype(query.dtype)
        # Sequence-major storage ([B, S, H, D], viewed as [B, H, S, D]), as CUDA's flash SDPA returns it: the
        # caller's usual out.transpose(1, 2).reshape(B, S, H * D) is then free, and the tensor the output
        # projection saves for backward is this one, which backward needs anyway (one hidden state a layer less).
        out = query.new_empty((b, query.size(2), h, d)).transpose(1, 2)
        row_max = torch.empty(query.shape[:3], dtype=dtype, device=query.device)
        row_log_sum = torch.empty_like(row_max)
        steps = _MQSPAttention._steps(plan, plan.micro_q_size)

        routes = [plan.route(start, stop) for start, stop in steps]
        # Only here: the backward's exchange would hold P-1 copies of its larger rows where its peak is.
        all_gather_dense = not comm.exchange_is_cheaper_than_all_gather(plan.group)

        def gather(j: int) -> Callable[[], Tensor]:
            start, stop = steps[j]
            return _share_rows(query[:, :, start:stop], routes[j], plan, "mqsp_attention: the query gather", all_gather_dense)

        def compute(j: int, gathered_query: Tensor) -> comm.Pending:
            (start, stop), sources = steps[j], routes[j].sources
            # The partials are written, (out | row_max | row_log_sum) a row, into the buffer the all-to-all sends.
            packed = gathered_query.new_empty((len(sources), b, h, stop - start, d + 2), dtype=dtype)
            plan.backend.forward(gathered_query, key, value, masks.visibility(plan, (start, stop, sources)), plan.scale,
                                 into=merge.Partial(packed[..., :d], packed[..., d], packed[..., d + 1]))
            return _return_to_sources(packed, routes[j], plan, "mqsp_attention: the return of partial outputs")

        def finish(j: int, returned: Tensor) -> None:
            rows = slice(*steps[j])
            plan.backend.merge(returned, out[:, :, rows], row_max[:, :, rows], row_log_sum[:, :, rows], masks.may_hide_every_key)

        _run_micro_steps(len(steps), gather, lambda arrive: arrive(), compute, finish)
        ctx.plan, ctx.masks, ctx.leaf_inputs = plan, masks, (key.is_leaf, value.is_leaf)
        ctx.save_for_backward(_saved_query(query, plan), key, value, out, row_max, row_log_sum)
        return out

    @staticmethod
    @_not_twice_differentiable
    @_without_autocast
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        return *_backward_by_head_groups(ctx, grad_out, functools.partial(_MQSPAttention._backward_pass, ctx.masks)), None, None

    @staticmethod
    def _backward_pass(
        masks: _Masks, plan: _Plan, tensors: tuple[Tensor, ...], grad_query: Tensor, grad_key: Tensor, grad_value: Tensor,
    ) -> None:
        """The backward's micro-steps over the heads of ``tensors``: fills grad_query, adds into grad_key and grad_value."""
        query, key, value, grad_out, delta, row_max, row_log_sum = tensors
        b, h, _, d = query.shape
        dtype = accumulation_dtype(query.dtype)
        steps = _MQSPAttention._steps(plan, plan.backward_rows)
        routes = [plan.route(start, stop) for start, stop in steps]
        row_width = backward_row_width(d, query.dtype, plan.backend.reads_rows_in_place)

        def gather(j: int) -> Callable[[], Tensor | list[Tensor]]:
            rows = slice(*steps[j])
            # Query rows and their output gradients travel in the input dtype, row statistics in float32,
            # in one collective: the statistics' bytes ride as extra columns of the input dtype (a bit cast,
            # exact; one collective a step fewer). One copy joins them all.
            stats = [t[:, :, rows, None].view(query.dtype) for t in (row_max, row_log_sum, delta)]
            step_query = offload.to_device(query[:, :, rows], grad_out.device)
            # Sequence-major ([B, c, H, W] in memory): what arrives from the ranks is then one [n x c, H, W] matrix for
            # B = 1, which backends that take one matrix of rows read without joining it (``joined_rows``).
            step_rows = grad_out.new_empty((b, step_query.size(2), h, row_width), dtype=query.dtype).transpose(1, 2)
            columns = 2 * d + sum(t.size(-1) for t in stats)  # the rest pads the row and is never read
            torch.cat([step_query, grad_out[:, :, rows].to(query.dtype), *stats], dim=-1, out=step_rows[..., :columns])
            what = "mqsp_attention: the backward gather of queries, output gradients, row statistics"
            return _share_rows(step_rows, routes[j], plan, what, one_buffer=plan.backend.reads_rows_in_place)

        def unpack(arrive: Callable[[], Tensor | list[Tensor]]) -> tuple[Tensor, ...]:
            rows = arrive()  # [n, B, H, c, W] (2D + statistics [+ padding]), or a list of [B, H, c, W]
            if isinstance(rows, Tensor) and plan.backend.reads_rows_in_place:
                stats = rows[..., 2 * d :].view(dtype)
                return rows[..., :d], rows[..., d : 2 * d], stats[..., 0], stats[..., 1], stats[..., 2]
            # Joined by copies, so that the received rows go before the step computes: kept for views of the queries
            # and statistics beside the sequence-major copy of the output gradients that aten's CPU kernel needs, they
            # raised the backward's peak 6% at P = 2. One copy each.
            stats = joined_rows(rows, slice(2 * d, None), copy=True).view(dtype)
            return (joined_rows(rows, slice(0, d), copy=True), joined_rows(rows, slice(d, 2 * d), sequence_major=True),
                    stats[..., 0], stats[..., 1], stats[..., 2])

        def compute(j: int, inputs: tuple[Tensor, ...]) -> comm.Pending:
            (start, stop), sources = steps[j], routes[j].sources
            step_query, step_grad_out, step_row_max, step_row_log_sum, step_delta = inputs
            part_grad_query = plan.backend.backward(step_query, key, value, step_grad_out, step_row_max, step_row_log_sum, step_delta,
                                                    masks.visibility(plan, (start, stop, sources)), plan.scale, grad_key, grad_value)
            if part_grad_query.dim() == 4:  # of joined rows: [B, H, n*c, D] -> [n, B, H, c, D] (a view)
                part_grad_query = part_grad_query.unflatten(2, (len(sources), stop - start)).movedim(2, 0)
            # [n, B, c, H, D]: the layout the backends store dQ in, sent as it is (a copy only if a backend did not).
            parts = part_grad_query.transpose(2, 3)
            what = "mqsp_attention: the return of partial query gradients"
            if routes[j].dense:
                # The sum arrives (c rows), where an all-to-all would hold all P partials until summed: that
                # raised the per-rank peak 4-6% at L=4k (P=2, 4), above Ulysses'; gloo's reduce-scatter is
                # slower, but sparse steps, which return to fewer ranks, use the all-to-all.
                return comm.reduce_scatter(parts, plan.group, what)
            return _return_to_sources(parts, routes[j], plan, what)

        def finish(j: int, returned: Tensor) -> None:
            start, stop = steps[j]
            rows = grad_query[:, :, start:stop]
            returned = returned.transpose(-3, -2)  # [..., B, c, H, D] -> [..., B, H, c, D]
            if routes[j].dense:  # summed by the reduce-scatter
                rows.copy_(returned)
            elif rows.dtype == returned.dtype:  # float32: add the partials in place
                rows.copy_(returned[0])
                for part in returned[1:]:
                    rows.add_(part)
            else:
                rows.copy_(returned.sum(dim=0))

        _run_micro_steps(len(steps), gather, unpack, compute, finish)


def _follow_autocast(*tensors: Any) -> tuple[Any, ...]:
    """Cast the inputs to the autocast dtype when autocast is on, as ``scaled_dot_product_attention`` does
    (Hugging Face RoPE models hand over float32 queries and keys with bfloat16 values)."""
    first = tensors[0]
    if not isinstance(first, Tensor) or not torch.is_autocast_enabled(first.device.type):
        return tensors
    dtype = torch.get_autocast_dtype(first.device.type)
    castable = (torch.float32, torch.float16, torch.bfloat16)
    return tuple(t.to(dtype) if isinstance(t, Tensor) and t.dtype in castable else t for t in tensors)


def mqsp_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    group: ProcessGroup | None = None,
    key_padding_mask: Tensor | None = None,
    causal: bool = False,
    window: tuple[int | None, int | None] | None = None,
    document_ids: Tensor | None = None,
    softcap: float | None = None,
    layout: Layout = "contiguous",
    scale: float | None = None,
    dropout_p: float = 0.0,
    micro_q_size: int | None = None,
    backend: str = "auto",
    head_groups: int = 1,
    offload_queries: bool = False,
) -> Tensor:
    """Exact softmax attention over a sequence whose tokens are split across ``group``.

    Args:
        query: this rank's queries, [B, H, S_local, D].
        key, value: this rank's keys and values, [B, H_kv, S_local, D] with H % H_kv == 0
            (grouped-query and multi-query attention need no copies on the wire).
        group: the sequence-parallel process group; None for the default group. A group of one
            rank (or no initialised process group) runs plain local attention.
        key_padding_mask: this rank's [B, S_local] bool mask, True = attend. Stays local.
        causal: mask keys after each query, by global position.
        window: ``(left, right)``: a query at global position q sees keys in [q - left, q + right]
            (None: unbounded on that side); with ``causal`` the right side is 0. A causal sliding
            window of w keys (Mistral, Qwen2, Gemma) is ``window=(w - 1, None), causal=True``.
        document_ids: this rank's [B, S_local] integer ids of packed documents, which must not
            decrease along the full sequence; no query sees a key of another document.
        softcap: scores become ``softcap * tanh(score / softcap)`` (Gemma2).
        layout: how the full sequence was split: ``"contiguous"`` or ``"zigzag"``
            (see :mod:`lightning_mqsp.layout`; shard inputs with ``shard_sequence``).
        scale: score scale, default 1/sqrt(D).
        dropout_p: dropout on the attention probabilities; the mask is a hash of
            (seed, batch, head, positions), so forward and recompute agree and the result does
            not depend on ``micro_q_size``. The seed is drawn from the query device's generator
            on the group's first rank.
        micro_q_size: local query rows per micro-step; None picks about 2048 gathered rows a step on the CPU
            (fewer on short sequences), and on a GPU as many as 256 MiB of step buffers hold (about 4000 for Llama-8B's
            heads), see :func:`auto_micro_q_size`.
        backend: local compute: ``"auto"``, ``"cpu_flash"``, ``"reference"`` or ``"triton"``.
        head_groups: run the backward over the key/value heads in this many groups, one after
            the other (it must divide H_kv): its float32 dK and dV accumulators then hold one
            group's heads, 1/head_groups of them (8 KB a token of Llama-8B at 1, 1 KB at 8), for the
            same bytes sent in head_groups times as many collectives. Not with ``dropout_p``.
        offload_queries: keep the queries that backward needs in host memory from the end of
            forward (pinned on CUDA), and copy each micro-step's rows back as backward gathers
            them: one query tensor less on the device through backward (8 KB a token of Llama-8B).

    Under autocast the inputs are cast to the autocast dtype first, as
    ``scaled_dot_product_attention`` does.

    Returns:
        [B, H, S_local, D] in the query's dtype: this rank's rows of the attention output.

    Raises:
        ValueError: on bad input, on every rank of the group at once (no rank is left waiting).
        lightning_mqsp.comm.CollectiveError: when a collective of the group fails (a rank died,
            raised, or never came before the group's timeout), naming the failed rank when known.
    """
    membership_error = group_membership_error(group)
    if membership_error is not None:
        raise ValueError(f"mqsp_attention: {membership_error}")
    query, key, value = _follow_autocast(query, key, value)
    arguments = _Arguments(key_padding_mask, causal, window, document_ids, softcap, layout, scale, dropout_p, micro_q_size, backend,
                           head_groups, offload_queries)
    if comm.group_size(group) == 1:
        return _attend_locally(query, key, value, arguments)
    return _attend_across_ranks(query, key, value, group, arguments)


@dataclass(frozen=True)
class _Arguments:
    """``mqsp_attention``'s keyword arguments, as the caller passed them."""

    key_padding_mask: Tensor | None
    causal: bool
    window: tuple[int | None, int | None] | None
    document_ids: Tensor | None
    softcap: float | None
    layout: Layout
    scale: float | None
    dropout_p: float
    micro_q_size: int | None
    backend: str
    head_groups: int
    offload_queries: bool


def _plan(
    query: Tensor, key: Tensor, value: Tensor, arguments: _Arguments, group: ProcessGroup | None, world_size: int, rank: int,
) -> tuple[_Plan | None, _Masks | None, Signature | None, str | None]:
    """The call's plan, masks and signature, or what is wrong with this rank's arguments (never raises)."""
    a = arguments
    error = local_input_error(
        query, key, value, key_padding_mask=a.key_padding_mask, document_ids=a.document_ids, causal=a.causal, window=a.window,
        softcap=a.softcap, layout=a.layout, scale=a.scale, dropout_p=a.dropout_p, micro_q_size=a.micro_q_size, backend=a.backend,
        head_groups=a.head_groups, offload_queries=a.offload_queries,
    )
    if error is not None:
        return None, None, None, error
    local_length = query.size(2)
    masks = _Masks(a.key_padding_mask, a.document_ids, None)
    window = Window.of(a.causal, a.window)
    key_runs = position_runs(local_length, rank, world_size, a.layout)
    try:
        key_positions = run_positions(key_runs, query.device)
        chosen = resolve_backend(a.backend, query, Visibility(
            key_positions, key_positions, key_runs, key_runs, window=window, softcap=a.softcap, dropout_p=a.dropout_p,
        ))
    except ValueError as unsupported:
        return None, None, None, str(unsupported)
    plan = _Plan(
        group=group, world_size=world_size, rank=rank, device=query.device, backend=chosen, layout=a.layout, local_length=local_length,
        micro_q_size=a.micro_q_size or auto_micro_q_size(local_length, world_size, _device_row_bytes(query)), window=window,
        softcap=None if a.softcap is None else float(a.softcap), scale=float(a.scale) if a.scale is not None else query.size(-1) ** -0.5,
        dropout_p=float(a.dropout_p), head_groups=a.head_groups, offload_queries=a.offload_queries,
    )
    signature = Signature.of(
        query, key, layout=a.layout, window=(window.left, window.right), has_key_padding_mask=a.key_padding_mask is not None,
        has_document_ids=a.document_ids is not None, micro_q_size=plan.micro_q_size, backend=chosen.name, scale=plan.scale,
        softcap=plan.softcap, dropout_p=plan.dropout_p, head_groups=plan.head_groups,
        needs_grad=torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)),
    )
    return plan, masks, signature, None


def _device_row_bytes(query: Tensor) -> int | None:
    """What a gathered row of ``query``'s micro-steps holds on a GPU, which sizes the steps there (None on the CPU)."""
    if query.device.type != "cuda":
        return None
    return step_bytes_per_gathered_row(query.size(1), query.size(-1), query.dtype)


def _attend_locally(query: Tensor, key: Tensor, value: Tensor, arguments: _Arguments) -> Tensor:
    """One rank, or no process group: the local kernel, no collectives (traceable: torch.compile(fullgraph=True) works)."""
    plan, masks, _, error = _plan(query, key, value, arguments, None, 1, 0)
    if error is not None:
        raise ValueError(f"mqsp_attention: {error}")
    assert plan is not None and masks is not None
    documents = None if arguments.document_ids is None else arguments.document_ids.unsqueeze(0)
    seed = draw_seed(query.device) if plan.dropout_p > 0 else None
    return _LocalAttention.apply(query, key, value, replace(masks, documents=documents, dropout_seed=seed), plan)


def _every_ranks_documents(document_ids: Tensor, group: ProcessGroup | None) -> Tensor:
    """Every rank's document ids [P, B, l], all-gathered once for the tensor that all of a batch's layers pass (the
    adapters pass the batch's), and again only when it changed in place: the backward keeps them until it runs, and a
    copy a layer would be 8 bytes a token of the whole sequence per layer. Remembered on the tensor itself, so that
    they go when the batch does; every rank passes its own batch's tensor, so all of them gather or none does."""
    remembered = getattr(document_ids, "_mqsp_every_ranks", None)
    if remembered is not None and remembered[0] is group and remembered[1] == document_ids._version:
        return remembered[2]
    documents = comm.all_gather(document_ids, group, "mqsp_attention: the all-gather of document ids").wait()
    document_ids._mqsp_every_ranks = (group, document_ids._version, documents)  # type: ignore[attr-defined]
    return documents


# torch.compile: the communicating part is one opaque call (a single graph break per attention layer),
# rather than a traced loop of async collectives that would break the graph, and recompile, at every micro-step.
@torch.compiler.disable
def _attend_across_ranks(query: Tensor, key: Tensor, value: Tensor, group: ProcessGroup | None, arguments: _Arguments) -> Tensor:
    """P ranks: the inputs checked together, document ids and the dropout seed shared, then the micro-steps."""
    plan, masks, signature, error = _plan(query, key, value, arguments, group, comm.group_size(group), dist.get_rank(group))
    check_across_ranks(group, error, signature)
    assert plan is not None and masks is not None
    if arguments.document_ids is not None:
        masks = replace(masks, documents=_every_ranks_documents(arguments.document_ids, group))
    if plan.dropout_p > 0:
        seed = comm.all_gather(draw_seed(query.device), group, "mqsp_attention: the all-gather of the dropout seed").wait()[0]
        masks = replace(masks, dropout_seed=seed)
    return _MQSPAttention.apply(query, key, value, masks, plan)
