"""Hugging Face transformers 5.x models: attention through the ``"mqsp"`` implementation.

BERT, RoBERTa, GPT-2, Llama, Mistral, Qwen, Gemma2, Phi3, GPT-NeoX, ModernBERT, DistilBERT and
most current models dispatch attention through ``transformers.AttentionInterface`` and build
their masks through ``AttentionMaskInterface``. :func:`register` adds ``"mqsp"`` to both:

- the mask function passes the 2-D key-padding mask through unchanged. MQSP keeps keys on
  their rank, so the key mask is local too, and causality, windows and documents are applied by
  global position inside ``mqsp_attention`` (without a mask function the models would get
  ``attention_mask=None`` and silently drop the padding). Masks it cannot express (custom mask
  overlays, a key/value cache) are refused;
- the attention function turns every keyword transformers passes into ``mqsp_attention``'s
  arguments, or refuses it by name (:data:`ATTENTION_KEYWORDS`): nothing is silently dropped.

:func:`prepare` switches a model with ``set_attn_implementation("mqsp")`` (no parameter is
renamed: the state dict is unchanged) and hooks its forward: global ``position_ids`` when the
caller passed none (the models would number every shard from 0), ``use_cache=False`` (a cache
is for generation, and transformers itself separates packed documents only without one), and
the exact full-sequence loss when the caller passes ``labels`` (the model's own loss would be
the mean over this rank's tokens).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import partial
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
#: Heads whose ``labels`` loss is token-level cross entropy: with labels shifted (causal LMs) or as they are.
_CAUSAL_LM_HEADS = ("ForCausalLM", "LMHeadModel")
_TOKEN_HEADS = ("ForMaskedLM", "ForTokenClassification")

#: What each keyword transformers passes to an attention function means here. ``None``: used or
#: harmless; a string: a feature MQSP does not support, refused (with that reason) when the
#: keyword carries a value. A keyword not listed is refused when it carries a value, too.
ATTENTION_KEYWORDS: dict[str, str | None] = {
    "sliding_window": None,  # a window of w keys: (w - 1) on each side it is open to
    "softcap": None,
    "is_causal": None,
    "position_ids": None,  # already in the rotary embeddings; packed documents come from the batch
    "use_cache": None,
    "cache_position": None,
    "output_attentions": None,  # attention weights are never materialised (as with "sdpa")
    "deterministic": None,  # MQSP's kernels are deterministic
    # transformers' flash-attention description of packed documents: MQSP takes them from position_ids, as "sdpa" does.
    "cu_seq_lens_q": None, "cu_seq_lens_k": None, "max_length_q": None, "max_length_k": None,
    "position_bias": "a relative position bias (T5-style) added to the scores",
    "s_aux": "attention sinks (learned per-head logits added to every softmax)",
    "encoder_hidden_states": "cross-attention to encoder states",
    "head_mask": "a per-head mask of the attention probabilities",
}


def _attention_arguments(module: nn.Module, attention_mask: Tensor | None, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``mqsp_attention`` keywords for the attention call of ``module``; a clear error for what it cannot do."""
    model = type(module).__name__
    for name, value in kwargs.items():
        if value is None or value is False:
            continue
        reason = ATTENTION_KEYWORDS.get(name, f"the attention keyword `{name}`, which lightning-mqsp does not know")
        if reason is not None:
            raise ValueError(
                f"MQSP attention cannot run {model}: it uses {reason} (`{name}=`), which sequence-parallel attention "
                "does not implement. Use a model without it, or train this model without sequence parallelism."
            )
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(
            f"MQSP attention in {model} got a {attention_mask.dim()}-D attention mask; it supports the 2-D key-padding "
            "mask [batch, seq] only (pass `attention_mask` as the tokenizer returns it, not a prepared 4-D mask)."
        )
    is_causal = kwargs.get("is_causal")
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", False))
    window = None
    sliding_window = kwargs.get("sliding_window")
    if sliding_window is not None:  # transformers' flash convention: w - 1 keys on each open side
        window = (sliding_window - 1, None if causal else sliding_window - 1)
    # transformers separates packed documents in causal masks built without a padding mask, never in bidirectional ones.
    context = require_context()
    document_ids = context.document_ids if causal and attention_mask is None else None
    return {
        # Never drop an all-True shard mask here: whether a mask is passed must agree across the group.
        "key_padding_mask": None if attention_mask is None else attention_mask.bool(),
        "causal": causal, "window": window, "document_ids": document_ids, "softcap": kwargs.get("softcap"),
    }


