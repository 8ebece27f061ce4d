"""Splitting a batch of full sequences into this rank's shard, and gathering outputs back.

:class:`BatchSharder` takes a batch as the user's transfer hooks left it (a dict, a Hugging
Face ``BatchEncoding``, or a tuple/list of tensors) and, for the tensors that hold sequences:

1. shifts causal-LM ``labels`` left by one (``labels[t] = labels[t+1]``, last = -100), so that no
   label has to cross a shard edge; the loss is then computed without a shift
   (see :mod:`lightning_mqsp.loss`);
2. finds packed documents: from a ``document_ids`` entry, or from ``position_ids`` that restart
   (as transformers does when the batch has no ``attention_mask``); their ids, which step up at
   every document start, go to the strategy (``last_document_ids``), not to the model;
3. pads a length that does not divide into ``P`` (``2P`` for zigzag) equal chunks: ``input_ids``
   with the pad token, ``attention_mask`` with 0 (created if the batch had none), ``labels``
   with -100, everything else with 0; with documents the padding is a document of its own
   instead of masked;
4. adds the ``position_ids`` the model would compute on the full sequence (``position_ids_fn``,
   e.g. RoBERTa's padding-aware ones; by default 0..L-1, restarting at every document), since
   models would otherwise number every shard from 0;
5. keeps this rank's chunks of every sequence tensor, by the layout.

:func:`all_gather_sequence` is the inverse for outputs: all-gather over the group, reorder, trim;
:func:`gather_sequence` does it for the running strategy's group (per-step metrics over the
whole sequence).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch
from lightning.fabric.utilities.rank_zero import rank_zero_warn
from torch import Tensor

from lightning_mqsp import comm
from lightning_mqsp.comm import ProcessGroup
from lightning_mqsp.layout import Layout, chunks_per_rank, shard_sequence, unshard_sequence

#: Batch keys that hold one entry per token, [batch, sequence, ...].
DEFAULT_SEQUENCE_KEYS: tuple[str, ...] = (
    "input_ids", "attention_mask", "token_type_ids", "labels", "position_ids",
    "special_tokens_mask", "inputs_embeds", "loss_mask", "document_ids",
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
    #: Full-sequence ``input_ids`` [B, L] -> the model's own ``position_ids``; None: 0..L-1.
    position_ids_fn: Callable[[Tensor], Tensor] | None = None
    sequence_dim: int = 1
    #: Full (unpadded) length of the last batch sharded, for trimming gathered outputs.
    last_full_length: int | None = field(default=None, init=False)
    #: This rank's shard [B, l] of the last batch's document ids (None: one document per sequence).
    last_document_ids: Tensor | None = field(default=None, init=False)

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
        documents = self._documents(items)
        if "document_ids" in keys:  # the model does not take them: they reach attention through the strategy
            keys.remove("document_ids")
            del items["document_ids"]
        padded = self.padded_length(length)
        reference = items[keys[0]]
        if padded != length:
            self._log_padding(length, padded)
            if documents is None and "attention_mask" not in items:
                items["attention_mask"] = torch.ones(reference.shape[:2], dtype=torch.long, device=reference.device)
                keys.append("attention_mask")
            for key in keys:
                items[key] = _pad(items[key], self.sequence_dim, padded - length, self._pad_value(key))
            if documents is not None:  # the padding is one more document: nothing real attends it, or is seen by it
                documents = torch.cat([documents, (documents[:, -1:] + 1).expand(-1, padded - length)], dim=1)
        if "position_ids" not in items:
            items["position_ids"] = self._positions(items, documents, padded, reference)
            keys.append("position_ids")
        for key in keys:
            items[key] = shard_sequence(items[key], self.sequence_dim, self.rank, self.world_size, self.layout)
        self.last_full_length = length
        self.last_document_ids = None if documents is None else shard_sequence(documents, 1, self.rank, self.world_size, self.layout)
        if isinstance(batch, dict) and type(batch) is dict:
            return items
        return _rebuild_mapping(batch, items)

    def _documents(self, items: dict[str, Any]) -> Tensor | None:
        """[B, L] ids of packed documents, stepping up by one at each document start; None for one document a row.

        From ``document_ids`` (a new document wherever the id changes) or, when the batch has no
        attention mask, from ``position_ids`` that do not step by one (transformers' rule,
        ``find_packed_sequence_indices``). Reads one bool on the host per batch.
        """
        explicit = items.get("document_ids")
        if explicit is not None and "attention_mask" in items:
            raise ValueError(
                "MQSPStrategy: the batch has both `document_ids` and an `attention_mask`. Packed documents carry no "
                "padding mask: drop the mask (pad a sequence with a document of its own) or the document ids."
            )
        if explicit is not None:
            starts = explicit.diff(dim=self.sequence_dim) != 0
        elif isinstance(items.get("position_ids"), Tensor) and "attention_mask" not in items:
            starts = items["position_ids"].diff(dim=self.sequence_dim) != 1
        else:
            return None
        if not bool(starts.any()):
            return None
        return torch.cat([torch.zeros_like(starts[:, :1], dtype=torch.long), starts.long().cumsum(dim=1)], dim=1)

    def _positions(self, items: dict[str, Any], documents: Tensor | None, length: int, reference: Tensor) -> Tensor:
        """The position ids the model computes itself on the full (padded) sequence."""
        index = torch.arange(length, device=reference.device).expand(reference.size(0), length)
        if documents is not None:  # count from each document's first token
            first = torch.where(torch.cat([torch.ones_like(documents[:, :1], dtype=torch.bool), documents.diff(dim=1) != 0], dim=1),
                                index, torch.zeros_like(index))
            return index - first.cummax(dim=1).values
        if self.position_ids_fn is not None and isinstance(items.get("input_ids"), Tensor):
            return self.position_ids_fn(items["input_ids"])
        return index

    def _shard_positional(self, batch: Sequence[Any]) -> list[Any]:
        # Without keys, the sequence tensors are those of the batch's sequence length; nothing says which
        # one is a mask or the labels, so a length that does not divide cannot be padded, nor labels shifted.
        if self.shift_labels:
            raise ValueError(
                "MQSPStrategy must shift the labels of a causal LM before sharding (no target may cross a shard edge), "
                "but a tuple batch does not say which tensor holds them: return a dict batch with `input_ids` and "
                "`labels`, or, if your labels are already shifted, pass MQSPStrategy(shift_labels=False)."
            )
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
        self.last_document_ids = None
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


def all_gather_sequence(
    x: Tensor, group: ProcessGroup | None, layout: Layout, full_length: int | None, dim: int = 1, first_rank_only: bool = False,
) -> Tensor | None:
    """The full-length tensor from every rank's shard ``x`` (not differentiable), trimmed to ``full_length``: on every
    rank, or with ``first_rank_only`` on the group's first rank alone (``None`` on the others, which keep nothing)."""
    if comm.group_size(group) == 1:
        full = x
    elif first_rank_only:
        shards = comm.gather_to_first_rank(x.detach(), group, "gathering a sequence to the group's first rank")
        if shards is None:
            return None
        full = unshard_sequence(list(shards.unbind(0)), dim, layout)
    else:
        full = unshard_sequence(list(comm.all_gather(x.detach(), group, "gathering a sequence").wait().unbind(0)), dim, layout)
    return full if full_length is None else full.narrow(dim, 0, full_length)


