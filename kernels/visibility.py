"""Which entries of a score tile exist, and which of them dropout keeps.

Both are pure functions of global positions (and the dropout seed), so the forward kernel and
the two backward kernels draw exactly the same tiles without storing any mask.

The dropout hash reproduces ``lightning_mqsp.dropout.keep_mask`` bit for bit. The torch
version works on int64 masked to 32 bits; here everything is uint32, whose multiplication
wraps modulo 2**32 and whose right shifts are logical, which is the same arithmetic: the low
32 bits of a product depend only on the low 32 bits of its factors.
"""

import triton
import triton.language as tl

from lightning_mqsp import dropout as _torch_dropout

# The same odd multipliers as the torch hash, taken from it so the two cannot drift apart.
_HEAD_MULT = tl.constexpr(_torch_dropout._HEAD_MULT)
_QUERY_MULT = tl.constexpr(_torch_dropout._QUERY_MULT)
_KEY_MULT = tl.constexpr(_torch_dropout._KEY_MULT)


@triton.jit
def visible_tile(query_pos, key_pos, row_in_range, key_attends, CAUSAL: tl.constexpr):
    """Bool [BLOCK_M, BLOCK_N]: the query row exists, the key exists and is not padding, and
    (when causal) the key's global position is not after the query's."""
    visible = row_in_range[:, None] & key_attends[None, :]
    if CAUSAL:
        visible = visible & (key_pos[None, :] <= query_pos[:, None])
    return visible


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
    """Second hash round over the tile: True where the attention probability is kept.

    ``threshold`` is ``keep_threshold(dropout_p)`` (below 2**32 since dropout_p < 1)."""
    bits = _fmix32(row_hash[:, None] ^ (key_pos.to(tl.uint32) * _KEY_MULT)[None, :])
    return bits >= threshold.to(tl.uint32)
