"""Input checks for ``mqsp_attention`` that fail on every rank together, never leaving one waiting.

Local mistakes (a bad shape on one rank) are found first but not raised at once: each rank
all-gathers one small row of host-known metadata with an error flag in it, so that when any
rank is wrong *every* rank raises, and mismatches between ranks (different local lengths,
dtypes, flags) are caught by comparing the rows. Only then do the attention collectives start.

The exchange runs once per distinct :class:`Signature` and group: later calls with a signature
already checked read nothing back on the host and send nothing. All ranks of a group call
attention the same number of times with the same signatures (they hold shards of the same
batch), so they skip the exchange together. A rank whose arguments change while its peers'
stay the same cannot be told apart from that without an exchange per call: its collectives
then disagree with theirs and the call fails at the group's timeout with a
:class:`~lightning_mqsp.comm.CollectiveError` (``docs/design.md``, "Checks").
"""

from __future__ import annotations

import math
import struct
import weakref
from dataclasses import astuple, dataclass, fields
from numbers import Real

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_mqsp import comm
from lightning_mqsp.backends import accumulation_dtype, available_backends
from lightning_mqsp.comm import ProcessGroup
from lightning_mqsp.layout import LAYOUTS, layout_error

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_DEVICE_TYPES = ("cpu", "cuda", "meta", "other")
#: At most this many signatures are remembered per group (sequence lengths that change every step stay bounded).
_MAX_SIGNATURES = 1024


def _float_bits(value: float | None) -> int:
    """A float as the int64 of its IEEE double bits (exact, never overflows); None as 0."""
    return 0 if value is None else struct.unpack("<q", struct.pack("<d", float(value)))[0]


@dataclass(frozen=True)
class Signature:
    """Everything about a call that every rank of the group must agree on, as host-known integers."""

    batch: int
    heads: int
    kv_heads: int
    local_seq_len: int
    head_dim: int
    dtype: int
    device_type: int
    layout: int
    window_left: int  # -1: unbounded
    window_right: int
    has_key_padding_mask: int
    has_document_ids: int
    micro_q_size: int
    backend: int
    needs_grad: int
    scale_bits: int
    softcap_bits: int
    dropout_p_bits: int
    head_groups: int

    @staticmethod
    def of(
        query: Tensor, key: Tensor, *, layout: str, window: tuple[int | None, int | None], has_key_padding_mask: bool,
        has_document_ids: bool, micro_q_size: int, backend: str, needs_grad: bool, scale: float,
        softcap: float | None, dropout_p: float, head_groups: int,
    ) -> Signature:
        b, h, s, d = query.shape
        device_type = query.device.type if query.device.type in _DEVICE_TYPES else "other"
        return Signature(
            b, h, key.size(1), s, d, _DTYPES.index(query.dtype), _DEVICE_TYPES.index(device_type), LAYOUTS.index(layout),
            -1 if window[0] is None else window[0], -1 if window[1] is None else window[1],
            int(has_key_padding_mask), int(has_document_ids), micro_q_size, available_backends().index(backend),
            int(needs_grad), _float_bits(scale), _float_bits(softcap), _float_bits(dropout_p), head_groups,
        )


FIELDS = tuple(f.name for f in fields(Signature))


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_float(value: object) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def _tensor_error(query: object, key: object, value: object) -> str | None:
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            return f"{name} must be a 4-D tensor [batch, heads, local_seq_len, head_dim] (got {getattr(t, 'shape', type(t).__name__)})."
        if t.dtype not in _DTYPES:
            return f"{name} must be a floating tensor ({', '.join(map(str, _DTYPES))}), got {t.dtype}."
    assert isinstance(query, Tensor) and isinstance(key, Tensor) and isinstance(value, Tensor)
    if not (query.dtype == key.dtype == value.dtype):
        return f"query, key and value must share a dtype, got {query.dtype}, {key.dtype}, {value.dtype}: cast them to one."
    if not (query.device == key.device == value.device):
        return f"query, key and value must be on one device, got {query.device}, {key.device}, {value.device}."
    if key.shape != value.shape:
        return f"key and value must have the same shape, got {tuple(key.shape)} and {tuple(value.shape)}."
    b, h, s, d = query.shape
    if min(b, h, s, d, key.size(1)) == 0:
        return (
            f"query {tuple(query.shape)} and key/value {tuple(key.shape)} must have at least one batch entry, head, key/value head, "
            "token and head dimension on every rank."
        )
    if key.size(0) != b or key.size(2) != s or key.size(3) != d:
        return (
            f"key/value {tuple(key.shape)} do not match query {tuple(query.shape)}: batch, local sequence "
            "length and head_dim must be equal ([B, H_kv, S_local, D] against [B, H, S_local, D])."
        )
    if h % key.size(1) != 0:
        return f"the query's {h} heads must be a multiple of the key/value heads ({key.size(1)}) for grouped-query attention."
    return None