def mqsp_attention_forward(
    module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
    dropout: float = 0.0, scaling: float | None = None, **kwargs: Any,
) -> tuple[Tensor, None]:
    """The ``AttentionInterface`` entry: [B, H, S_local, D] in, ([B, S_local, H, D], None) out."""
    arguments = _attention_arguments(module, attention_mask, kwargs)
    out = require_context().attention(query, key, value, scale=scaling, dropout_p=dropout, **arguments)
    return out.transpose(1, 2).contiguous(), None


def mqsp_mask(
    batch_size: int, q_length: int | None = None, kv_length: int = 0, q_offset: int = 0, kv_offset: int = 0,
    mask_function: Callable | None = None, attention_mask: Tensor | None = None, use_vmap: bool = False,
    cache_position: Tensor | None = None, **kwargs: Any,
) -> Tensor | None:
    """The ``AttentionMaskInterface`` entry: the 2-D key-padding mask, unchanged (see the module docstring).

    transformers 5.0 passes the query positions as ``cache_position`` where later releases pass ``q_length`` and
    ``q_offset``."""
    if q_length is None and cache_position is not None:
        q_length, q_offset = cache_position.numel(), int(cache_position[0]) if cache_position.numel() else 0
    if q_offset or kv_offset or kv_length != q_length:
        raise ValueError("MQSP attention does not support a key/value cache (generation): use it for training and scoring.")
    if use_vmap:  # transformers' sign of or_mask_function / and_mask_function overlays (e.g. bidirectional image tokens)
        raise ValueError(
            "MQSP attention cannot express this model's custom mask overlay (an or_mask_function / and_mask_function, "
            "e.g. bidirectional attention over image tokens): train it on text only, or without sequence parallelism."
        )
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


