"""Addressing, loading and scoring tiles: the pieces every kernel shares.

Offsets that can pass 2**31 (batch x heads x rows x head_dim elements) are int64: the base of a
tile is advanced by int64 scalars, and only the offsets inside a tile, below BLOCK x stride, are
int32.
"""

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)  # 1 / ln 2: exp(x) = exp2(x * LOG2E)


@triton.jit
def tile_pointers(Base, first_row, stride_row, stride_d, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """Pointers [BLOCK_ROWS, BLOCK_D] to rows first_row, first_row + 1, ... of a [rows, D] matrix."""
    rows = tl.arange(0, BLOCK_ROWS)
    columns = tl.arange(0, BLOCK_D)
    return Base + first_row.to(tl.int64) * stride_row + rows[:, None] * stride_row + columns[None, :] * stride_d


@triton.jit
def row_offsets(rows, segment_rows, stride_segment, stride_row):
    """int64 offsets of rows ``rows`` of a tensor stored as segments of ``segment_rows`` rows each: row m is row
    m % segment_rows of segment m // segment_rows. The rows gathered from P ranks are read where they arrived
    ([P, ..., c, D]), with no copy joining them; a tensor of one segment has segment_rows = its rows."""
    return (rows // segment_rows).to(tl.int64) * stride_segment + (rows % segment_rows).to(tl.int64) * stride_row


@triton.jit
def segment_tile_pointers(Base, first_row, segment_rows, stride_segment, stride_row, stride_d, BLOCK_ROWS: tl.constexpr,
                          BLOCK_D: tl.constexpr):
    """``tile_pointers`` for rows stored as segments (``row_offsets``): the tile may straddle two of them."""
    rows = first_row + tl.arange(0, BLOCK_ROWS)
    columns = tl.arange(0, BLOCK_D)
    return Base + row_offsets(rows, segment_rows, stride_segment, stride_row)[:, None] + columns[None, :] * stride_d


@triton.jit
def load_tile(pointers, rows_in_range, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASK_ROWS: tl.constexpr):
    """A [rows, BLOCK_D] tile; rows out of range (when MASK_ROWS) and columns past HEAD_DIM read as 0.

    BLOCK_D is HEAD_DIM rounded up to a power of two: for the usual head sizes the columns need no mask."""
    columns_in_range = tl.arange(0, BLOCK_D) < HEAD_DIM
    if MASK_ROWS:
        if HEAD_DIM == BLOCK_D:
            tile = tl.load(pointers, mask=rows_in_range[:, None], other=0.0)
        else:
            tile = tl.load(pointers, mask=rows_in_range[:, None] & columns_in_range[None, :], other=0.0)
    else:
        if HEAD_DIM == BLOCK_D:
            tile = tl.load(pointers)
        else:
            tile = tl.load(pointers, mask=columns_in_range[None, :], other=0.0)
    return tile


@triton.jit
def load_vector(pointers, in_range, other, MASKED: tl.constexpr):
    """A vector of per-row or per-key values (positions, document ids, padding, row statistics);
    ``other`` where out of range (when MASKED)."""
    if MASKED:
        values = tl.load(pointers, mask=in_range, other=other)
    else:
        values = tl.load(pointers)
    return values


@triton.jit
def store_tile(pointers, tile, rows_in_range, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Store a float32 tile, rounded to nearest (as torch's casts round) where the target is narrower: a layer's
    bfloat16 output or query gradient is written by the kernels themselves."""
    columns_in_range = tl.arange(0, BLOCK_D) < HEAD_DIM
    if pointers.dtype.element_ty != tl.float32:
        tile = tile.to(pointers.dtype.element_ty, fp_downcast_rounding="rtne")
    tl.store(pointers, tile, mask=rows_in_range[:, None] & columns_in_range[None, :])


@triton.jit
def capped(scores, cap_scale, SOFTCAP: tl.constexpr):
    """Raw dot products q.k, or with soft-capping tanh(q.k * scale / softcap): the scores in units of
    ``unit`` (scale, or softcap), in which the row maximum is tracked exactly as computed."""
    if SOFTCAP:
        scores = _tanh(scores * cap_scale)
    return scores


@triton.jit
def _tanh(x):
    """tanh from exp2, the same on a GPU and in the interpreter (which has no libdevice): absolute
    error ~1e-7, far below what the scores carry anyway."""
    decay = tl.math.exp2(tl.abs(x) * (-2.0 * LOG2E))  # in (0, 1]: no overflow for any x
    magnitude = (1.0 - decay) / (1.0 + decay)
    return tl.where(x < 0, -magnitude, magnitude)
