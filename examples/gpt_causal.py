"""A causal language model (Llama-style or GPT-2) on long sequences, split over ranks with MQSP
in the zigzag layout, which gives every rank the same share of the causal attention work.

    python examples/gpt_causal.py fit --config examples/configs/gpt_causal.yaml
    python examples/gpt_causal.py fit --config examples/configs/gpt_causal.yaml --model.architecture=gpt2

Same data as the BERT example (the standard library's documentation, tokenized locally).
"""

from __future__ import annotations

import sys
from pathlib import Path

from torch import Tensor
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedModel

sys.path.insert(0, str(Path(__file__).parent))
from bert_mlm import LanguageModel, main

from lightning_mqsp import causal_lm_cross_entropy


def build_causal_lm(architecture: str, vocab_size: int, hidden_size: int, num_layers: int, num_heads: int,
                    num_kv_heads: int, max_positions: int) -> PreTrainedModel:
    if architecture == "llama":
        return LlamaForCausalLM(LlamaConfig(
            vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
            num_key_value_heads=num_kv_heads, intermediate_size=4 * hidden_size, max_position_embeddings=max_positions,
        ))
    if architecture == "gpt2":
        return GPT2LMHeadModel(GPT2Config(
            vocab_size=vocab_size, n_embd=hidden_size, n_layer=num_layers, n_head=num_heads, n_positions=max_positions,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        ))
    raise ValueError(f"architecture must be 'llama' or 'gpt2', got {architecture!r}.")


class CausalLM(LanguageModel):
    """Next-token prediction with the exact full-sequence loss.

    Under :class:`~lightning_mqsp.MQSPStrategy` the labels arrive already shifted (the strategy
    shifts them before sharding, so no target crosses a shard edge); ``causal_lm_cross_entropy``
    shifts them only where no strategy did, so the module is right on one process too.
    """

    def __init__(
        self, architecture: str = "llama", vocab_size: int = 8192, hidden_size: int = 128, num_layers: int = 2,
        num_heads: int = 4, num_kv_heads: int = 2, max_positions: int = 4096, lr: float = 1e-3, weight_decay: float = 0.01,
        warmup_steps: int = 20,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = build_causal_lm(architecture, vocab_size, hidden_size, num_layers, num_heads, num_kv_heads, max_positions)

    def loss(self, batch: dict[str, Tensor]) -> Tensor:
        logits = self.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch.get("position_ids")
        ).logits
        return causal_lm_cross_entropy(logits, batch["labels"])


if __name__ == "__main__":
    main(CausalLM)
