"""Input checks for ``mqsp_attention`` that fail on every rank together, never leaving one waiting.

Local mistakes (a bad shape on one rank) are found first but not raised at once: each rank
all-gathers one small row of metadata with an error flag in it, so that when any rank is wrong
*every* rank raises, and mismatches between ranks (different local lengths, dtypes, flags)
are caught by comparing the rows. Only then do the attention collectives start.
"""

from __future__ import annotations

import math
import struct

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_mqsp.comm import ProcessGroup, all_gather
from lightning_mqsp.layout import LAYOUTS

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def local_input_error(
    query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None, layout: str,
    scale: float | None, dropout_p: float, micro_q_size: int | None,
) -> str | None:
    """What is wrong with this rank's arguments, or None."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            return f"{name} must be a 4-D tensor [batch, heads, local_seq_len, head_dim] (got {getattr(t, 'shape', type(t))})."
        if t.dtype not in _DTYPES:
            return f"{name} must be a floating tensor ({', '.join(map(str, _DTYPES))}), got {t.dtype}."
    if not (query.dtype == key.dtype == value.dtype):
        return f"query, key and value must share a dtype, got {query.dtype}, {key.dtype}, {value.dtype}: cast them to one."
    if not (query.device == key.device == value.device):
        return f"query, key and value must be on one device, got {query.device}, {key.device}, {value.device}."
    if key.shape != value.shape:
        return f"key and value must have the same shape, got {tuple(key.shape)} and {tuple(value.shape)}."
    b, h, s, d = query.shape
    if key.size(0) != b or key.size(2) != s or key.size(3) != d:
        return (
            f"key/value {tuple(key.shape)} do not match query {tuple(query.shape)}: batch, local sequence "
            "length and head_dim must be equal ([B, H_kv, S_local, D] against [B, H, S_local, D])."
        )
    if h % key.size(1) != 0:
        return f"the query's {h} heads must be a multiple of the key/value heads ({key.size(1)}) for grouped-query attention."
    if s == 0:
        return "the local sequence is empty: every rank must hold at least one token."
    if key_padding_mask is not None:
        if key_padding_mask.shape != (b, s):
            return (
                f"key_padding_mask must be [batch, local_seq_len] = {(b, s)}, got {tuple(key_padding_mask.shape)}; "
                "pass this rank's shard of the mask, not the full-length one."
            )
        if key_padding_mask.dtype != torch.bool:
            return f"key_padding_mask must be bool (True = attend), got {key_padding_mask.dtype}: use mask.bool()."
        if key_padding_mask.device != query.device:
            return f"key_padding_mask is on {key_padding_mask.device} but query on {query.device}."
    if layout not in LAYOUTS:
        return f"layout must be one of {LAYOUTS}, got {layout!r}."
    if layout == "zigzag" and s % 2 != 0:
        return f"the zigzag layout holds two equal chunks per rank, so the local length must be even, got {s}."
    if micro_q_size is not None and (not isinstance(micro_q_size, int) or micro_q_size < 1):
        return f"micro_q_size must be a positive int (or None for automatic), got {micro_q_size!r}."
    if not 0.0 <= dropout_p < 1.0:
        return f"dropout_p must be in [0, 1), got {dropout_p}."
    if scale is not None and not (math.isfinite(scale) and scale > 0):
        return f"scale must be a positive finite float, got {scale}."
    return None


def check_group_membership(group: ProcessGroup | None) -> None:
    if dist.is_initialized() and group is not None and dist.get_rank(group) < 0:
        raise ValueError(
            f"This rank ({dist.get_rank()}) is not a member of the process group passed as `group`: "
            "call mqsp_attention only on the ranks of the sequence-parallel group it names."
        )


METADATA_FIELDS = (
    "error", "batch", "heads", "kv_heads", "local_seq_len", "head_dim", "dtype", "causal", "layout",
    "has_key_padding_mask", "micro_q_size", "dropout_p_ppm", "scale_bits", "dropout_seed",
)
_MUST_AGREE = METADATA_FIELDS[1:-1]  # the seed is taken from the group's first rank, so it need not agree


def synchronized_metadata(
    group: ProcessGroup | None, error: str | None, query: Tensor, key: Tensor, causal: bool, layout: str,
    has_mask: bool, micro_q_size: int | None, dropout_p: float, scale: float | None, dropout_seed: int,
) -> int:
    """All-gather one metadata row per rank, raise the same ValueError on every rank if any is
    wrong or they disagree, and return the group's dropout seed (its first rank's)."""
    if error is None:
        b, h, s, d = query.shape
        row = [
            0, b, h, key.size(1), s, d, _DTYPES.index(query.dtype), int(causal), LAYOUTS.index(layout),
            int(has_mask), micro_q_size or 0, round(dropout_p * 1e6),
            struct.unpack("<i", struct.pack("<f", scale or 0.0))[0], dropout_seed,
        ]
    else:
        row = [1] + [0] * (len(METADATA_FIELDS) - 1)
    device = query.device if isinstance(query, Tensor) else torch.device("cpu")
    rows = all_gather(torch.tensor(row, dtype=torch.int64, device=device), group).wait()
    if error is not None:
        raise ValueError(f"mqsp_attention: {error}")
    table = rows.cpu().tolist()
    bad = [r for r, other in enumerate(table) if other[0]]
    if bad:
        raise ValueError(f"mqsp_attention: rank(s) {bad} of the sequence-parallel group got invalid input; see the error raised there.")
    for i, name in enumerate(METADATA_FIELDS):
        if name in _MUST_AGREE and len({other[i] for other in table}) > 1:
            values = [other[i] for other in table]
            raise ValueError(
                f"mqsp_attention: `{name}` differs across the ranks of the sequence-parallel group ({values} by rank). "
                "Every rank must pass its own shard of the same batch: same batch size, heads, head_dim, dtype and "
                "flags, and the same local length (shard the sequence with lightning_mqsp.shard_sequence)."
            )
    return table[0][-1]
