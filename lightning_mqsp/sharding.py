"""Splitting a batch of full sequences into this rank's shard, and gathering outputs back.

:class:`BatchSharder` takes a batch as the user's transfer hooks left it (a dict, a Hugging
Face ``BatchEncoding``, or a tuple/list of tensors) and, for the tensors that hold sequences:

1. shifts causal-LM ``labels`` left by one (``labels[t] = labels[t+1]``, last = -100), so that no
   label has to cross a shard edge; the loss is then computed without a shift
   (see :mod:`lightning_mqsp.loss`);
2. pads a length that does not divide into ``P`` (``2P`` for zigzag) equal chunks: ``input_ids``
   with the pad token, ``attention_mask`` with 0 (created if the batch had none), ``labels``
   with -100, everything else with 0;
3. adds global ``position_ids`` (models would otherwise number every shard from 0);
4. keeps this rank's chunks of every sequence tensor, by the layout.

:func:`gather_sequence` is the inverse for outputs: all-gather over the group, reorder, trim.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from lightning.fabric.utilities.rank_zero import rank_zero_warn
from torch import Tensor

from lightning_mqsp import comm
from lightning_mqsp.comm import ProcessGroup
from lightning_mqsp.layout import Layout, chunks_per_rank, shard_sequence, unshard_sequence

#: Batch keys that hold one entry per token, [batch, sequence, ...].
DEFAULT_SEQUENCE_KEYS: tuple[str, ...] = (
    "input_ids", "attention_mask", "token_type_ids", "labels", "position_ids",
    "special_tokens_mask", "inputs_embeds", "loss_mask",
)
#: The label value that losses skip (PyTorch's and Hugging Face's convention).
IGNORE_INDEX = -100
#: Pad values by key; other keys pad with 0. ``input_ids`` pads with the strategy's pad token.
_PAD_VALUES = {"attention_mask": 0, "labels": IGNORE_INDEX, "loss_mask": 0, "special_tokens_mask": 1}


@dataclass
class BatchSharder:
    """Shards batches along ``sequence_dim`` for ``rank`` of a sequence-parallel group of ``world_size``."""

    rank: int
    world_size: int
    layout: Layout
    sequence_keys: Sequence[str] = DEFAULT_SEQUENCE_KEYS
    pad_token_id: int = 0
    shift_labels: bool = False
    sequence_dim: int = 1
    #: Full (unpadded) length of the last batch sharded, for trimming gathered outputs.
    last_full_length: int | None = field(default=None, init=False)

    def padded_length(self, length: int) -> int:
        parts = self.world_size * chunks_per_rank(self.layout)
        return -(-length // parts) * parts

    def shard(self, batch: Any) -> Any:
        """This rank's part of ``batch``, of the same type."""
        if isinstance(batch, Mapping):
            return self._shard_mapping(batch)
        if isinstance(batch, (tuple, list)) and not _is_namedtuple(batch):
            return type(batch)(self._shard_positional(batch))
        raise TypeError(
            f"MQSPStrategy cannot shard a batch of type {type(batch).__name__}: return a dict (or a Hugging Face "
            "BatchEncoding) keyed by `input_ids`, `attention_mask`, `labels`, ..., or a tuple of [batch, sequence] tensors."
        )

    def _shard_mapping(self, batch: Mapping[str, Any]) -> Any:
        keys = [k for k in self.sequence_keys if isinstance(batch.get(k), Tensor)]
        if not keys:
            raise ValueError(
                f"MQSPStrategy found none of the sequence keys {list(self.sequence_keys)} in the batch (keys: {list(batch)}). "
                "Pass `sequence_keys=[...]` naming the batch entries that hold sequences."
            )
        items = dict(batch)
        length = self._common_length([items[k] for k in keys], keys)
        if self.shift_labels and isinstance(items.get("labels"), Tensor):
            items["labels"] = shift_left(items["labels"], self.sequence_dim)
        padded = self.padded_length(length)
        reference = items[keys[0]]
        if padded != length:
            self._log_padding(length, padded)
            if "attention_mask" not in items:
                items["attention_mask"] = torch.ones(reference.shape[:2], dtype=torch.long, device=reference.device)
                keys.append("attention_mask")
            for key in keys:
                items[key] = _pad(items[key], self.sequence_dim, padded - length, self._pad_value(key))
        if "position_ids" not in items:
            items["position_ids"] = torch.arange(padded, device=reference.device).expand(reference.size(0), padded)
            keys.append("position_ids")
        for key in keys:
            items[key] = shard_sequence(items[key], self.sequence_dim, self.rank, self.world_size, self.layout)
        self.last_full_length = length
        if isinstance(batch, dict) and type(batch) is dict:
            return items
        return _rebuild_mapping(batch, items)

    def _shard_positional(self, batch: Sequence[Any]) -> list[Any]:
        # Without keys, the sequence tensors are those of the batch's sequence length; nothing says which
        # one is a mask, so a length that does not divide cannot be padded safely.
        tensors = [x for x in batch if isinstance(x, Tensor) and x.dim() > self.sequence_dim]
        if not tensors:
            raise ValueError("MQSPStrategy found no [batch, sequence] tensor in the batch to shard.")
        length = tensors[0].size(self.sequence_dim)
        if self.padded_length(length) != length:
            raise ValueError(
                f"MQSPStrategy cannot pad a tuple batch of length {length} to {self.padded_length(length)} "
                "(it cannot tell the attention mask and the labels apart): return a dict batch with "
                "`input_ids`/`attention_mask`/`labels` keys, or pad the sequences to a multiple of "
                f"{self.world_size * chunks_per_rank(self.layout)} yourself."
            )
        self.last_full_length = length
        return [
            shard_sequence(x, self.sequence_dim, self.rank, self.world_size, self.layout)
            if isinstance(x, Tensor) and x.dim() > self.sequence_dim and x.size(self.sequence_dim) == length else x
            for x in batch
        ]

    def _common_length(self, tensors: list[Tensor], keys: list[str]) -> int:
        lengths = {k: t.size(self.sequence_dim) for k, t in zip(keys, tensors) if t.dim() > self.sequence_dim}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"MQSPStrategy: the sequence entries of the batch have different lengths {lengths}; they must match.")
        return next(iter(lengths.values()))

    def _pad_value(self, key: str) -> int:
        return self.pad_token_id if key == "input_ids" else _PAD_VALUES.get(key, 0)

    def _log_padding(self, length: int, padded: int) -> None:
        # rank_zero_warn goes through `warnings`, so each distinct message appears once per process, on rank 0.
        rank_zero_warn(
            f"MQSPStrategy: padding sequences of length {length} to {padded} (a multiple of "
            f"{self.world_size * chunks_per_rank(self.layout)} for {self.world_size} ranks, {self.layout!r} layout) with "
            "masked tokens; pad your batches to that multiple to avoid the extra work."
        )