def gather_sequence(x: Tensor, dim: int = 1) -> Tensor:
    """The full sequence of this rank's shard ``x`` ([B, l, ...] along ``dim``), on every rank of the running
    strategy's sequence-parallel group, in order and without the strategy's padding (not differentiable).

    For per-step metrics over the whole sequence: ``metric(gather_sequence(preds), gather_sequence(labels))``
    gives every rank of the group the value one process would compute. Outside a sequence-parallel
    run it returns ``x``.
    """
    from lightning_mqsp.adapters import active_context  # the adapters import this module

    context = active_context()
    if context is None or context.world_size == 1:
        return x
    full = all_gather_sequence(x, context.group, context.layout, context.full_length, dim)
    assert full is not None
    return full


#: Where ``predict_step`` puts its outputs' sequence tensors (the strategies' ``predict_outputs``).
PredictOutputs = Literal["shard", "first_rank", "all"]
PREDICT_OUTPUTS: tuple[str, ...] = get_args(PredictOutputs)


def gather_outputs(
    outputs: Any, local_length: int, group: ProcessGroup | None, layout: Layout, full_length: int | None, dim: int = 1,
    first_rank_only: bool = False,
) -> Any:
    """Gather every tensor of ``outputs`` (nested dicts/tuples/ModelOutputs) that has the local sequence length at
    ``dim``; with ``first_rank_only``, to the group's first rank, and ``None`` is returned on the others."""

    def gather(value: Any) -> Any:
        if isinstance(value, Tensor):
            if value.dim() > dim and value.size(dim) == local_length:
                return all_gather_sequence(value, group, layout, full_length, dim, first_rank_only)
            return value
        if isinstance(value, Mapping):
            gathered = {k: gather(v) for k, v in value.items()}
            if type(value) is dict:
                return gathered
            return type(value)(**gathered) if _is_model_output(value) else type(value)(gathered)  # type: ignore[call-arg]
        if isinstance(value, (tuple, list)) and not _is_namedtuple(value):
            return type(value)(gather(v) for v in value)
        return value

    gathered = gather(outputs)  # every rank walks the outputs: the gathers are collective
    return None if first_rank_only and comm.group_size(group) > 1 and comm.group_rank(group) != 0 else gathered


def _is_model_output(x: Any) -> bool:
    from transformers.utils import ModelOutput

    return isinstance(x, ModelOutput)
