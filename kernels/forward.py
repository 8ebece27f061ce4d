"""Forward kernel: the partial attention of (gathered) query rows against this rank's keys.

Flash-attention style, after Triton's fused-attention tutorial: one program owns BLOCK_M query
rows of one (batch, head) and streams the keys and values in blocks of BLOCK_N, keeping a
running row maximum ``m_i``, a running sum ``l_i`` and an un-normalised output accumulator; the
score tile lives only in registers. The key blocks a program visits are bounded by binary search
on the key positions (``visibility.visible_stages``): masked edge stages around an unmasked
main stage of keys that every row of the block sees.

What the result is (``lightning_mqsp.backends``): ``out`` normalised over the visible keys, the
row's largest visible score ``row_max`` in natural units, exactly one of the computed scores,
and ``row_log_sum = log sum_j exp(s_j - row_max)``; a row with no visible key gets -inf, 0 and
0. Scores are kept in units of ``unit`` (raw q.k with unit = scale, or tanh(q.k scale / softcap)
with unit = softcap), so that the maximum is tracked on the values themselves. Dropout
multiplies the probabilities by the counter-based keep mask after the sum ``l_i`` took them,
as ``softmax`` then ``dropout`` does.
"""

import triton
import triton.language as tl
from torch import Tensor

from lightning_mqsp.kernels.arguments import KernelVisibility, dot_precision, same_strides
from lightning_mqsp.kernels.tiles import LOG2E, capped, load_tile, row_offsets, segment_tile_pointers, store_tile, tile_pointers
from lightning_mqsp.kernels.tuning import AUTOTUNE_KEY, FORWARD_CONFIGS, prune_configs, tuning_buckets
from lightning_mqsp.kernels.visibility import dropout_keep, dropout_row_hash, key_block_visibility, query_block, stage_range


@triton.jit
def _forward_stage(
    acc, l_i, m_i, q, query_pos, query_doc, row_hash,
    K, V, KeyPos, KeyPadding, KeyDoc,
    stride_kn, stride_kd, stride_vn, stride_vd, stride_pad_n,
    lo, hi, N, window_left, window_right, cap_scale, unit_log2, dropout_threshold, dropout_rescale,
    MASKED: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_PADDING: tl.constexpr, HAS_DOCUMENTS: tl.constexpr,
    SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """The online softmax over the key blocks [lo, hi); MASKED: edge blocks, where the window, the
    documents or the end of the keys cut through the block."""
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        key_in_range = offs_n < N
        k = load_tile(tile_pointers(K, start_n, stride_kn, stride_kd, BLOCK_N, BLOCK_D), key_in_range, HEAD_DIM, BLOCK_D, MASKED)
        scores = capped(tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION), cap_scale, SOFTCAP)
        visible, key_pos = key_block_visibility(
            KeyPos, KeyPadding, KeyDoc, offs_n, key_in_range, query_pos, query_doc, stride_pad_n, window_left, window_right,
            MASKED, HAS_LEFT, HAS_RIGHT, HAS_PADDING, HAS_DOCUMENTS, DROPOUT,
        )
        if MASKED or HAS_PADDING:
            scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        # A row with no visible key yet keeps m = -inf; shifting it by 0 instead gives exp2(-inf) = 0, not NaN.
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2((scores - shift[:, None]) * unit_log2)
        alpha = tl.math.exp2((m_i - shift) * unit_log2)  # rescales what was summed under the old maximum
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            keep = dropout_keep(row_hash[:, None], key_pos[None, :], dropout_threshold)
            p = tl.where(keep, p * dropout_rescale, 0.0)
        v = load_tile(tile_pointers(V, start_n, stride_vn, stride_vd, BLOCK_N, BLOCK_D), key_in_range, HEAD_DIM, BLOCK_D, MASKED)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.autotune(configs=FORWARD_CONFIGS, key=AUTOTUNE_KEY, prune_configs_by={"early_config_prune": prune_configs})
