"""Local partial attention: the compute MQSP runs on each rank at every micro-step.

A backend attends M gathered query rows to the N keys and values this rank holds and returns
the *partial* result that the distributed softmax merges across ranks:

``forward(q, k, v, mask, scale) -> (out, lse)``
    q [B, H, M, D], k and v [B, H_kv, N, D] (H % H_kv == 0). ``out`` [B, H, M, D] and
    ``lse`` [B, H, M] are float32; a row with no visible key here has ``lse = -inf`` and
    ``out = 0``.

``backward(q, k, v, dout, lse, delta, mask, scale) -> (dq, dk, dv)``
    ``lse`` and ``delta = rowsum(dout * out)`` are float32 [B, H, M] and *global*: computed
    from the merged output of the M rows, so the result is exactly this rank's share of the gradient: ``dq`` [B, H, M, D]
    (float32, partial: summed over ranks by the caller), ``dk`` and ``dv`` [B, H_kv, N, D]
    (float32). Rows with ``lse = -inf`` contribute nothing.

Every backend must keep its score tiles to itself: nothing of size M x N outlives a call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from torch import Tensor


@dataclass(frozen=True)
class AttentionMask:
    """Which (query, key) pairs may attend, and the dropout applied to those that do.

    Positions are global positions in the full sequence (int64): ``query_positions`` [M],
    ``key_positions`` [N]. They drive the causal mask (key position <= query position) and the
    dropout hash. ``key_padding_mask`` is [B, N] bool, True = attend.
    """

    query_positions: Tensor
    key_positions: Tensor
    causal: bool = False
    key_padding_mask: Tensor | None = None
    dropout_p: float = 0.0
    dropout_seed: int = 0


class LocalAttentionBackend(Protocol):
    name: str

    def supports(self, q: Tensor, mask: AttentionMask) -> str | None:
        """None when the backend can run these inputs, else the reason it cannot."""

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask, scale: float) -> tuple[Tensor, Tensor]: ...

    def backward(
        self, q: Tensor, k: Tensor, v: Tensor, dout: Tensor, lse: Tensor, delta: Tensor, mask: AttentionMask, scale: float,
    ) -> tuple[Tensor, Tensor, Tensor]: ...


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


def resolve_backend(name: str, q: Tensor, mask: AttentionMask) -> LocalAttentionBackend:
    """The backend ``name`` stands for on these inputs; ``"auto"`` picks the fastest that can run them.

    auto: Triton kernels for CUDA tensors (when installed), aten's CPU flash kernel on CPU, and
    the reference backend for whatever neither supports (dropout on CPU, for example).
    """
    if name != "auto":
        backend = get_backend(name)
        reason = backend.supports(q, mask)
        if reason is not None:
            raise ValueError(f"backend={name!r} cannot run these inputs: {reason}")
        return backend
    preference = ["triton", "cpu_flash", "reference"] if q.is_cuda else ["cpu_flash", "reference"]
    for candidate in preference:
        if candidate in _FACTORIES and get_backend(candidate).supports(q, mask) is None:
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


def _register_builtin() -> None:
    from lightning_mqsp.backends.cpu_flash import CpuFlashBackend
    from lightning_mqsp.backends.reference import ReferenceBackend
    from lightning_mqsp.backends.triton import TritonBackend

    register_backend("reference", ReferenceBackend)
    register_backend("cpu_flash", CpuFlashBackend)
    register_backend("triton", TritonBackend)


_register_builtin()