def enable_activation_checkpointing(model: PreTrainedModel, use_reentrant: bool = False) -> None:
    """Checkpoint every decoder layer of ``model`` (the strategy's choice: non-reentrant).

    transformers 5.25 renamed ``gradient_checkpointing_enable`` to ``activation_checkpointing_enable`` and
    deprecated the old name (removed in v6); earlier 5.x releases have only the old one.
    """
    kwargs = {"use_reentrant": use_reentrant}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def absolute_position_limit(model: nn.Module) -> tuple[str, int] | None:
    """(name, size) of the model's learned absolute position embedding table, if it has one."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) and (name.endswith("position_embeddings") or name.split(".")[-1] == "wpe"):
            return name, module.num_embeddings
    return None


def padding_index(model: nn.Module) -> int | None:
    """The ``padding_idx`` of RoBERTa-style embeddings, which number real tokens from it + 1 (None elsewhere)."""
    for module in model.modules():
        index = getattr(module, "padding_idx", None)
        if type(module).__name__.endswith("Embeddings") and isinstance(index, int):
            return index
    return None


def padding_aware_positions(input_ids: Tensor, padding_idx: int) -> Tensor:
    """RoBERTa's ``create_position_ids_from_input_ids`` over full sequences [B, L]: real tokens count up from
    ``padding_idx + 1``, padding gets ``padding_idx``."""
    real = input_ids.ne(padding_idx).long()
    return torch.cumsum(real, dim=1) * real + padding_idx


def position_ids_fn(model: nn.Module) -> Callable[[Tensor], Tensor] | None:
    """The function giving the model's own position ids from full-sequence input ids, when they are not 0..L-1."""
    index = padding_index(model)
    return None if index is None else partial(padding_aware_positions, padding_idx=index)


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
    if getattr(config, "relative_attention_num_buckets", None) is not None:
        raise ValueError(
            f"MQSPStrategy does not support {name}: its attention adds a relative position bias (T5-style) to the scores, "
            "which sequence-parallel attention does not implement. Use a model with absolute or rotary positions."
        )
    if getattr(config, "attention_chunk_size", None) is not None:
        raise ValueError(f"MQSPStrategy does not support {name}'s chunked attention (config.attention_chunk_size).")
    if "position_ids" not in inspect.signature(model.forward).parameters:
        raise ValueError(
            f"MQSPStrategy cannot give {name} the global positions of its tokens: its forward takes no `position_ids`, so "
            "every rank would number its shard from 0."
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
    """One model switched by :func:`prepare`: its forward hooks, and how to undo them."""

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model
        self.original_implementation = model.config._attn_implementation
        model.set_attn_implementation(ATTENTION_NAME)
        self.limit = absolute_position_limit(model)
        self.padding_idx = padding_index(model)
        self.takes_use_cache = "use_cache" in inspect.signature(model.forward).parameters
        self.pending_labels: list[Tensor] = []
        self.hooks = [
            model.register_forward_pre_hook(self._before_forward, with_kwargs=True),
            model.register_forward_hook(self._after_forward),
        ]

    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        context = require_context()
        if kwargs.get("past_key_values") is not None:
            raise ValueError("MQSP attention does not support a key/value cache (generation): use it for training and scoring.")
        if self.takes_use_cache:
            kwargs["use_cache"] = False
        if kwargs.get("labels") is not None:
            self.pending_labels.append(self._labels_for_loss(kwargs.pop("labels"), kwargs))
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
                kwargs["position_ids"] = _gathered_padding_aware_positions(tokens, self.padding_idx, context)
            else:
                kwargs["position_ids"] = context.positions(local_length, tokens.device).expand(batch, -1)
        return args, kwargs

    def _labels_for_loss(self, labels: Tensor, kwargs: dict) -> Tensor:
        """The labels the full-sequence loss reads (refusing what the strategy cannot make exact)."""
        name = type(self.model).__name__
        if kwargs.get("num_items_in_batch") is not None:
            raise ValueError(
                f"MQSP computes {name}'s `labels` loss over the whole sequence itself; `num_items_in_batch` (a count over "
                "the full batch) cannot be checked against this rank's shard: leave it out, or compute the loss with "
                "lightning_mqsp.sequence_parallel_loss."
            )
        if name.endswith(_CAUSAL_LM_HEADS) and not require_context().labels_shifted:
            raise ValueError(
                f"{name} shifts its `labels` itself, which a shard cannot do (the target of a shard's last token lies on "
                "another rank): let the strategy shift them (MQSPStrategy(shift_labels=True), the default for causal "
                "LMs), or compute the loss with lightning_mqsp.causal_lm_cross_entropy."
            )
        if not name.endswith(_CAUSAL_LM_HEADS + _TOKEN_HEADS):
            raise ValueError(
                f"MQSP cannot make {name}'s `labels` loss a full-sequence loss (it knows token-level cross entropy: "
                f"*ForCausalLM, *ForMaskedLM, *ForTokenClassification): do not pass `labels` to the model; compute the "
                "loss from its outputs with lightning_mqsp.sequence_parallel_loss."
            )
        return labels

    def _after_forward(self, module: nn.Module, args: tuple, output: Any) -> Any:
        if not self.pending_labels:
            return output
        from lightning_mqsp.loss import sequence_parallel_cross_entropy  # the loss module imports the adapters

        # Labels arrive already shifted for causal LMs (the strategy shifted them before sharding).
        loss = sequence_parallel_cross_entropy(output.logits, self.pending_labels.pop().to(output.logits.device))
        return type(output)(loss=loss, **{k: v for k, v in output.items() if k != "loss"})

    def undo(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.model.set_attn_implementation(self.original_implementation)


def _gathered_padding_aware_positions(input_ids: Tensor, padding_idx: int, context: SequenceParallelContext) -> Tensor:
    """:func:`padding_aware_positions` for this rank's shard: the count of real tokens up to each one is a
    prefix sum across shards, so the (small) token ids are all-gathered first."""
    shards = comm.all_gather(input_ids, context.group, "the all-gather of input ids for RoBERTa's positions").wait()
    full_positions = padding_aware_positions(unshard_sequence(list(shards.unbind(0)), 1, context.layout), padding_idx)
    return shard_sequence(full_positions, 1, context.rank, context.world_size, context.layout)


def prepare(model: nn.Module, allow_sequence_pooling: bool = False) -> list[Callable[[], None]]:
    """Switch every Hugging Face model inside ``model`` to MQSP attention; return the undo callbacks."""
    register()
    models = huggingface_models(model)
    for hf_model in models:
        check_supported(hf_model, allow_sequence_pooling)
    return [_HuggingFacePatch(hf_model).undo for hf_model in models]