def shift_left(labels: Tensor, dim: int = 1) -> Tensor:
    """``labels[t+1]`` at ``t`` and ``IGNORE_INDEX`` at the end: causal-LM targets aligned with their logits."""
    return _pad(labels.narrow(dim, 1, labels.size(dim) - 1), dim, 1, IGNORE_INDEX)


def _pad(x: Tensor, dim: int, amount: int, value: float) -> Tensor:
    pad_shape = list(x.shape)
    pad_shape[dim] = amount
    return torch.cat([x, x.new_full(pad_shape, value)], dim=dim)


def _rebuild_mapping(original: Mapping[str, Any], items: dict[str, Any]) -> Any:
    """A mapping of the original's type (e.g. BatchEncoding) holding ``items``."""
    from transformers import BatchEncoding

    if isinstance(original, BatchEncoding):
        return BatchEncoding(items, tensor_type=None)
    return type(original)(items)  # type: ignore[call-arg]


def _is_namedtuple(x: Any) -> bool:
    return isinstance(x, tuple) and hasattr(x, "_fields")


def gather_sequence(x: Tensor, group: ProcessGroup | None, layout: Layout, full_length: int | None, dim: int = 1) -> Tensor:
    """The full-length tensor from every rank's shard ``x`` (not differentiable), trimmed to ``full_length``."""
    if comm.group_size(group) == 1:
        full = x
    else:
        full = unshard_sequence(list(comm.all_gather(x, group, "gathering predictions").wait().unbind(0)), dim, layout)
    return full if full_length is None else full.narrow(dim, 0, full_length)


def gather_outputs(
    outputs: Any, local_length: int, group: ProcessGroup | None, layout: Layout, full_length: int | None, dim: int = 1,
) -> Any:
    """Gather every tensor of ``outputs`` (nested dicts/tuples/ModelOutputs) that has the local sequence length at ``dim``."""
    if isinstance(outputs, Tensor):
        if outputs.dim() > dim and outputs.size(dim) == local_length:
            return gather_sequence(outputs, group, layout, full_length, dim)
        return outputs
    if isinstance(outputs, Mapping):
        gathered = {k: gather_outputs(v, local_length, group, layout, full_length, dim) for k, v in outputs.items()}
        if type(outputs) is dict:
            return gathered
        return type(outputs)(**gathered) if _is_model_output(outputs) else type(outputs)(gathered)  # type: ignore[call-arg]
    if isinstance(outputs, (tuple, list)) and not _is_namedtuple(outputs):
        return type(outputs)(gather_outputs(v, local_length, group, layout, full_length, dim) for v in outputs)
    return outputs


def _is_model_output(x: Any) -> bool:
    from transformers.utils import ModelOutput

    return isinstance(x, ModelOutput)
