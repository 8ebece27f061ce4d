"""Merge kernel: the P partial results of each row, as they return to the row's owner, into its attention output.

The math of :func:`lightning_mqsp.merge.merge` in one pass over the returned buffer [n, B, H, c, D + 2] (each
partial's output, then its ``row_max`` and ``row_log_sum``), which the forward kernel wrote and the all-to-all
delivered as it is: the merged output is stored in the caller's dtype and layout (the sequence-major output of
``mqsp_attention``), the merged statistics next to it. One launch a micro-step, where the same merge in torch ops
was about a dozen. One program owns BLOCK_M rows of one (batch, head) and reads the n partials twice: their maxima
first, then their outputs, weighted.
"""

import triton
import triton.language as tl
from torch import Tensor

from lightning_mqsp.kernels.arguments import block_head_dim, same_strides
from lightning_mqsp.kernels.tiles import load_tile, store_tile, tile_pointers
from lightning_mqsp.kernels.tuning import MERGE_CONFIG


@triton.jit(do_not_specialize=["M", "parts"])
def _merge_kernel(
    Parts, Out, RowMax, RowLogSum,
    stride_pn, stride_pb, stride_ph, stride_pm,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_sb, stride_sh, stride_sm,
    num_heads, parts, M,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    block_m = tl.program_id(0)
    batch_head = tl.program_id(1)
    batch = batch_head // num_heads
    head = batch_head % num_heads
    first_row = block_m * BLOCK_M
    offs_m = first_row + tl.arange(0, BLOCK_M)
    row_in_range = offs_m < M
    Rows = Parts + batch.to(tl.int64) * stride_pb + head.to(tl.int64) * stride_ph
    statistics = offs_m * stride_pm + HEAD_DIM  # row_max at column D, row_log_sum at D + 1

    merged_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for part in range(parts):
        merged_max = tl.maximum(merged_max, tl.load(Rows + part * stride_pn + statistics, mask=row_in_range, other=float("-inf")))
    # A row no partial saw keeps -inf; shifting by 0 makes its weights exp(-inf) = 0, not NaN.
    shift = tl.where(merged_max == float("-inf"), 0.0, merged_max)
    total = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for part in range(parts):
        Part = Rows + part * stride_pn
        row_max = tl.load(Part + statistics, mask=row_in_range, other=float("-inf"))
        row_log_sum = tl.load(Part + statistics + 1, mask=row_in_range, other=0.0)
        weight = tl.exp(row_max - shift + row_log_sum)
        total += weight
        out = load_tile(tile_pointers(Part, first_row, stride_pm, 1, BLOCK_M, BLOCK_D), row_in_range, HEAD_DIM, BLOCK_D, True)
        acc += weight[:, None] * out
    safe_total = tl.where(total > 0.0, total, 1.0)  # 0: the row saw no key anywhere (out = 0, row_log_sum = 0)
    row_stats = batch.to(tl.int64) * stride_sb + head.to(tl.int64) * stride_sh + offs_m * stride_sm
    tl.store(RowMax + row_stats, merged_max, mask=row_in_range)
    tl.store(RowLogSum + row_stats, tl.log(safe_total), mask=row_in_range)
    out_pointers = tile_pointers(Out + batch.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh, first_row, stride_om,
                                 stride_od, BLOCK_M, BLOCK_D)
    store_tile(out_pointers, acc / safe_total[:, None], row_in_range, HEAD_DIM, BLOCK_D)


def merge_partials(parts: Tensor, out: Tensor, row_max: Tensor, row_log_sum: Tensor) -> None:
    """Merge parts [n, B, H, c, D + 2] (float32, each row (out | row_max | row_log_sum), rows contiguous) into out
    [B, H, c, D] (any float dtype and strides) and row_max, row_log_sum [B, H, c] (float32, the same strides)."""
    if parts.stride(-1) != 1:
        raise ValueError("merge_partials: the partials' rows must be contiguous")
    if not same_strides(row_max, row_log_sum):
        raise ValueError("merge_partials: row_max and row_log_sum must have the same strides")
    count, batch, heads, rows, width = parts.shape
    head_dim = width - 2
    block_m = MERGE_CONFIG.kwargs["BLOCK_M"]
    _merge_kernel[(triton.cdiv(rows, block_m), batch * heads)](
        parts, out, row_max, row_log_sum, *parts.stride()[:4], *out.stride(), *row_max.stride(), heads, count, rows,
        HEAD_DIM=head_dim, BLOCK_D=block_head_dim(head_dim), BLOCK_M=block_m, num_warps=MERGE_CONFIG.num_warps,
    )
