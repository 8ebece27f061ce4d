"""Backward kernels: this rank's share of dQ, dK and dV, recomputing the score tiles.

Fed with the *global* row statistics ``row_max`` and ``row_log_sum`` and ``delta = rowsum(dO * O)``
of the merged output, the flash backward yields exactly the local terms of MQSP's gradient: with
P = exp((s - row_max) - row_log_sum) the globally normalised probabilities on this rank's keys,

    dV = P_drop^T dO,   dP = dO V^T (dropped like P),   dS = P * (dP - delta) [* (1 - tanh^2) when capped],
    dK = scale * dS^T Q,   dQ = scale * dS K      (dQ partial: summed over ranks by the caller)

Two kernels, so that every output element is written by exactly one program in a fixed order
(bitwise deterministic, no atomics):
- ``_backward_dkdv_kernel``: one program per BLOCK_N keys of one (batch, key/value head). For
  each of the query heads that share the key/value head (GQA) and each query segment, it finds
  by binary search the rows that may see its keys (rows ascend within a segment) and loops over
  them, accumulating dK and dV in registers, starting from what the float32 accumulators hold
  (only this program touches those rows), and stores the sums back.
- ``_backward_dq_kernel``: one program per BLOCK_M query rows of one (batch, query head), over the
  key blocks its rows may see, as in the forward.
Rows with ``row_max = -inf`` (no key visible on any rank) get P = 0 and contribute nothing.
"""

import triton
import triton.language as tl
from torch import Tensor

from lightning_mqsp.kernels.arguments import KernelVisibility, dot_precision, same_strides
from lightning_mqsp.kernels.tiles import (
    LOG2E,
    capped,
    load_tile,
    load_vector,
    row_offsets,
    segment_tile_pointers,
    store_tile,
    tile_pointers,
)
from lightning_mqsp.kernels.tuning import AUTOTUNE_KEY, BACKWARD_DKDV_CONFIGS, BACKWARD_DQ_CONFIGS, prune_configs, tuning_buckets
from lightning_mqsp.kernels.visibility import (
    dropout_keep,
    dropout_row_hash,
    key_block_visibility,
    query_block,
    stage_range,
    streamed_block_visibility,
    visible_stages,
)


@triton.jit
def _normaliser(row_max, row_log_sum):
    """(row_max, row_log_sum in base 2) for ``_probabilities``; a row with no visible key anywhere
    (row_max = -inf) gets row_max = +inf, so that its P is exp2(-inf) = 0."""
    return tl.where(row_max == float("-inf"), float("inf"), row_max), row_log_sum * LOG2E


@triton.jit
def _probabilities(scores, unit, row_max, row_log_sum_log2):
    """P = exp((s - row_max) - row_log_sum) with s = scores * unit: the difference to the maximum is
    taken first, so a large row_max costs no precision."""
    return tl.math.exp2((scores * unit - row_max) * LOG2E - row_log_sum_log2)