def _per_token_error(name: str, t: object, query: Tensor, integer: bool) -> str | None:
    b, _, s, _ = query.shape
    if not isinstance(t, Tensor):
        return f"{name} must be a tensor [batch, local_seq_len] or None, got {type(t).__name__}."
    if tuple(t.shape) != (b, s):
        return (
            f"{name} must be [batch, local_seq_len] = {(b, s)}, got {tuple(t.shape)}; "
            "pass this rank's shard, not the full-length tensor."
        )
    if integer and (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool):
        return f"{name} must hold integer document ids, got {t.dtype}: use ids.long()."
    if not integer and t.dtype != torch.bool:
        return f"{name} must be bool (True = attend), got {t.dtype}: use mask.bool()."
    if t.device != query.device:
        return f"{name} is on {t.device} but query on {query.device}."
    return None


def _settings_error(
    query: Tensor, *, causal: object, window: object, softcap: object, layout: object, scale: object, dropout_p: object,
    micro_q_size: object, backend: object,
) -> str | None:
    if not isinstance(causal, bool):
        return f"causal must be a bool, got {causal!r}."
    if window is not None and not (
        isinstance(window, tuple) and len(window) == 2 and all(w is None or (_is_int(w) and w >= 0) for w in window)
    ):
        return f"window must be None or a (left, right) tuple of non-negative ints or None, got {window!r}."
    largest = torch.finfo(accumulation_dtype(query.dtype)).max
    for name, x in (("scale", scale), ("softcap", softcap)):
        if x is not None and not (_is_float(x) and math.isfinite(x) and 0 < x <= largest):  # type: ignore[arg-type, operator]
            hint = " (a tensor scale cannot be differentiated through mqsp_attention: pass a Python float)" if isinstance(x, Tensor) else ""
            return f"{name} must be a positive finite Python float (at most {largest:.3g} for {query.dtype}) or None, got {x!r}{hint}."
    if not (_is_float(dropout_p) and 0.0 <= dropout_p < 1.0):  # type: ignore[operator]
        return f"dropout_p must be a float in [0, 1), got {dropout_p!r}."
    if micro_q_size is not None and not (_is_int(micro_q_size) and micro_q_size >= 1):  # type: ignore[operator]
        return f"micro_q_size must be a positive int (or None for automatic), got {micro_q_size!r}."
    if (error := layout_error(layout)) is not None:
        return error
    if layout == "zigzag" and query.size(2) % 2 != 0:
        return f"the zigzag layout holds two equal chunks per rank, so the local length must be even, got {query.size(2)}."
    if backend not in available_backends():
        return f"unknown attention backend {backend!r}; choose one of {available_backends()}."
    return None


def _backward_memory_error(key: Tensor, *, head_groups: object, offload_queries: object, dropout_p: object) -> str | None:
    kv_heads = key.size(1)
    if not (_is_int(head_groups) and head_groups >= 1 and kv_heads % head_groups == 0):  # type: ignore[operator]
        divisors = [g for g in range(1, kv_heads + 1) if kv_heads % g == 0]
        return f"head_groups must be a positive int that divides the {kv_heads} key/value heads (one of {divisors}), got {head_groups!r}."
    if head_groups != 1 and dropout_p:
        return (f"head_groups={head_groups} cannot be combined with attention dropout (dropout_p={dropout_p}): its mask is drawn "
                "per head of the whole call; use head_groups=1 or dropout_p=0.0.")
    if not isinstance(offload_queries, bool):
        return f"offload_queries must be a bool, got {offload_queries!r}."
    return None


