"""Tiny Hugging Face models of every family the fidelity tests cover, and batches for them.

Every config is small (hidden 32, 2 layers) with dropout off, so one forward and backward takes
milliseconds and training mode is deterministic (activation checkpointing needs training mode).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import transformers as hf
from torch import Tensor

VOCAB = 97
LENGTH = 32
SMALL = {"vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}
TOKEN_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}


@dataclass(frozen=True)
class Family:
    name: str
    build: Callable[[], hf.PreTrainedModel]
    causal: bool
    #: The attention feature the family brings beyond full/causal attention.
    feature: str = ""
    #: transformers' "sdpa" cannot run the family (soft-capping): the single-process reference uses "eager".
    reference_attention: str = "sdpa"


def _model(config_class: type, model_class: type, **config: Any) -> Callable[[], hf.PreTrainedModel]:
    def build() -> hf.PreTrainedModel:
        torch.manual_seed(0)
        model = model_class(config_class(**config))
        return model.float()

    return build


FAMILIES = {f.name: f for f in [
    Family("llama", _model(hf.LlamaConfig, hf.LlamaForCausalLM, **SMALL, **TOKEN_IDS, num_key_value_heads=2), True),
    Family("mistral", _model(hf.MistralConfig, hf.MistralForCausalLM, **SMALL, **TOKEN_IDS, num_key_value_heads=2, sliding_window=7),
           True, "sliding window"),
    Family("qwen2", _model(hf.Qwen2Config, hf.Qwen2ForCausalLM, **SMALL, **TOKEN_IDS, num_key_value_heads=2, use_sliding_window=True,
                           sliding_window=9, max_window_layers=1), True, "sliding window (second layer)"),
    Family("qwen3", _model(hf.Qwen3Config, hf.Qwen3ForCausalLM, **SMALL, **TOKEN_IDS, num_key_value_heads=2, head_dim=8), True),
    Family("gemma2", _model(hf.Gemma2Config, hf.Gemma2ForCausalLM, **SMALL, **TOKEN_IDS, num_key_value_heads=2, head_dim=8,
                            sliding_window=6, attn_logit_softcapping=2.0, final_logit_softcapping=None),
           True, "softcap + sliding window", reference_attention="eager"),
    Family("phi3", _model(hf.Phi3Config, hf.Phi3ForCausalLM, **SMALL, **TOKEN_IDS, num_key_value_heads=2), True),
    Family("gpt_neox", _model(hf.GPTNeoXConfig, hf.GPTNeoXForCausalLM, **SMALL, **TOKEN_IDS, attention_dropout=0.0,
                              hidden_dropout=0.0), True, "partial rotary"),
    Family("gpt2", _model(hf.GPT2Config, hf.GPT2LMHeadModel, vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **TOKEN_IDS), True, "learned positions"),
    Family("bert", _model(hf.BertConfig, hf.BertForMaskedLM, **SMALL, max_position_embeddings=64, hidden_dropout_prob=0.0,
                          attention_probs_dropout_prob=0.0, pad_token_id=0), False, "learned positions"),
    Family("roberta", _model(hf.RobertaConfig, hf.RobertaForMaskedLM, **SMALL, max_position_embeddings=80, hidden_dropout_prob=0.0,
                             attention_probs_dropout_prob=0.0, pad_token_id=1), False, "padding-aware positions"),
    Family("modernbert", _model(hf.ModernBertConfig, hf.ModernBertForMaskedLM, **SMALL, local_attention=8,
                                global_attn_every_n_layers=2, pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1,
                                sep_token_id=2, attention_dropout=0.0, mlp_dropout=0.0, embedding_dropout=0.0),
           False, "symmetric local window"),
    Family("distilbert", _model(hf.DistilBertConfig, hf.DistilBertForMaskedLM, vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4,
                                hidden_dim=64, max_position_embeddings=64, dropout=0.0, attention_dropout=0.0, pad_token_id=0),
           False, "learned positions"),
]}


def make_batch(family: Family, packed: bool = False, batch_size: int = 2, seed: int = 1) -> dict[str, Tensor]:
    """A full-sequence batch: padded rows (attention mask) or, ``packed``, documents of several lengths
    concatenated in each row (position_ids that restart, no attention mask). Labels as the model's loss
    takes them: the tokens for causal LMs, ~30% masked tokens for masked LMs."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (batch_size, LENGTH), generator=g)
    batch: dict[str, Tensor] = {"input_ids": input_ids}
    if packed:
        starts = [[0, 5, 13, 26], [0, 17]]  # documents crossing the shard edges of 2 ranks, both layouts
        positions = torch.zeros(batch_size, LENGTH, dtype=torch.long)
        for row, row_starts in enumerate(starts[:batch_size]):
            bounds = [*row_starts, LENGTH]
            for first, stop in itertools.pairwise(bounds):
                positions[row, first:stop] = torch.arange(stop - first)
        batch["position_ids"] = positions
    else:
        mask = torch.ones(batch_size, LENGTH, dtype=torch.long)
        mask[1, LENGTH - 9:] = 0  # right padding in the second row
        input_ids[mask == 0] = 1 if family.name == "roberta" else 0  # the config's pad token
        batch["attention_mask"] = mask
    if family.causal:
        labels = input_ids.clone()
        if "attention_mask" in batch:
            labels[batch["attention_mask"] == 0] = -100
    else:
        chosen = torch.rand(batch_size, LENGTH, generator=g) < 0.3
        if "attention_mask" in batch:
            chosen &= batch["attention_mask"].bool()
        labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
        batch["input_ids"] = input_ids.masked_fill(chosen, 3)
    batch["labels"] = labels
    return batch
