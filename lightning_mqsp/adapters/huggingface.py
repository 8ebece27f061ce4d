"""Hugging Face transformers 5.x models: attention through the ``"mqsp"`` implementation.

BERT, RoBERTa, GPT-2, Llama and most current models dispatch attention through
``transformers.AttentionInterface`` and build their masks through ``AttentionMaskInterface``.
:func:`register` adds ``"mqsp"`` to both:

- the mask function passes the 2-D key-padding mask through unchanged. MQSP keeps keys on
  their rank, so the key mask is local too, and causality is applied by global position inside
  ``mqsp_attention`` (without a mask function the models would get ``attention_mask=None`` and
  silently drop the padding);
- the attention function calls ``mqsp_attention`` with the module's ``is_causal``, scaling and
  dropout (``dropout=`` is already 0 in eval mode).

:func:`prepare` switches a model with ``set_attn_implementation("mqsp")`` (no parameter is
renamed: the state dict is unchanged) and adds a forward pre-hook that passes global
``position_ids`` when the caller did not, since the models would number every shard from 0.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from lightning_mqsp import comm
from lightning_mqsp.adapters import SequenceParallelContext, require_context
from lightning_mqsp.layout import shard_sequence, unshard_sequence

if TYPE_CHECKING:
    from transformers import PreTrainedModel

ATTENTION_NAME = "mqsp"
#: Heads that pool the sequence into one vector; sharded, each rank would pool its own tokens only.
_POOLING_HEADS = ("ForSequenceClassification", "ForMultipleChoice", "ForNextSentencePrediction", "ForPreTraining")


def mqsp_attention_forward(
    module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
    dropout: float = 0.0, scaling: float | None = None, is_causal: bool | None = None, **kwargs: Any,
) -> tuple[Tensor, None]:
    """The ``AttentionInterface`` entry: [B, H, S_local, D] in, ([B, S_local, H, D], None) out."""
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(
            f"MQSP attention in {type(module).__name__} got a {attention_mask.dim()}-D attention mask; it supports "
            "the 2-D key-padding mask [batch, seq] only (pass `attention_mask` as the tokenizer returns it, not a prepared 4-D mask)."
        )
    # Never drop an all-True shard mask here: whether a mask is passed must agree across the group.
    key_padding_mask = None if attention_mask is None else attention_mask.bool()
    causal = is_causal if is_causal is not None else bool(getattr(module, "is_causal", False))
    out = require_context().attention(
        query, key, value, key_padding_mask=key_padding_mask, causal=causal, scale=scaling, dropout_p=dropout
    )
    return out.transpose(1, 2).contiguous(), None


def mqsp_mask(
    batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
    mask_function: Callable | None = None, attention_mask: Tensor | None = None, **kwargs: Any,
) -> Tensor | None:
    """The ``AttentionMaskInterface`` entry: the 2-D key-padding mask, unchanged (see the module docstring)."""
    if q_offset or kv_offset or kv_length != q_length:
        raise ValueError("MQSP attention does not support a key/value cache (generation): use it for training and scoring.")
    return attention_mask


def register() -> None:
    """Add ``"mqsp"`` to transformers' attention and mask interfaces (idempotent)."""
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, mqsp_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, mqsp_mask)


def huggingface_models(model: nn.Module) -> list[PreTrainedModel]:
    """The outermost Hugging Face ``PreTrainedModel`` submodules of ``model`` (itself included)."""
    from transformers import PreTrainedModel

    found: list[PreTrainedModel] = []
    for module in model.modules():
        if isinstance(module, PreTrainedModel) and not any(module in outer.modules() for outer in found):
            found.append(module)
    return found


