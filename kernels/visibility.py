"""Which (query, key) pairs attend, inside the kernels: the model of ``lightning_mqsp.visibility``.

A query at position q sees a key at position k when ``q - left <= k <= q + right`` (each side
optional), the key is not padding, and (with documents) both have the same document id. Key
positions ascend, query positions ascend within each segment, and document ids never decrease
along positions. So, for a block of one side, the indices of the other side that it may see form
one range, found by binary search; inside it, a sub-range that every member of the block sees.
The kernels loop over that sub-range without a mask and mask only the edge blocks around it, as
the stages of Triton's fused-attention tutorial do for the causal diagonal.

The dropout hash reproduces ``lightning_mqsp.dropout.keep_mask`` bit for bit. The torch version
works on int64 masked to 32 bits; here everything is uint32, whose multiplication wraps modulo
2**32 and whose right shifts are logical: the same arithmetic, since the low 32 bits of a product
depend only on the low 32 bits of its factors.
"""

import triton
import triton.language as tl

from lightning_mqsp import dropout as _torch_dropout
from lightning_mqsp.kernels.tiles import load_vector

# The same odd multipliers as the torch hash, taken from it so the two cannot drift apart.
_HEAD_MULT = tl.constexpr(_torch_dropout._HEAD_MULT)
_QUERY_MULT = tl.constexpr(_torch_dropout._QUERY_MULT)
_KEY_MULT = tl.constexpr(_torch_dropout._KEY_MULT)
_INT64_MAX = tl.constexpr(2**63 - 1)
_INT64_MIN = tl.constexpr(-(2**63))


@triton.jit
def _lower_bound(Values, lo, hi, value):
    """The first index in [lo, hi) whose value is >= ``value`` (hi if none); Values ascend there."""
    while lo < hi:
        mid = (lo + hi) // 2
        below = tl.load(Values + mid) < value
        lo = tl.where(below, mid + 1, lo)
        hi = tl.where(below, hi, mid)
    return lo


@triton.jit
def _position_lower_bound(Positions, lo, hi, value):
    """``_lower_bound`` over strictly ascending integer positions (distinct tokens): each index
    adds at least 1, which bounds the answer from both ends before searching. A run of
    consecutive positions, the common case, needs no search step at all."""
    if lo < hi:
        first = tl.load(Positions + lo)
        last = tl.load(Positions + hi - 1)
        # Indices below value - last + hi - 1 hold positions below value; from lo + value - first on, none do.
        least = tl.minimum(tl.maximum(value - last + hi - 1, lo), hi).to(tl.int32)
        most = tl.minimum(tl.maximum(value - first + lo, lo), hi).to(tl.int32)
        lo = _lower_bound(Positions, least, most, value)
    return lo