def local_input_error(
    query: object, key: object, value: object, *, key_padding_mask: object, document_ids: object, causal: object,
    window: object, softcap: object, layout: object, scale: object, dropout_p: object, micro_q_size: object, backend: object,
    head_groups: object = 1, offload_queries: object = False,
) -> str | None:
    """What is wrong with this rank's arguments, or None. Never raises: the answer must reach the exchange."""
    try:
        error = _tensor_error(query, key, value)
        if error is not None:
            return error
        assert isinstance(query, Tensor) and isinstance(key, Tensor)
        for name, t, integer in (("key_padding_mask", key_padding_mask, False), ("document_ids", document_ids, True)):
            if t is not None and (error := _per_token_error(name, t, query, integer)) is not None:
                return error
        return _settings_error(query, causal=causal, window=window, softcap=softcap, layout=layout, scale=scale,
                               dropout_p=dropout_p, micro_q_size=micro_q_size, backend=backend) or _backward_memory_error(
            key, head_groups=head_groups, offload_queries=offload_queries, dropout_p=dropout_p)
    except Exception as error:  # noqa: BLE001 - any argument that breaks a check is an invalid argument
        return f"invalid arguments ({type(error).__name__}: {error})."


def group_membership_error(group: ProcessGroup | None) -> str | None:
    """Why this rank cannot take part in ``group`` (then it must not enter its collectives), or None."""
    if dist.is_initialized() and group is not None and dist.get_rank(group) < 0:
        return (
            f"This rank ({dist.get_rank()}) is not a member of the process group passed as `group`: "
            "call mqsp_attention only on the ranks of the sequence-parallel group it names."
        )
    return None


_checked: weakref.WeakKeyDictionary[ProcessGroup, set[Signature]] = weakref.WeakKeyDictionary()


def _metadata_device(group: ProcessGroup | None) -> torch.device:
    """CPU for gloo; the current GPU for NCCL, which sends device tensors only."""
    backend = str(dist.get_backend(group)).lower()
    return torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend else torch.device("cpu")


def check_across_ranks(group: ProcessGroup | None, error: str | None, signature: Signature | None) -> None:
    """Raise the same ValueError on every rank of ``group`` if any rank's input is wrong or they disagree.

    Sends one row of metadata the first time a signature is seen on ``group``; nothing afterwards.
    """
    key = group if group is not None else dist.group.WORLD
    assert key is not None
    checked = _checked.setdefault(key, set())
    if error is None and signature in checked:
        return
    row = [0, *astuple(signature)] if signature is not None and error is None else [1] + [0] * len(FIELDS)
    metadata = torch.tensor(row, dtype=torch.int64, device=_metadata_device(group))
    gathered = comm.all_gather(metadata, group, "mqsp_attention: the check of its inputs").wait()
    # A fake process group (memory estimates under FakeTensorMode) sends the row but carries no values back.
    table = [row] * comm.group_size(group) if dist.get_backend(group) == "fake" else gathered.cpu().tolist()
    if error is not None:
        raise ValueError(f"mqsp_attention: {error}")
    bad = [r for r, other in enumerate(table) if other[0]]
    if bad:
        raise ValueError(f"mqsp_attention: rank(s) {bad} of the sequence-parallel group got invalid input; see the error raised there.")
    for i, name in enumerate(FIELDS, start=1):
        values = [other[i] for other in table]
        if len(set(values)) > 1:
            raise ValueError(
                f"mqsp_attention: `{name}` differs across the ranks of the sequence-parallel group ({values} by rank). "
                "Every rank must pass its own shard of the same batch: same batch size, heads, head_dim, dtype, "
                "settings and flags, and the same local length (shard the sequence with lightning_mqsp.shard_sequence)."
            )
    if len(checked) >= _MAX_SIGNATURES:
        checked.clear()
    checked.add(signature)  # type: ignore[arg-type]
