"""Backward kernels: this rank's share of dQ, dK and dV, recomputing the score tiles.

Fed with the *global* row log-sum-exp ``lse`` and ``delta = rowsum(dO * O)`` of the merged
output, the ordinary flash backward yields exactly the local terms of MQSP's gradient
(DESIGN.md, section 2): with P = exp(S - lse) the globally normalised probabilities on this
rank's keys,

    dV = P_drop^T dO,   dP = dO V^T (dropped like P),   dS = P * (dP - delta),
    dK = scale * dS^T Q,   dQ = scale * dS K      (dQ partial: summed over ranks by the caller)

Two kernels, so that every output element is written by exactly one program in a fixed order
(bitwise deterministic, no atomics):
- ``_backward_dkdv_kernel``: one program per BLOCK_N keys of one (batch, key/value head). It
  loops over the GROUP_SIZE query heads sharing that key/value head (GQA) and over all query
  blocks, accumulating dK and dV in registers.
- ``_backward_dq_kernel``: one program per BLOCK_M query rows of one (batch, query head),
  looping over the key blocks.
Both recompute P from Q, K and lse rather than storing it; rows with ``lse = -inf`` (no key
visible on any rank) get P = 0 and contribute nothing.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from lightning_mqsp.kernels.forward import LOG2E, block_head_dim, dot_precision
from lightning_mqsp.kernels.masks import dropout_keep, dropout_row_hash, visible_tile
from lightning_mqsp.kernels.tuning import AUTOTUNE_KEY, BACKWARD_DKDV_CONFIGS, BACKWARD_DQ_CONFIGS


@triton.jit
def _lse_log2(lse):
    """The global lse in base 2; -inf (row with no visible key) becomes +inf so that P = 2^(S - lse) = 0."""
    return tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)


@triton.autotune(configs=BACKWARD_DKDV_CONFIGS, key=AUTOTUNE_KEY)
@triton.jit(do_not_specialize=["dropout_seed", "dropout_threshold"])
def _backward_dkdv_kernel(
    Q, K, V, DOut, Lse, Delta, QueryPos, KeyPos, KeyPadding, DK, DV,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_pad_b, stride_pad_n,
    num_heads, num_kv_heads, M, N,
    scale, scale_log2,
    dropout_seed, dropout_threshold, dropout_rescale,
    GROUP_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_PADDING: tl.constexpr, DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    block_n = tl.program_id(0)
    batch_kv_head = tl.program_id(1)
    batch = batch_kv_head // num_kv_heads
    kv_head = batch_kv_head % num_kv_heads

    offs_n = block_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    key_in_range = offs_n < N
    d_in_range = offs_d < HEAD_DIM
    kv_mask = key_in_range[:, None] & d_in_range[None, :]

    k = tl.load(K + batch * stride_kb + kv_head * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=kv_mask, other=0.0)
    v = tl.load(V + batch * stride_vb + kv_head * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                mask=kv_mask, other=0.0)
    key_pos = tl.load(KeyPos + offs_n, mask=key_in_range, other=0x7FFFFFFFFFFFFFFF)
    key_attends = key_in_range
    if HAS_PADDING:
        padding = tl.load(KeyPadding + batch * stride_pad_b + offs_n * stride_pad_n, mask=key_in_range, other=0)
        key_attends = key_attends & (padding != 0)
    # The earliest key of the block: query blocks that all lie before it are skipped when causal.
    first_key_pos = tl.min(key_pos, 0)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    # The query heads of this key/value head are summed here, in a fixed order: GQA without atomics.
    for group_index in range(GROUP_SIZE):
        head = kv_head * GROUP_SIZE + group_index
        batch_head = batch * num_heads + head
        q_base = Q + batch * stride_qb + head * stride_qh
        do_base = DOut + batch * stride_dob + head * stride_doh
        for start_m in range(0, M, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            row_in_range = offs_m < M
            query_pos = tl.load(QueryPos + offs_m, mask=row_in_range, other=-1)
            if CAUSAL:
                any_visible = tl.max(query_pos, 0) >= first_key_pos
            else:
                any_visible = True
            if any_visible:
                row_mask = row_in_range[:, None] & d_in_range[None, :]
                q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd, mask=row_mask, other=0.0)
                do = tl.load(do_base + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod, mask=row_mask, other=0.0)
                lse_log2 = _lse_log2(tl.load(Lse + batch_head * M + offs_m, mask=row_in_range, other=0.0))
                delta = tl.load(Delta + batch_head * M + offs_m, mask=row_in_range, other=0.0)

                scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
                visible = visible_tile(query_pos, key_pos, row_in_range, key_attends, CAUSAL)
                p = tl.where(visible, tl.math.exp2(scores - lse_log2[:, None]), 0.0)
                dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
                if DROPOUT:
                    # The forward's mask, redrawn from the same counters: dropout scales P and dP alike.
                    keep = dropout_keep(dropout_row_hash(dropout_seed, batch_head, query_pos), key_pos, dropout_threshold)
                    p_dropped = tl.where(keep, p * dropout_rescale, 0.0)
                    dp = tl.where(keep, dp * dropout_rescale, 0.0)
                else:
                    p_dropped = p
                dv += tl.dot(tl.trans(p_dropped.to(do.dtype)), do, input_precision=DOT_PRECISION)
                ds = p * (dp - delta[:, None])
                dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION)

    out_offsets = (batch_kv_head * N + offs_n[:, None]) * HEAD_DIM + offs_d[None, :]
    tl.store(DK + out_offsets, dk * scale, mask=kv_mask)
    tl.store(DV + out_offsets, dv, mask=kv_mask)


@triton.autotune(configs=BACKWARD_DQ_CONFIGS, key=AUTOTUNE_KEY)
@triton.jit(do_not_specialize=["dropout_seed", "dropout_threshold"])
def _backward_dq_kernel(
    Q, K, V, DOut, Lse, Delta, QueryPos, KeyPos, KeyPadding, DQ,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_pad_b, stride_pad_n,
    num_heads, M, N,
    scale, scale_log2,
    dropout_seed, dropout_threshold, dropout_rescale,
    GROUP_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_PADDING: tl.constexpr, DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    block_m = tl.program_id(0)
    batch_head = tl.program_id(1)
    batch = batch_head // num_heads
    head = batch_head % num_heads
    kv_head = head // GROUP_SIZE

    offs_m = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_in_range = offs_m < M
    d_in_range = offs_d < HEAD_DIM
    row_mask = row_in_range[:, None] & d_in_range[None, :]

    q = tl.load(Q + batch * stride_qb + head * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=row_mask, other=0.0)
    do = tl.load(DOut + batch * stride_dob + head * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                 mask=row_mask, other=0.0)
    lse_log2 = _lse_log2(tl.load(Lse + batch_head * M + offs_m, mask=row_in_range, other=0.0))
    delta = tl.load(Delta + batch_head * M + offs_m, mask=row_in_range, other=0.0)
    query_pos = tl.load(QueryPos + offs_m, mask=row_in_range, other=-1)
    if DROPOUT:
        row_hash = dropout_row_hash(dropout_seed, batch_head, query_pos)
    last_query_pos = tl.max(query_pos, 0)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    k_base = K + batch * stride_kb + kv_head * stride_kh
    v_base = V + batch * stride_vb + kv_head * stride_vh
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        key_in_range = offs_n < N
        key_pos = tl.load(KeyPos + offs_n, mask=key_in_range, other=0x7FFFFFFFFFFFFFFF)
        if CAUSAL:
            any_visible = tl.min(key_pos, 0) <= last_query_pos
        else:
            any_visible = True
        if any_visible:
            key_attends = key_in_range
            if HAS_PADDING:
                padding = tl.load(KeyPadding + batch * stride_pad_b + offs_n * stride_pad_n, mask=key_in_range, other=0)
                key_attends = key_attends & (padding != 0)
            kv_mask = key_in_range[:, None] & d_in_range[None, :]
            k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
            v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)

            scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
            visible = visible_tile(query_pos, key_pos, row_in_range, key_attends, CAUSAL)
            p = tl.where(visible, tl.math.exp2(scores - lse_log2[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
            if DROPOUT:
                dp = tl.where(dropout_keep(row_hash, key_pos, dropout_threshold), dp * dropout_rescale, 0.0)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)

    tl.store(DQ + (batch_head * M + offs_m[:, None]) * HEAD_DIM + offs_d[None, :], dq * scale, mask=row_mask)


def micro_q_backward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    dout: Tensor,
    lse: Tensor,
    delta: Tensor,
    query_positions: Tensor,
    key_positions: Tensor,
    key_padding_mask: Tensor | None,
    causal: bool,
    scale: float,
    dropout_p: float,
    dropout_seed: int,
    dropout_threshold: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq [B, H, M, D], dk [B, H_kv, N, D], dv [B, H_kv, N, D]), all float32.

    ``lse`` and ``delta`` [B, H, M] are the global (merged) row statistics; the other arguments
    are those of ``micro_q_forward``.
    """
    batch, heads, rows, head_dim = q.shape
    num_kv_heads, num_keys = k.size(1), k.size(2)
    lse = lse.float().contiguous()
    delta = delta.float().contiguous()
    dq = torch.empty((batch, heads, rows, head_dim), dtype=torch.float32, device=q.device)
    dk = torch.empty((batch, num_kv_heads, num_keys, head_dim), dtype=torch.float32, device=q.device)
    dv = torch.empty_like(dk)
    padding = key_padding_mask.view(torch.uint8) if key_padding_mask is not None else query_positions
    pad_strides = key_padding_mask.stride() if key_padding_mask is not None else (0, 0)
    shared = dict(
        GROUP_SIZE=heads // num_kv_heads,
        HEAD_DIM=head_dim, BLOCK_D=block_head_dim(head_dim),
        CAUSAL=causal, HAS_PADDING=key_padding_mask is not None, DROPOUT=dropout_p > 0.0,
        DOT_PRECISION=dot_precision(q.dtype),
    )
    strides = (*q.stride(), *k.stride(), *v.stride(), *dout.stride(), *pad_strides)
    dropout_args = (dropout_seed, dropout_threshold, 1.0 / (1.0 - dropout_p))

    def dkdv_grid(meta: dict) -> tuple[int, int]:
        return triton.cdiv(num_keys, meta["BLOCK_N"]), batch * num_kv_heads

    def dq_grid(meta: dict) -> tuple[int, int]:
        return triton.cdiv(rows, meta["BLOCK_M"]), batch * heads

    _backward_dkdv_kernel[dkdv_grid](
        q, k, v, dout, lse, delta, query_positions, key_positions, padding, dk, dv,
        *strides, heads, num_kv_heads, rows, num_keys, scale, scale * LOG2E, *dropout_args, **shared,
    )
    _backward_dq_kernel[dq_grid](
        q, k, v, dout, lse, delta, query_positions, key_positions, padding, dq,
        *strides, heads, rows, num_keys, scale, scale * LOG2E, *dropout_args, **shared,
    )
    return dq, dk, dv
