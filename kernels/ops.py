"""The micro-Q kernels as torch custom ops, with fake (meta) implementations.

``torch.ops.lightning_mqsp.micro_q_attention_forward`` and ``..._backward`` run the Triton
kernels on real tensors. Their fakes only compute output shapes, so FakeTensorMode (memory
estimation of paper-scale configurations) and torch.compile can trace through an MQSP layer
without launching a kernel, and torch.compile keeps each op as one opaque node.

Type annotations here are evaluated by ``torch.library`` to infer the op schema, so they are
written as runtime types (no ``from __future__ import annotations``).
"""

from typing import Optional

import torch
from torch import Tensor

from lightning_mqsp.dropout import keep_threshold
from lightning_mqsp.kernels.backward import micro_q_backward
from lightning_mqsp.kernels.forward import micro_q_forward


@torch.library.custom_op("lightning_mqsp::micro_q_attention_forward", mutates_args=())
def micro_q_attention_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    query_positions: Tensor,
    key_positions: Tensor,
    key_padding_mask: Optional[Tensor],
    causal: bool,
    scale: float,
    dropout_p: float,
    dropout_seed: int,
) -> tuple[Tensor, Tensor]:
    """Partial attention of q [B, H, M, D] against k, v [B, H_kv, N, D]: (out [B, H, M, D], lse [B, H, M]), fp32."""
    return micro_q_forward(
        q, k, v, query_positions, key_positions, key_padding_mask, causal, scale,
        dropout_p, dropout_seed, keep_threshold(dropout_p),
    )


@micro_q_attention_forward.register_fake
def _micro_q_attention_forward_fake(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    query_positions: Tensor,
    key_positions: Tensor,
    key_padding_mask: Optional[Tensor],
    causal: bool,
    scale: float,
    dropout_p: float,
    dropout_seed: int,
) -> tuple[Tensor, Tensor]:
    out = q.new_empty(q.shape, dtype=torch.float32)
    lse = q.new_empty(q.shape[:3], dtype=torch.float32)
    return out, lse


@torch.library.custom_op("lightning_mqsp::micro_q_attention_backward", mutates_args=())
def micro_q_attention_backward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    dout: Tensor,
    lse: Tensor,
    delta: Tensor,
    query_positions: Tensor,
    key_positions: Tensor,
    key_padding_mask: Optional[Tensor],
    causal: bool,
    scale: float,
    dropout_p: float,
    dropout_seed: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """This rank's gradient share given the global lse and delta: (dq [B, H, M, D], dk, dv [B, H_kv, N, D]), fp32."""
    return micro_q_backward(
        q, k, v, dout, lse, delta, query_positions, key_positions, key_padding_mask, causal, scale,
        dropout_p, dropout_seed, keep_threshold(dropout_p),
    )


@micro_q_attention_backward.register_fake
def _micro_q_attention_backward_fake(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    dout: Tensor,
    lse: Tensor,
    delta: Tensor,
    query_positions: Tensor,
    key_positions: Tensor,
    key_padding_mask: Optional[Tensor],
    causal: bool,
    scale: float,
    dropout_p: float,
    dropout_seed: int,
) -> tuple[Tensor, Tensor, Tensor]:
    dq = q.new_empty(q.shape, dtype=torch.float32)
    dk = k.new_empty(k.shape, dtype=torch.float32)
    dv = v.new_empty(v.shape, dtype=torch.float32)
    return dq, dk, dv