def absolute_position_limit(model: nn.Module) -> tuple[str, int] | None:
    """(name, size) of the model's learned absolute position embedding table, if it has one."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) and (name.endswith("position_embeddings") or name.split(".")[-1] == "wpe"):
            return name, module.num_embeddings
    return None


def check_supported(model: PreTrainedModel, allow_sequence_pooling: bool) -> None:
    """Raise at setup if ``model`` cannot run sequence-parallel attention exactly."""
    name = type(model).__name__
    if not model._can_set_attn_implementation():
        raise ValueError(
            f"MQSPStrategy cannot swap the attention of {name}: it does not dispatch through transformers' "
            "AttentionInterface. Use a model class that does (BERT, RoBERTa, GPT-2, Llama, ... in transformers>=5), "
            "or do not use sequence parallelism for this model."
        )
    config = model.config
    if getattr(config, "is_encoder_decoder", False) or getattr(config, "add_cross_attention", False):
        raise ValueError(
            f"MQSPStrategy does not support cross-attention ({name} is an encoder-decoder or has add_cross_attention=True): "
            "use an encoder-only or decoder-only model."
        )
    pooler = getattr(getattr(model, model.base_model_prefix, model), "pooler", None)
    pools = name.endswith(_POOLING_HEADS) or pooler is not None
    if pools and not allow_sequence_pooling:
        raise ValueError(
            f"{name} pools over the sequence (a pooler or a sequence-level head), which is not sequence-parallel: each "
            "rank would pool its own shard. Build the model without the pooler (e.g. `BertModel(config, "
            "add_pooling_layer=False)`, `BertForMaskedLM`), or, if you gather the pooled token across the "
            "sequence-parallel group yourself, pass `MQSPStrategy(allow_sequence_pooling=True)`."
        )


class _HuggingFacePatch:
    """Undo information for one model switched by :func:`prepare`."""

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model
        self.original_implementation = model.config._attn_implementation
        model.set_attn_implementation(ATTENTION_NAME)
        self.limit = absolute_position_limit(model)
        # RoBERTa-style embeddings number real tokens from padding_idx + 1 and give pads padding_idx.
        self.padding_idx: int | None = next(
            (index for m in model.modules()
             if type(m).__name__.endswith("Embeddings") and isinstance(index := getattr(m, "padding_idx", None), int)),
            None,
        )
        self.hook = model.register_forward_pre_hook(self._add_global_positions, with_kwargs=True)

    def _add_global_positions(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        context = require_context()
        tokens = kwargs.get("input_ids", args[0] if args else None)
        if tokens is None:
            tokens = kwargs.get("inputs_embeds")
        if tokens is None:
            return args, kwargs
        batch, local_length = tokens.shape[:2]
        global_length = local_length * context.world_size
        if self.limit is not None and global_length > self.limit[1]:
            raise ValueError(
                f"The global sequence length {global_length} ({context.world_size} ranks x {local_length} tokens, after "
                f"padding) exceeds the {self.limit[1]} learned positions of {type(module).__name__} (`{self.limit[0]}`, "
                f"config.max_position_embeddings): truncate the sequences to at most {self.limit[1]} tokens "
                "(e.g. tokenizer max_length) or use a model with more positions."
            )
        if kwargs.get("position_ids") is None:
            if self.padding_idx is not None and tokens.dim() == 2:
                kwargs["position_ids"] = _padding_aware_positions(tokens, self.padding_idx, context)
            else:
                kwargs["position_ids"] = context.positions(local_length, tokens.device).expand(batch, -1)
        return args, kwargs

    def undo(self) -> None:
        self.hook.remove()
        self.model.set_attn_implementation(self.original_implementation)


def _padding_aware_positions(input_ids: Tensor, padding_idx: int, context: SequenceParallelContext) -> Tensor:
    """RoBERTa's ``create_position_ids_from_input_ids`` over the whole sequence: the count of real tokens
    up to each one is a prefix sum across shards, so the (small) non-pad mask is all-gathered first."""
    real = input_ids.ne(padding_idx).int()
    shards = comm.all_gather(real, context.group, "the all-gather of RoBERTa's padding mask").wait()
    full_real = unshard_sequence(list(shards.unbind(0)), 1, context.layout)
    full_positions = (torch.cumsum(full_real, dim=1) * full_real).long() + padding_idx
    return shard_sequence(full_positions, 1, context.rank, context.world_size, context.layout)


def prepare(model: nn.Module, allow_sequence_pooling: bool = False) -> list[Callable[[], None]]:
    """Switch every Hugging Face model inside ``model`` to MQSP attention; return the undo callbacks."""
    register()
    models = huggingface_models(model)
    for hf_model in models:
        check_supported(hf_model, allow_sequence_pooling)
    return [_HuggingFacePatch(hf_model).undo for hf_model in models]
