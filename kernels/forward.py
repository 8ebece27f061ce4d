"""Forward kernel: the partial attention of gathered query rows against this rank's keys.

Flash-attention style (as in Triton's fused-attention tutorial): one program owns BLOCK_M
query rows of one (batch, head) and streams the local keys and values in blocks of BLOCK_N,
keeping a running row maximum ``m_i``, a running softmax denominator ``l_i`` and an
un-normalised output accumulator. The score tile lives only in registers.

What differs from the tutorial, and why:
- Masks come from *global* positions (``query_positions`` [M], ``key_positions`` [N]) and an
  optional key-padding mask, because MQSP's rows and keys are scattered over the sequence.
- A row may see no key at all on this rank; it must come out as ``lse = -inf`` and
  ``out = 0`` so that the cross-rank merge ignores it. Every exp is taken relative to a finite
  shift to keep NaN out.
- The output is the *partial* result in float32 (the merge across ranks needs full precision),
  together with the row log-sum-exp in natural-log units.
- Dropout multiplies the probabilities by a counter-based keep mask (see ``masks.py``); the
  denominator ``l_i`` sums the probabilities *before* dropout, as ``softmax`` then ``dropout`` does.
"""

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from lightning_mqsp.kernels.masks import dropout_keep, dropout_row_hash, visible_tile
from lightning_mqsp.kernels.tuning import AUTOTUNE_KEY, FORWARD_CONFIGS

LOG2E: float = math.log2(math.e)


@triton.autotune(configs=FORWARD_CONFIGS, key=AUTOTUNE_KEY)
# A fresh dropout seed every step: not specialising on its value avoids a recompile per step.
@triton.jit(do_not_specialize=["dropout_seed", "dropout_threshold"])
def _forward_kernel(
    Q, K, V, QueryPos, KeyPos, KeyPadding, Out, Lse,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_pad_b, stride_pad_n,
    num_heads, M, N,
    scale_log2,  # softmax scale * log2(e): scores are kept in base 2 so exp2 can be used
    dropout_seed, dropout_threshold, dropout_rescale,
    GROUP_SIZE: tl.constexpr,  # query heads per key/value head (GQA); 1 without GQA
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_PADDING: tl.constexpr, DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    block_m = tl.program_id(0)
    batch_head = tl.program_id(1)
    batch = batch_head // num_heads
    head = batch_head % num_heads
    # GQA: the key/value head is shared by GROUP_SIZE consecutive query heads; index it, never copy.
    kv_head = head // GROUP_SIZE

    offs_m = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_in_range = offs_m < M
    d_in_range = offs_d < HEAD_DIM  # BLOCK_D is HEAD_DIM rounded up to a power of two

    q = tl.load(
        Q + batch * stride_qb + head * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
        mask=row_in_range[:, None] & d_in_range[None, :], other=0.0,
    )
    query_pos = tl.load(QueryPos + offs_m, mask=row_in_range, other=-1)
    if DROPOUT:
        row_hash = dropout_row_hash(dropout_seed, batch_head, query_pos)
    # The latest query of the block: key blocks that all lie after it are skipped when causal.
    last_query_pos = tl.max(query_pos, 0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

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
            visible = visible_tile(query_pos, key_pos, row_in_range, key_attends, CAUSAL)

            # K is loaded transposed, [BLOCK_D, BLOCK_N], so the score tile is a plain q @ k.
            k = tl.load(
                k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                mask=key_in_range[None, :] & d_in_range[:, None], other=0.0,
            )
            scores = tl.dot(q, k, input_precision=DOT_PRECISION) * scale_log2
            scores = tl.where(visible, scores, float("-inf"))

            m_new = tl.maximum(m_i, tl.max(scores, 1))
            # A row with no visible key yet has m_new = -inf; shifting by 0 instead makes its
            # exp2(-inf - shift) terms 0 rather than exp2(-inf + inf) = NaN.
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(scores - shift[:, None])
            alpha = tl.math.exp2(m_i - shift)  # rescales what was accumulated under the old maximum
            l_i = l_i * alpha + tl.sum(p, 1)
            if DROPOUT:
                p = tl.where(dropout_keep(row_hash, key_pos, dropout_threshold), p * dropout_rescale, 0.0)

            v = tl.load(
                v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                mask=key_in_range[:, None] & d_in_range[None, :], other=0.0,
            )
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new

    # l_i = 0 exactly when the row saw no key: it gets lse = -inf and out = acc = 0.
    no_key = l_i == 0.0
    safe_l = tl.where(no_key, 1.0, l_i)
    out = acc / safe_l[:, None]
    lse = tl.where(no_key, float("-inf"), (m_i + tl.math.log2(safe_l)) * 0.6931471805599453)  # base 2 -> e
    tl.store(
        Out + (batch_head * M + offs_m[:, None]) * HEAD_DIM + offs_d[None, :], out,
        mask=row_in_range[:, None] & d_in_range[None, :],
    )
    tl.store(Lse + batch_head * M + offs_m, lse, mask=row_in_range)


def block_head_dim(head_dim: int) -> int:
    """The tile width along the head dimension: a power of two, and at least 16 for tl.dot."""
    return max(16, triton.next_power_of_2(head_dim))


def dot_precision(dtype: torch.dtype) -> str:
    """float32 inputs are multiplied in full precision (not TF32): the partials must be exact to fp32."""
    return "ieee" if dtype == torch.float32 else "tf32"


def micro_q_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    query_positions: Tensor,
    key_positions: Tensor,
    key_padding_mask: Tensor | None,
    causal: bool,
    scale: float,
    dropout_p: float,
    dropout_seed: int,
    dropout_threshold: int,
) -> tuple[Tensor, Tensor]:
    """Partial attention (out [B, H, M, D] fp32, lse [B, H, M] fp32) of q against k and v.

    q [B, H, M, D]; k, v [B, H_kv, N, D]; positions int64 on q's device, contiguous;
    ``key_padding_mask`` [B, N] bool (True = attend) or None; ``dropout_threshold`` is
    ``keep_threshold(dropout_p)``, used only when ``dropout_p > 0``.
    """
    batch, heads, rows, head_dim = q.shape
    num_kv_heads, num_keys = k.size(1), k.size(2)
    out = torch.empty((batch, heads, rows, head_dim), dtype=torch.float32, device=q.device)
    lse = torch.empty((batch, heads, rows), dtype=torch.float32, device=q.device)
    # The kernel reads the padding mask as bytes; a bool tensor views as uint8 without a copy.
    padding = key_padding_mask.view(torch.uint8) if key_padding_mask is not None else query_positions
    pad_strides = key_padding_mask.stride() if key_padding_mask is not None else (0, 0)

    def grid(meta: dict) -> tuple[int, int]:
        return triton.cdiv(rows, meta["BLOCK_M"]), batch * heads

    _forward_kernel[grid](
        q, k, v, query_positions, key_positions, padding, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *pad_strides,
        heads, rows, num_keys,
        scale * LOG2E,
        dropout_seed, dropout_threshold, 1.0 / (1.0 - dropout_p),
        GROUP_SIZE=heads // num_kv_heads,
        HEAD_DIM=head_dim, BLOCK_D=block_head_dim(head_dim),
        CAUSAL=causal, HAS_PADDING=key_padding_mask is not None, DROPOUT=dropout_p > 0.0,
        DOT_PRECISION=dot_precision(q.dtype),
    )
    return out, lse
