"""The kernels as torch custom ops, with fake (meta) implementations.

``torch.ops.lightning_mqsp.partial_attention_forward`` and ``..._backward`` run the Triton kernels
on real tensors. Their fakes only compute output shapes, so FakeTensorMode (memory estimation of
paper-scale configurations) and torch.compile trace through an MQSP layer without launching a
kernel, and torch.compile keeps each op as one opaque node. The backward adds into ``grad_key``
and ``grad_value`` in place, which its schema declares (``mutates_args``).

Visibility travels as plain values, which a schema can hold: a window side of -1 is unbounded, a
softcap of 0.0 is none (``kernels.arguments``). Type annotations here are evaluated by
``torch.library`` to infer the schema, so they are runtime types (no ``from __future__ import annotations``).
"""


import torch
from torch import Tensor

from lightning_mqsp.kernels.arguments import KernelVisibility
from lightning_mqsp.kernels.backward import partial_attention_backward as _backward
from lightning_mqsp.kernels.forward import partial_attention_forward as _forward


@torch.library.custom_op("lightning_mqsp::partial_attention_forward", mutates_args=())
def partial_attention_forward(
    q: Tensor, k: Tensor, v: Tensor,
    query_positions: Tensor, key_positions: Tensor, key_padding_mask: Tensor | None,
    query_documents: Tensor | None, key_documents: Tensor | None, dropout_seed: Tensor | None,
    query_segments: int, window_left: int, window_right: int, softcap: float, dropout_p: float, scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Partial attention of q [B, H, M, D] against k, v [B, H_kv, N, D]: (out [B, H, M, D], row_max, row_log_sum [B, H, M]), float32."""
    visibility = KernelVisibility(query_positions, key_positions, key_padding_mask, query_documents, key_documents,
                                  dropout_seed, query_segments, window_left, window_right, softcap, dropout_p)
    return _forward(q, k, v, visibility, scale)


# The fakes need only the query's shape: the rest of the arguments pass through unread.
@partial_attention_forward.register_fake
def _partial_attention_forward_fake(q: Tensor, *args: object) -> tuple[Tensor, Tensor, Tensor]:
    row_max = q.new_empty(q.shape[:3], dtype=torch.float32)
    return q.new_empty(q.shape, dtype=torch.float32), row_max, torch.empty_like(row_max)


@torch.library.custom_op("lightning_mqsp::partial_attention_backward", mutates_args=("grad_key", "grad_value"))
def partial_attention_backward(
    q: Tensor, k: Tensor, v: Tensor, dout: Tensor, row_max: Tensor, row_log_sum: Tensor, delta: Tensor,
    grad_key: Tensor, grad_value: Tensor,
    query_positions: Tensor, key_positions: Tensor, key_padding_mask: Tensor | None,
    query_documents: Tensor | None, key_documents: Tensor | None, dropout_seed: Tensor | None,
    query_segments: int, window_left: int, window_right: int, softcap: float, dropout_p: float, scale: float,
) -> Tensor:
    """This call's gradient share given the global row statistics: returns dq [B, H, M, D] float32 and
    adds dK, dV into grad_key, grad_value [B, H_kv, N, D] float32."""
    visibility = KernelVisibility(query_positions, key_positions, key_padding_mask, query_documents, key_documents,
                                  dropout_seed, query_segments, window_left, window_right, softcap, dropout_p)
    return _backward(q, k, v, dout, row_max, row_log_sum, delta, grad_key, grad_value, visibility, scale)


@partial_attention_backward.register_fake
def _partial_attention_backward_fake(q: Tensor, *args: object) -> Tensor:
    return q.new_empty(q.shape, dtype=torch.float32)
