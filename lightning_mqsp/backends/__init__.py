"""Local partial attention: the compute MQSP runs on each rank at every micro-step.

A backend attends M gathered query rows to the N keys and values this rank holds and returns
the *partial* result that the distributed softmax merges across ranks (:mod:`lightning_mqsp.merge`):

``forward(q, k, v, visibility, scale, into=None) -> Partial(out, row_max, row_log_sum)``
    q [B, H, M, D], or the rows gathered from n ranks where they arrived, [n, B, H, c, D] (M = n x c);
    k and v [B, H_kv, N, D] (H % H_kv == 0). ``out`` has q's shape and the row statistics its
    shape without D. Written into ``into`` when given (views of the buffer that returns them to
    their ranks, or of the layer's output: any float dtype and strides), else made in the
    accumulation dtype (float32; float64 for float64 inputs). A row with no visible key here
    has ``row_max = -inf``, ``row_log_sum = 0`` and ``out = 0``.

``backward(q, k, v, dout, row_max, row_log_sum, delta, visibility, scale, grad_key, grad_value, grad_query=None) -> dq``
    ``row_max``, ``row_log_sum`` and ``delta = rowsum(dout * out)`` are [B, H, M] (or [n, B, H, c]
    with 5-D q and dout) and *global*: those of the merged output, so the result is exactly this
    rank's share of the gradient. Returns ``dq`` in q's shape (partial: summed over ranks by the
    caller), written into ``grad_query`` when given, and *adds* this call's dK and dV into
    ``grad_key`` and ``grad_value`` ([B, H_kv, N, D], accumulation dtype), which the caller
    zeroes once and every micro-step accumulates into. Rows with ``row_max = -inf`` contribute
    nothing.

``merge(parts, out, row_max, row_log_sum, rows_may_be_empty=True)``
    :func:`lightning_mqsp.merge.merge` of the returned partials ``parts`` [n, B, H, c, D + 2]
    (each row's out, row_max, row_log_sum) into the views ``out`` [B, H, c, D], ``row_max`` and
    ``row_log_sum`` [B, H, c]. ``rows_may_be_empty=False`` says that every row saw some key
    (no padding, no documents), which spares a few ops.

What may be seen is one :class:`~lightning_mqsp.visibility.Visibility`, the same for every
backend. Every backend keeps its score tiles to itself: nothing of size M x N outlives a call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor

from lightning_mqsp.merge import Partial, merge_stacked_into
from lightning_mqsp.visibility import Visibility


class LocalAttentionBackend(Protocol):
    name: str
    #: Whether the kernels read gathered rows where they arrived ([n, B, H, c, X] segments, rows padded for aligned
    #: loads); else the caller joins them into one matrix first and lets the received buffer go.
    reads_rows_in_place: bool

    def supports(self, q: Tensor, visibility: Visibility) -> str | None:
        """None when the backend can run these inputs, else the reason it cannot."""

    def forward(self, q: Tensor, k: Tensor, v: Tensor, visibility: Visibility, scale: float, into: Partial | None = None) -> Partial: ...

    def backward(
        self, q: Tensor, k: Tensor, v: Tensor, dout: Tensor, row_max: Tensor, row_log_sum: Tensor, delta: Tensor,
        visibility: Visibility, scale: float, grad_key: Tensor, grad_value: Tensor, grad_query: Tensor | None = None,
    ) -> Tensor: ...

    def merge(self, parts: Tensor, out: Tensor, row_max: Tensor, row_log_sum: Tensor, rows_may_be_empty: bool = True) -> None: ...


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Partial results, row statistics and gradient accumulators: float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


_FACTORIES: dict[str, Callable[[], LocalAttentionBackend]] = {}
_INSTANCES: dict[str, LocalAttentionBackend] = {}


def register_backend(name: str, factory: Callable[[], LocalAttentionBackend]) -> None:
    _FACTORIES[name] = factory


def available_backends() -> list[str]:
    return ["auto", *_FACTORIES]


def get_backend(name: str) -> LocalAttentionBackend:
    if name not in _FACTORIES:
        raise ValueError(f"Unknown attention backend {name!r}; choose one of {available_backends()}.")
    if name not in _INSTANCES:
        _INSTANCES[name] = _FACTORIES[name]()
    return _INSTANCES[name]


def resolve_backend(name: str, q: Tensor, visibility: Visibility) -> LocalAttentionBackend:
    """The backend ``name`` stands for on these inputs; ``"auto"`` picks the fastest that can run them.

    auto: Triton kernels for CUDA tensors (when installed), aten's CPU flash kernel on CPU, and
    the reference backend for whatever neither supports (dropout or soft-capping on CPU, float64).
    """
    if name != "auto":
        backend = get_backend(name)
        reason = backend.supports(q, visibility)
        if reason is not None:
            raise ValueError(f"backend={name!r} cannot run these inputs: {reason}")
        return backend
    preference = ["triton", "cpu_flash", "reference"] if q.is_cuda else ["cpu_flash", "reference"]
    for candidate in preference:
        if candidate in _FACTORIES and get_backend(candidate).supports(q, visibility) is None:
            return get_backend(candidate)
    return get_backend("reference")


def expand_kv_heads(x: Tensor, num_heads: int) -> Tensor:
    """[B, H_kv, N, D] -> [B, H, N, D] for grouped-query attention (a copy when H_kv < H)."""
    groups = num_heads // x.size(1)
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def reduce_kv_heads(grad: Tensor, num_kv_heads: int) -> Tensor:
    """Inverse of ``expand_kv_heads`` for gradients: sum each group of query heads."""
    batch, heads, n, d = grad.shape
    groups = heads // num_kv_heads
    return grad if groups == 1 else grad.view(batch, num_kv_heads, groups, n, d).sum(dim=2)


def joined_rows(x: Tensor | list[Tensor], columns: slice = slice(None), sequence_major: bool = False,
                copy: bool = False) -> Tensor:
    """Columns ``columns`` of the rows [n, B, H, c, X] (or a list of n [B, H, c, X]) as one [B, H, n*c, X'], for the
    backends whose kernels take one matrix of rows; 4-D x as it is. A view where the segments' rows follow each
    other in memory (rows that travelled sequence-major, B = 1: a Hugging Face layer's queries) unless ``copy``,
    else one copy, stored as [B, n*c, H, X'] with ``sequence_major`` (the layout aten's CPU flash backward needs its
    output gradient in: it copies any other)."""
    if isinstance(x, Tensor) and x.dim() == 4:
        return x[..., columns]
    if isinstance(x, Tensor) and not copy:
        rows = x[..., columns]
        n, b, h, c, _ = rows.shape
        if n == 1 or (b == 1 and rows.stride(0) == c * rows.stride(3)):
            joined = rows.movedim(0, 2).flatten(2, 3)  # a view
            if not sequence_major or joined.transpose(1, 2).is_contiguous():
                return joined
    parts = [part[..., columns] for part in (x.unbind(0) if isinstance(x, Tensor) else x)]
    if not sequence_major:
        return torch.cat(parts, dim=2)
    b, h, c, width = parts[0].shape
    joined = parts[0].new_empty((b, len(parts) * c, h, width)).transpose(1, 2)
    return torch.cat(parts, dim=2, out=joined)


def segments_of(x: Tensor, like: Tensor) -> Tensor:
    """[B, H, n*c, ...] as ``like``'s [n, B, H, c, ...] (a view); as it is when ``like`` is 4-D."""
    if like.dim() == 4:
        return x
    return x.unflatten(2, (like.size(0), like.size(3))).movedim(2, 0)


def written_into(part: Partial, into: Partial | None, like: Tensor) -> Partial:
    """``part`` (of the joined rows) as the caller asked for it: written into ``into``'s views (by one copy where
    they are the columns of one buffer, as the forward's partials are: (out | row_max | row_log_sum) a row), or in
    ``like``'s shape (4-D, or segments)."""
    part = Partial(*(segments_of(t, like) for t in part))
    if into is None:
        return part
    buffer = _columns_of_one_buffer(into)
    if buffer is not None:
        torch.cat([part.out, part.row_max.unsqueeze(-1), part.row_log_sum.unsqueeze(-1)], dim=-1, out=buffer)
        return into
    for target, source in zip(into, part):
        target.copy_(source)
    return into


def _columns_of_one_buffer(into: Partial) -> Tensor | None:
    """The [..., D + 2] view whose columns are ``into``'s out, row_max and row_log_sum, if they are that."""
    if torch.compiler.is_compiling():  # the one-rank path under torch.compile: data pointers are not traceable
        return None
    out, row_max, row_log_sum = into
    d, itemsize = out.size(-1), out.element_size()
    columns = (out.dtype == row_max.dtype == row_log_sum.dtype and out.stride(-1) == 1
               and row_max.stride() == row_log_sum.stride() == out.stride()[:-1]
               and row_max.data_ptr() == out.data_ptr() + d * itemsize and row_log_sum.data_ptr() == out.data_ptr() + (d + 1) * itemsize)
    return out.as_strided((*out.shape[:-1], d + 2), out.stride()) if columns else None


def merge_in_torch(parts: Tensor, out: Tensor, row_max: Tensor, row_log_sum: Tensor, rows_may_be_empty: bool = True) -> None:
    """``LocalAttentionBackend.merge`` in torch ops, for the backends without a merge kernel."""
    d = parts.size(-1) - 2
    merge_stacked_into(Partial(parts[..., :d], parts[..., d], parts[..., d + 1]), Partial(out, row_max, row_log_sum),
                       rows_may_be_empty)


def _register_builtin() -> None:
    from lightning_mqsp.backends.cpu_flash import CpuFlashBackend
    from lightning_mqsp.backends.reference import ReferenceBackend
    from lightning_mqsp.backends.triton import TritonBackend

    register_backend("reference", ReferenceBackend)
    register_backend("cpu_flash", CpuFlashBackend)
    register_backend("triton", TritonBackend)


_register_builtin()