@triton.jit
def _dq_stage(
    dq, q, do, row_max, row_log_sum_log2, delta, query_pos, query_doc, row_hash,
    K, V, KeyPos, KeyPadding, KeyDoc,
    stride_kn, stride_kd, stride_vn, stride_vd, stride_pad_n,
    lo, hi, N, window_left, window_right, cap_scale, unit, dropout_threshold, dropout_rescale,
    MASKED: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_PADDING: tl.constexpr, HAS_DOCUMENTS: tl.constexpr,
    SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dQ (unscaled) over the key blocks [lo, hi); MASKED as in the forward's stages."""
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        key_in_range = offs_n < N
        k = load_tile(tile_pointers(K, start_n, stride_kn, stride_kd, BLOCK_N, BLOCK_D), key_in_range, HEAD_DIM, BLOCK_D, MASKED)
        v = load_tile(tile_pointers(V, start_n, stride_vn, stride_vd, BLOCK_N, BLOCK_D), key_in_range, HEAD_DIM, BLOCK_D, MASKED)
        scores = capped(tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION), cap_scale, SOFTCAP)
        p = _probabilities(scores, unit, row_max[:, None], row_log_sum_log2[:, None])
        visible, key_pos = key_block_visibility(
            KeyPos, KeyPadding, KeyDoc, offs_n, key_in_range, query_pos, query_doc, stride_pad_n, window_left, window_right,
            MASKED, HAS_LEFT, HAS_RIGHT, HAS_PADDING, HAS_DOCUMENTS, DROPOUT,
        )
        if MASKED or HAS_PADDING:
            p = tl.where(visible, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        if DROPOUT:
            # The forward's mask, redrawn from the same counters: dropout scales dP as it scaled P.
            keep = dropout_keep(row_hash[:, None], key_pos[None, :], dropout_threshold)
            dp = tl.where(keep, dp * dropout_rescale, 0.0)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:  # d/dx [softcap * tanh(x / softcap)] = 1 - tanh^2
            ds = ds * (1.0 - scores * scores)
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    return dq


@triton.autotune(configs=BACKWARD_DQ_CONFIGS, key=AUTOTUNE_KEY, prune_configs_by={"early_config_prune": prune_configs})
@triton.jit(do_not_specialize=["M", "N", "segment_rows", "dropout_threshold", "ROWS_BUCKET", "KEYS_BUCKET"])
def _backward_dq_kernel(
    Q, K, V, DOut, RowMax, RowLogSum, Delta, DQ,
    QueryPos, KeyPos, KeyPadding, QueryDoc, KeyDoc, DropoutSeed,
    stride_qs, stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dos, stride_dob, stride_doh, stride_dom, stride_dod,
    stride_ss, stride_sb, stride_sh, stride_sm,
    stride_dqs, stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_pad_b, stride_pad_n, stride_qdoc_b, stride_kdoc_b,
    num_heads, group_size, M, N, segment_rows, ROWS_BUCKET, KEYS_BUCKET,
    window_left, window_right, cap_scale, unit, dropout_threshold, dropout_rescale, scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_PADDING: tl.constexpr, HAS_DOCUMENTS: tl.constexpr,
    SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Q, DOut and the row statistics are read where they arrived (segments of ``segment_rows``, ``row_offsets``), and
    dQ is written in the layout it is sent back in."""
    block_m = tl.program_id(0)
    batch_head = tl.program_id(1)
    batch = batch_head // num_heads
    head = batch_head % num_heads
    kv_head = head // group_size
    first_row = block_m * BLOCK_M
    offs_m = first_row + tl.arange(0, BLOCK_M)
    row_in_range = offs_m < M

    q = load_tile(segment_tile_pointers(Q + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh, first_row,
                                        segment_rows, stride_qs, stride_qm, stride_qd, BLOCK_M, BLOCK_D),
                  row_in_range, HEAD_DIM, BLOCK_D, True)
    do = load_tile(segment_tile_pointers(DOut + batch.to(tl.int64) * stride_dob + head.to(tl.int64) * stride_doh, first_row,
                                         segment_rows, stride_dos, stride_dom, stride_dod, BLOCK_M, BLOCK_D),
                   row_in_range, HEAD_DIM, BLOCK_D, True)
    row_stats = batch.to(tl.int64) * stride_sb + head.to(tl.int64) * stride_sh + row_offsets(offs_m, segment_rows, stride_ss, stride_sm)
    row_max, row_log_sum_log2 = _normaliser(tl.load(RowMax + row_stats, mask=row_in_range, other=float("-inf")),
                                            tl.load(RowLogSum + row_stats, mask=row_in_range, other=0.0))
    delta = tl.load(Delta + row_stats, mask=row_in_range, other=0.0)
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
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for stage in tl.static_range(3):  # masked edge, keys that every row sees (no mask), masked edge
        stage_lo, stage_hi = stage_range(stage, lo, full_lo, full_hi, hi)
        dq = _dq_stage(
            dq, q, do, row_max, row_log_sum_log2, delta, query_pos, query_doc, row_hash, K, V, KeyPos, KeyPadding, KeyDoc,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_pad_n,
            stage_lo, stage_hi, N, window_left, window_right, cap_scale, unit, dropout_threshold, dropout_rescale,
            stage != 1, HEAD_DIM, BLOCK_D, BLOCK_N, HAS_LEFT, HAS_RIGHT, HAS_PADDING, HAS_DOCUMENTS, SOFTCAP, DROPOUT,
            DOT_PRECISION,
        )
    dq_pointers = segment_tile_pointers(DQ + batch.to(tl.int64) * stride_dqb + head.to(tl.int64) * stride_dqh, first_row,
                                        segment_rows, stride_dqs, stride_dqm, stride_dqd, BLOCK_M, BLOCK_D)
    store_tile(dq_pointers, dq * scale, row_in_range, HEAD_DIM, BLOCK_D)


@triton.jit
def _dkdv_stage(
    dk, dv, k, v, key_pos, key_doc, key_attends,
    Q, DOut, RowMax, RowLogSum, Delta, QueryPos, QueryDoc, seed, batch_head,
    stride_qm, stride_qd, stride_dom, stride_dod, stride_sm,
    lo, hi, segment_start, segment_end, window_left, window_right, cap_scale, unit, dropout_threshold, dropout_rescale, scale,
    MASKED: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_PADDING: tl.constexpr, HAS_DOCUMENTS: tl.constexpr,
    SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dK and dV of one key block over the query row blocks [lo, hi) of one segment and head, added
    into ``dk`` and ``dv``. Tiles are transposed, [BLOCK_N keys, BLOCK_M rows], so the accumulators need no transpose.
    MASKED: edge blocks, where the window, the documents or the segment's ends cut through the block."""
    for start_m in range(lo, hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_in_range = (offs_m >= segment_start) & (offs_m < segment_end)
        q = load_tile(tile_pointers(Q, start_m, stride_qm, stride_qd, BLOCK_M, BLOCK_D), row_in_range, HEAD_DIM, BLOCK_D, MASKED)
        do = load_tile(tile_pointers(DOut, start_m, stride_dom, stride_dod, BLOCK_M, BLOCK_D), row_in_range, HEAD_DIM, BLOCK_D,
                       MASKED)
        row_stats = offs_m * stride_sm
        row_max, row_log_sum_log2 = _normaliser(load_vector(RowMax + row_stats, row_in_range, float("-inf"), MASKED),
                                                load_vector(RowLogSum + row_stats, row_in_range, 0.0, MASKED))
        delta = load_vector(Delta + row_stats, row_in_range, 0.0, MASKED)
        scores_t = capped(tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION), cap_scale, SOFTCAP)
        p_t = _probabilities(scores_t, unit, row_max[None, :], row_log_sum_log2[None, :])
        visible, query_pos = streamed_block_visibility(
            QueryPos, QueryDoc, offs_m, row_in_range, key_pos, key_doc, window_left, window_right,
            False, MASKED, HAS_LEFT, HAS_RIGHT, HAS_DOCUMENTS, DROPOUT,
        )
        if MASKED:
            p_t = tl.where(visible, p_t, 0.0)
        if HAS_PADDING:
            p_t = tl.where(key_attends[:, None], p_t, 0.0)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        p_dropped_t = p_t
        if DROPOUT:
            keep = dropout_keep(dropout_row_hash(seed, batch_head, query_pos)[None, :], key_pos[:, None], dropout_threshold)
            p_dropped_t = tl.where(keep, p_t * dropout_rescale, 0.0)
            dp_t = tl.where(keep, dp_t * dropout_rescale, 0.0)
        dv = tl.dot(p_dropped_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        if SOFTCAP:
            ds_t = ds_t * (1.0 - scores_t * scores_t)
        dk = tl.dot((ds_t * scale).to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.autotune(configs=BACKWARD_DKDV_CONFIGS, key=AUTOTUNE_KEY, prune_configs_by={"early_config_prune": prune_configs},
                 restore_value=["GradKey", "GradValue"])  # timing a config must not add into the accumulators
@triton.jit(do_not_specialize=["M", "N", "stored_rows", "dropout_threshold", "ROWS_BUCKET", "KEYS_BUCKET"])
def _backward_dkdv_kernel(
    Q, K, V, DOut, RowMax, RowLogSum, Delta, GradKey, GradValue,
    QueryPos, KeyPos, KeyPadding, QueryDoc, KeyDoc, DropoutSeed,
    stride_qs, stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dos, stride_dob, stride_doh, stride_dom, stride_dod,
    stride_ss, stride_sb, stride_sh, stride_sm,
    stride_gkb, stride_gkh, stride_gkn, stride_gkd,
    stride_gvb, stride_gvh, stride_gvn, stride_gvd,
    stride_pad_b, stride_pad_n, stride_qdoc_b, stride_kdoc_b,
    num_heads, group_size, M, N, stored_rows, ROWS_BUCKET, KEYS_BUCKET, query_segments,
    window_left, window_right, cap_scale, unit, dropout_threshold, dropout_rescale, scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_PADDING: tl.constexpr, HAS_DOCUMENTS: tl.constexpr,
    SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    block_n = tl.program_id(0)
    batch_kv_head = tl.program_id(1)
    num_kv_heads = num_heads // group_size
    batch = batch_kv_head // num_kv_heads
    kv_head = batch_kv_head % num_kv_heads
    first_key = block_n * BLOCK_N
    last_key = tl.minimum(first_key + BLOCK_N, N) - 1
    offs_n = first_key + tl.arange(0, BLOCK_N)
    key_in_range = offs_n < N

    k = load_tile(tile_pointers(K + batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh, first_key, stride_kn,
                                stride_kd, BLOCK_N, BLOCK_D), key_in_range, HEAD_DIM, BLOCK_D, True)
    v = load_tile(tile_pointers(V + batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh, first_key, stride_vn,
                                stride_vd, BLOCK_N, BLOCK_D), key_in_range, HEAD_DIM, BLOCK_D, True)
    # Keys ascend: the block's first and last key bound the positions and documents it holds.
    key_pos = tl.load(KeyPos + offs_n, mask=key_in_range, other=0)
    key_min, key_max = tl.load(KeyPos + first_key), tl.load(KeyPos + last_key)
    key_doc, doc_min, doc_max = key_pos, key_min, key_max  # unused without documents
    QueryDoc += batch.to(tl.int64) * stride_qdoc_b
    if HAS_DOCUMENTS:
        KeyDoc += batch.to(tl.int64) * stride_kdoc_b
        key_doc = tl.load(KeyDoc + offs_n, mask=key_in_range, other=0)
        doc_min, doc_max = tl.load(KeyDoc + first_key), tl.load(KeyDoc + last_key)
    key_attends = key_in_range
    if HAS_PADDING:
        key_attends = tl.load(KeyPadding + batch.to(tl.int64) * stride_pad_b + offs_n * stride_pad_n, mask=key_in_range,
                              other=0) != 0
    seed = 0
    if DROPOUT:
        seed = tl.load(DropoutSeed)

    # Accumulate straight into what the accumulators hold: this program is the only one that touches
    # these rows, and no second [BLOCK_N, D] tile is live at the end (as an add after the loop would need).
    grad_key = tile_pointers(GradKey + batch.to(tl.int64) * stride_gkb + kv_head.to(tl.int64) * stride_gkh, first_key,
                             stride_gkn, stride_gkd, BLOCK_N, BLOCK_D)
    grad_value = tile_pointers(GradValue + batch.to(tl.int64) * stride_gvb + kv_head.to(tl.int64) * stride_gvh, first_key,
                               stride_gvn, stride_gvd, BLOCK_N, BLOCK_D)
    dk = load_tile(grad_key, key_in_range, HEAD_DIM, BLOCK_D, True)
    dv = load_tile(grad_value, key_in_range, HEAD_DIM, BLOCK_D, True)
    segment_rows = M // query_segments
    # Q, DOut and the statistics are stored as segments of stored_rows rows (the gathered [n, B, H, c, ...], or one
    # segment of M rows); each query segment lies in one of them, so shifting the base once per segment lets the
    # inner loop address rows as if they were one matrix.
    # Query heads, then segments, then stages: a fixed order, so the sums are bitwise deterministic. (Heads
    # outside: the segments' bounds are found again for each head, but none stay live across the head loop,
    # which keeps dK and dV in registers at D = 128.)
    for group_index in range(group_size):
        head = kv_head * group_size + group_index
        batch_head = batch * num_heads + head
        for segment in range(query_segments):
            segment_start = segment * segment_rows
            segment_end = segment_start + segment_rows
            stored = (segment_start // stored_rows).to(tl.int64)
            stored_start = stored * stored_rows
            Q_head = Q + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh + stored * stride_qs - stored_start * stride_qm
            DOut_head = (DOut + batch.to(tl.int64) * stride_dob + head.to(tl.int64) * stride_doh + stored * stride_dos
                         - stored_start * stride_dom)
            row_stats = batch.to(tl.int64) * stride_sb + head.to(tl.int64) * stride_sh + stored * stride_ss - stored_start * stride_sm
            # A row at position p sees this block's keys k when k - right <= p <= k + left.
            lo, full_lo, full_hi, hi = visible_stages(
                QueryPos, QueryDoc, segment_start, segment_end, key_min, key_max, doc_min, doc_max, window_right, window_left,
                HAS_RIGHT, HAS_LEFT, HAS_DOCUMENTS, BLOCK_M,
            )
            for stage in tl.static_range(3):  # masked edge, rows that see every key of the block (no mask), masked edge
                stage_lo, stage_hi = stage_range(stage, lo, full_lo, full_hi, hi)
                dk, dv = _dkdv_stage(
                    dk, dv, k, v, key_pos, key_doc, key_attends,
                    Q_head, DOut_head, RowMax + row_stats, RowLogSum + row_stats, Delta + row_stats, QueryPos, QueryDoc,
                    seed, batch_head, stride_qm, stride_qd, stride_dom, stride_dod, stride_sm,
                    stage_lo, stage_hi, segment_start, segment_end, window_left, window_right, cap_scale, unit,
                    dropout_threshold, dropout_rescale, scale,
                    stage != 1, HEAD_DIM, BLOCK_D, BLOCK_M, HAS_LEFT, HAS_RIGHT, HAS_PADDING, HAS_DOCUMENTS, SOFTCAP, DROPOUT,
                    DOT_PRECISION,
                )

    store_tile(grad_key, dk, key_in_range, HEAD_DIM, BLOCK_D)
    store_tile(grad_value, dv, key_in_range, HEAD_DIM, BLOCK_D)


def partial_attention_backward(
    q: Tensor, k: Tensor, v: Tensor, dout: Tensor, row_max: Tensor, row_log_sum: Tensor, delta: Tensor,
    grad_query: Tensor, grad_key: Tensor, grad_value: Tensor, visibility: KernelVisibility, scale: float,
) -> None:
    """Writes dQ into grad_query [n, B, H, c, D] (any float dtype and strides) and adds dK and dV into grad_key and
    grad_value ([B, H_kv, N, D] float32).

    q, dout [n, B, H, c, D] (n segments of c rows) and k, v [B, H_kv, N, D] in one dtype; row_max, row_log_sum and
    delta, [n, B, H, c] float32 with the same strides, are the global (merged) row statistics. The query segments
    of ``visibility`` must each lie in one of the n: n = 1, or n = visibility.query_segments."""
    segments, batch, heads, rows, head_dim = q.shape
    if not same_strides(row_max, row_log_sum, delta):
        raise ValueError("partial_attention_backward: row_max, row_log_sum and delta must have the same strides")
    if segments not in (1, visibility.query_segments):
        raise ValueError(f"partial_attention_backward: {segments} stored segments for {visibility.query_segments} query segments")
    num_kv_heads, num_keys = k.size(1), k.size(2)
    shared = (*visibility.strides, heads, heads // num_kv_heads, segments * rows, num_keys, rows, *tuning_buckets(rows, num_keys))
    scalars = (*visibility.scalars(scale), scale)
    flags = dict(**visibility.flags(head_dim), DOT_PRECISION=dot_precision(q.dtype))

    def dkdv_grid(meta: dict) -> tuple[int, int]:
        return triton.cdiv(num_keys, meta["BLOCK_N"]), batch * num_kv_heads

    def dq_grid(meta: dict) -> tuple[int, int]:
        return triton.cdiv(segments * rows, meta["BLOCK_M"]), batch * heads

    inputs = (*q.stride(), *k.stride(), *v.stride(), *dout.stride(), *row_max.stride())
    _backward_dkdv_kernel[dkdv_grid](
        q, k, v, dout, row_max, row_log_sum, delta, grad_key, grad_value, *visibility.pointers,
        *inputs, *grad_key.stride(), *grad_value.stride(), *shared, visibility.query_segments, *scalars, **flags,
    )
    _backward_dq_kernel[dq_grid](
        q, k, v, dout, row_max, row_log_sum, delta, grad_query, *visibility.pointers, *inputs, *grad_query.stride(), *shared,
        *scalars, **flags,
    )