@triton.jit
def _stage_bounds(first, full_first, full_stop, stop, BLOCK: tl.constexpr):
    """Blocks of BLOCK indices, aligned to multiples of BLOCK, in three stages: masked [lo, full_lo),
    unmasked [full_lo, full_hi), masked [full_hi, hi). Indices [first, stop) may be visible,
    [full_first, full_stop) are visible to the whole block of the other side; the unmasked stage
    holds whole blocks of those only."""
    lo = first // BLOCK * BLOCK
    hi = tl.where(stop > first, stop, lo)
    full_lo = tl.minimum(tl.maximum((full_first + BLOCK - 1) // BLOCK * BLOCK, lo), hi)
    full_hi = tl.minimum(tl.maximum(tl.minimum(full_stop, hi) // BLOCK * BLOCK, full_lo), hi)
    return lo, full_lo, full_hi, hi


@triton.jit
def visible_stages(
    Positions, Documents, start, end, other_min, other_max, other_doc_min, other_doc_max, before, after,
    HAS_BEFORE: tl.constexpr, HAS_AFTER: tl.constexpr, HAS_DOCUMENTS: tl.constexpr, BLOCK: tl.constexpr,
):
    """Stage bounds (see ``_stage_bounds``) over indices [start, end) of one side, seen from a block
    of the other side whose positions span [other_min, other_max] and document ids
    [other_doc_min, other_doc_max]. Index i is visible to position p when
    ``p - before <= Positions[i] <= p + after``: (before, after) = (left, right) for keys seen
    from queries, (right, left) for queries seen from keys."""
    start += tl.zeros([], dtype=tl.int32)  # an index tensor even when the caller passes a constant
    end += tl.zeros([], dtype=tl.int32)
    first = start
    stop = end
    full_first = start
    full_stop = end
    if HAS_BEFORE:
        first = _position_lower_bound(Positions, start, end, other_min - before)
        full_first = _position_lower_bound(Positions, first, end, other_max - before)
    if HAS_AFTER:
        stop = _position_lower_bound(Positions, first, end, other_max + after + 1)
        full_stop = _position_lower_bound(Positions, first, stop, other_min + after + 1)
    if HAS_DOCUMENTS:
        doc_first = _lower_bound(Documents, start, end, other_doc_min)
        doc_stop = _lower_bound(Documents, doc_first, end, other_doc_max + 1)
        first = tl.maximum(first, doc_first)
        stop = tl.minimum(stop, doc_stop)
        full_first = tl.maximum(full_first, doc_first)
        # A block spanning several documents sees no index of the other side entirely.
        full_stop = tl.where(other_doc_min == other_doc_max, tl.minimum(full_stop, doc_stop), full_first)
    return _stage_bounds(first, full_first, full_stop, stop, BLOCK)


@triton.jit
def span(values, valid):
    """(min, max) of the valid entries of a 1-D int64 block."""
    return tl.min(tl.where(valid, values, _INT64_MAX), 0), tl.max(tl.where(valid, values, _INT64_MIN), 0)


@triton.jit
def visible_tile(
    in_range, query_pos, key_pos, query_doc, key_doc, window_left, window_right,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_DOCUMENTS: tl.constexpr,
):
    """Bool tile for an edge block: the index exists (``in_range``), and the window and the
    documents let the pair through. The arguments broadcast against each other ([BLOCK_M, 1]
    against [1, BLOCK_N], or transposed for the dK/dV tiles)."""
    visible = in_range
    if HAS_LEFT:
        visible = visible & (key_pos >= query_pos - window_left)
    if HAS_RIGHT:
        visible = visible & (key_pos <= query_pos + window_right)
    if HAS_DOCUMENTS:
        visible = visible & (query_doc == key_doc)
    return visible


@triton.jit
def streamed_block_visibility(
    Positions, Documents, offs, in_range, fixed_pos, fixed_doc, window_left, window_right,
    STREAMING_KEYS: tl.constexpr, MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    HAS_DOCUMENTS: tl.constexpr, DROPOUT: tl.constexpr,
):
    """(visible, positions) of the block ``offs`` of the streamed side, seen from the program's fixed
    block (positions ``fixed_pos``, documents ``fixed_doc``). Keys stream past query rows in the forward
    and dQ kernels (tiles [BLOCK_M, BLOCK_N]), rows past keys in dK/dV (tiles [BLOCK_N, BLOCK_M]).

    ``visible`` means something only when MASKED (an edge block); the positions are loaded when
    MASKED or DROPOUT (for the hash)."""
    visible = in_range[None, :]
    positions = offs
    if MASKED or DROPOUT:
        positions = load_vector(Positions + offs, in_range, 0, MASKED)
    if MASKED:
        documents = positions
        if HAS_DOCUMENTS:
            documents = load_vector(Documents + offs, in_range, 0, MASKED)
        if STREAMING_KEYS:
            visible = visible_tile(visible, fixed_pos[:, None], positions[None, :], fixed_doc[:, None], documents[None, :],
                                   window_left, window_right, HAS_LEFT, HAS_RIGHT, HAS_DOCUMENTS)
        else:
            visible = visible_tile(visible, positions[None, :], fixed_pos[:, None], documents[None, :], fixed_doc[:, None],
                                   window_left, window_right, HAS_LEFT, HAS_RIGHT, HAS_DOCUMENTS)
    return visible, positions


@triton.jit
def key_block_visibility(
    KeyPos, KeyPadding, KeyDoc, offs_n, key_in_range, query_pos, query_doc, stride_pad_n, window_left, window_right,
    MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_PADDING: tl.constexpr,
    HAS_DOCUMENTS: tl.constexpr, DROPOUT: tl.constexpr,
):
    """``streamed_block_visibility`` of a key block (forward and dQ), with the key padding, which is
    applied in every block (it is cheap): ``visible`` means something when MASKED or HAS_PADDING."""
    visible, key_pos = streamed_block_visibility(
        KeyPos, KeyDoc, offs_n, key_in_range, query_pos, query_doc, window_left, window_right,
        True, MASKED, HAS_LEFT, HAS_RIGHT, HAS_DOCUMENTS, DROPOUT,
    )
    if HAS_PADDING:
        visible = visible & (load_vector(KeyPadding + offs_n * stride_pad_n, key_in_range, 0, MASKED) != 0)[None, :]
    return visible, key_pos


@triton.jit
def _fmix32(x):
    """MurmurHash3's 32-bit finaliser on a uint32 tensor."""
    x = x ^ (x >> 16)
    x = x * 0x85EBCA6B
    x = x ^ (x >> 13)
    x = x * 0xC2B2AE35
    return x ^ (x >> 16)


@triton.jit
def dropout_row_hash(seed, batch_head, query_pos):
    """First hash round, once per query row: mixes (seed, b * H + h, global query position).

    ``batch_head`` is b * H + h with H the number of *query* heads, as in ``keep_mask``."""
    row = seed.to(tl.uint32) ^ (batch_head.to(tl.uint32) * _HEAD_MULT)
    return _fmix32(row ^ (query_pos.to(tl.uint32) * _QUERY_MULT))


@triton.jit
def dropout_keep(row_hash, key_pos, threshold):
    """Second hash round over the tile (row_hash and key_pos broadcast against each other): True
    where the attention probability is kept. ``threshold`` is ``keep_threshold(dropout_p)``."""
    bits = _fmix32(row_hash ^ (key_pos.to(tl.uint32) * _KEY_MULT))
    return bits >= threshold.to(tl.uint32)


@triton.jit
def stage_range(stage: tl.constexpr, lo, full_lo, full_hi, hi):
    """Index bounds of stage 0 (masked edge), 1 (unmasked) or 2 (masked edge) of ``visible_stages``."""
    if stage == 0:
        start, stop = lo, full_lo
    elif stage == 1:
        start, stop = full_lo, full_hi
    else:
        start, stop = full_hi, hi
    return start, stop


@triton.jit
def query_block(
    QueryPos, QueryDoc, KeyPos, KeyDoc, offs_m, row_in_range, N, window_left, window_right,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_DOCUMENTS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """A block of query rows (forward and dQ): (positions, document ids, and the stage bounds over
    the keys of ``visible_stages``). The rows need not be sorted (a block may straddle two
    segments): their span bounds what they see. QueryDoc and KeyDoc point at this batch's ids."""
    query_pos = tl.load(QueryPos + offs_m, mask=row_in_range, other=0)
    pos_min, pos_max = span(query_pos, row_in_range)
    query_doc = query_pos  # unused without documents
    doc_min, doc_max = pos_min, pos_max
    if HAS_DOCUMENTS:
        query_doc = tl.load(QueryDoc + offs_m, mask=row_in_range, other=0)
        doc_min, doc_max = span(query_doc, row_in_range)
    lo, full_lo, full_hi, hi = visible_stages(
        KeyPos, KeyDoc, 0, N, pos_min, pos_max, doc_min, doc_max, window_left, window_right,
        HAS_LEFT, HAS_RIGHT, HAS_DOCUMENTS, BLOCK_N,
    )
    return query_pos, query_doc, lo, full_lo, full_hi, hi