@triton.jit(do_not_specialize=["M", "N", "segment_rows", "dropout_threshold", "ROWS_BUCKET", "KEYS_BUCKET"])
def _forward_kernel(
    Q, K, V, Out, RowMax, RowLogSum,
    QueryPos, KeyPos, KeyPadding, QueryDoc, KeyDoc, DropoutSeed,
    stride_qs, stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_os, stride_ob, stride_oh, stride_om, stride_od,
    stride_ss, stride_sb, stride_sh, stride_sm,
    stride_pad_b, stride_pad_n, stride_qdoc_b, stride_kdoc_b,
    num_heads, group_size, M, N, segment_rows, ROWS_BUCKET, KEYS_BUCKET,
    window_left, window_right, cap_scale, unit, dropout_threshold, dropout_rescale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_PADDING: tl.constexpr, HAS_DOCUMENTS: tl.constexpr,
    SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Rows are stored as segments of ``segment_rows`` (``row_offsets``): Q as the gathered [n, B, H, c, D], Out
    and the row statistics straight into the buffer that returns them to their ranks ([n, B, H, c, D + 2]: no
    packing copies). ROWS_BUCKET and KEYS_BUCKET are only the autotuning key."""
    block_m = tl.program_id(0)
    batch_head = tl.program_id(1)
    batch = batch_head // num_heads
    head = batch_head % num_heads
    kv_head = head // group_size  # GQA: index the shared key/value head, never copy it
    first_row = block_m * BLOCK_M
    offs_m = first_row + tl.arange(0, BLOCK_M)
    row_in_range = offs_m < M

    q = load_tile(segment_tile_pointers(Q + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh, first_row,
                                        segment_rows, stride_qs, stride_qm, stride_qd, BLOCK_M, BLOCK_D),
                  row_in_range, HEAD_DIM, BLOCK_D, True)
    KeyDoc += batch.to(tl.int64) * stride_kdoc_b
    query_pos, query_doc, lo, full_lo, full_hi, hi = query_block(
        QueryPos, QueryDoc + batch.to(tl.int64) * stride_qdoc_b, KeyPos, KeyDoc, offs_m, row_in_range, N,
        window_left, window_right, HAS_LEFT, HAS_RIGHT, HAS_DOCUMENTS, BLOCK_N,
    )
    row_hash = query_pos
    if DROPOUT:
        row_hash = dropout_row_hash(tl.load(DropoutSeed), batch_head, query_pos)

    K += batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
    V += batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh
    KeyPadding += batch.to(tl.int64) * stride_pad_b
    unit_log2 = unit * LOG2E
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for stage in tl.static_range(3):  # masked edge, keys that every row sees (no mask), masked edge
        stage_lo, stage_hi = stage_range(stage, lo, full_lo, full_hi, hi)
        acc, l_i, m_i = _forward_stage(
            acc, l_i, m_i, q, query_pos, query_doc, row_hash, K, V, KeyPos, KeyPadding, KeyDoc,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_pad_n,
            stage_lo, stage_hi, N, window_left, window_right, cap_scale, unit_log2, dropout_threshold, dropout_rescale,
            stage != 1, HEAD_DIM, BLOCK_D, BLOCK_N, HAS_LEFT, HAS_RIGHT, HAS_PADDING, HAS_DOCUMENTS, SOFTCAP, DROPOUT,
            DOT_PRECISION,
        )

    # l_i = 0 exactly when the row saw no key (else the maximum adds exp2(0) = 1): out = 0, row_log_sum = log 1 = 0.
    seen_sum = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / seen_sum[:, None]
    row_stats = batch.to(tl.int64) * stride_sb + head.to(tl.int64) * stride_sh + row_offsets(offs_m, segment_rows, stride_ss, stride_sm)
    tl.store(RowMax + row_stats, m_i * unit, mask=row_in_range)
    tl.store(RowLogSum + row_stats, tl.log(seen_sum), mask=row_in_range)
    out_pointers = segment_tile_pointers(Out + batch.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh, first_row,
                                         segment_rows, stride_os, stride_om, stride_od, BLOCK_M, BLOCK_D)
    store_tile(out_pointers, out, row_in_range, HEAD_DIM, BLOCK_D)


def partial_attention_forward(
    q: Tensor, k: Tensor, v: Tensor, out: Tensor, row_max: Tensor, row_log_sum: Tensor, visibility: KernelVisibility,
    scale: float,
) -> None:
    """Writes out [n, B, H, c, D] (any float dtype, any strides) and row_max, row_log_sum [n, B, H, c] (float32, the
    same strides) for q [n, B, H, c, D] (n segments of c rows: n x c rows in all) against k, v [B, H_kv, N, D]
    (q's dtype)."""
    segments, batch, heads, rows, head_dim = q.shape
    if not same_strides(row_max, row_log_sum):
        raise ValueError("partial_attention_forward: row_max and row_log_sum must have the same strides")

    def grid(meta: dict) -> tuple[int, int]:
        return triton.cdiv(segments * rows, meta["BLOCK_M"]), batch * heads

    _forward_kernel[grid](
        q, k, v, out, row_max, row_log_sum, *visibility.pointers,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *row_max.stride(), *visibility.strides,
        heads, heads // k.size(1), segments * rows, k.size(2), rows, *tuning_buckets(rows, k.size(2)),
        *visibility.scalars(scale), **visibility.flags(head_dim), DOT_PRECISION=dot_precision(q.dtype),
    )
