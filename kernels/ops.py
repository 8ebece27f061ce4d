"""The kernels as torch custom ops, with fake (meta) implementations.

``torch.ops.lightning_mqsp.partial_attention_forward`` and ``..._backward`` run the Triton kernels
on real tensors. Their fakes only compute output shapes, so FakeTensorMode (memory estimation of
paper-scale configurations) and torch.compile trace through an MQSP layer without launching a
kernel, and torch.compile keeps each op as one opaque node. Every op writes into tensors the caller
made (views of the buffers a micro-step sends and receives: no copies around a kernel), which its
schema declares (``mutates_args``); the backward adds dK and dV into ``grad_key`` and ``grad_value``.

Visibility travels as plain values, which a schema can hold: a window side of -1 is unbounded, a
softcap of 0.0 is none (``kernels.arguments``). Type annotations here are evaluated by
``torch.library`` to infer the schema, so they are runtime types (no ``from __future__ import annotations``).
"""


import torch
from torch import Tensor

from lightning_mqsp.kernels.arguments import KernelVisibility
from lightning_mqsp.kernels.backward import partial_attention_backward as _backward
from lightning_mqsp.kernels.forward import partial_attention_forward as _forward
from lightning_mqsp.kernels.merge import merge_partials as _merge


@torch.library.custom_op("lightning_mqsp::partial_attention_forward", mutates_args=("out", "row_max", "row_log_sum"))
def partial_attention_forward(
    q: Tensor, k: Tensor, v: Tensor, out: Tensor, row_max: Tensor, row_log_sum: Tensor,
    query_positions: Tensor, key_positions: Tensor, key_padding_mask: Tensor | None,
    query_documents: Tensor | None, key_documents: Tensor | None, dropout_seed: Tensor | None,
    query_segments: int, window_left: int, window_right: int, softcap: float, dropout_p: float, scale: float,
) -> None:
    """Partial attention of q [n, B, H, c, D] against k, v [B, H_kv, N, D], written into out [n, B, H, c, D] and
    row_max, row_log_sum [n, B, H, c] (float32)."""
    visibility = KernelVisibility(query_positions, key_positions, key_padding_mask, query_documents, key_documents,
                                  dropout_seed, query_segments, window_left, window_right, softcap, dropout_p)
    _forward(q, k, v, out, row_max, row_log_sum, visibility, scale)


# The fakes have nothing to do: every result is written into a tensor the caller made.
@partial_attention_forward.register_fake
def _partial_attention_forward_fake(*args: object) -> None:
    return None


@torch.library.custom_op("lightning_mqsp::partial_attention_backward", mutates_args=("grad_query", "grad_key", "grad_value"))
def partial_attention_backward(
    q: Tensor, k: Tensor, v: Tensor, dout: Tensor, row_max: Tensor, row_log_sum: Tensor, delta: Tensor,
    grad_query: Tensor, grad_key: Tensor, grad_value: Tensor,
    query_positions: Tensor, key_positions: Tensor, key_padding_mask: Tensor | None,
    query_documents: Tensor | None, key_documents: Tensor | None, dropout_seed: Tensor | None,
    query_segments: int, window_left: int, window_right: int, softcap: float, dropout_p: float, scale: float,
) -> None:
    """This call's gradient share given the global row statistics: writes dq into grad_query [n, B, H, c, D] and
    adds dK, dV into grad_key, grad_value [B, H_kv, N, D] float32."""
    visibility = KernelVisibility(query_positions, key_positions, key_padding_mask, query_documents, key_documents,
                                  dropout_seed, query_segments, window_left, window_right, softcap, dropout_p)
    _backward(q, k, v, dout, row_max, row_log_sum, delta, grad_query, grad_key, grad_value, visibility, scale)


@partial_attention_backward.register_fake
def _partial_attention_backward_fake(*args: object) -> None:
    return None


@torch.library.custom_op("lightning_mqsp::merge_partials", mutates_args=("out", "row_max", "row_log_sum"))
def merge_partials(parts: Tensor, out: Tensor, row_max: Tensor, row_log_sum: Tensor) -> None:
    """The merge of parts [n, B, H, c, D + 2] into out [B, H, c, D], row_max and row_log_sum [B, H, c]."""
    _merge(parts, out, row_max, row_log_sum)


@merge_partials.register_fake
def _merge_partials_fake(*args: object) -> None:
    return None
