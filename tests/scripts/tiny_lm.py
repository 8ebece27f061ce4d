"""Tiny Hugging Face models, data and a LightningModule shared by the Trainer scripts and the tests."""

from __future__ import annotations

from typing import Any

import torch
import torchmetrics
from lightning.pytorch import LightningModule
from torch import Tensor
from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from lightning_mqsp import sequence_parallel_cross_entropy

VOCAB = 97
LENGTH = 30  # not a multiple of 2 * SP: the strategy pads it (and must change nothing)
CAUSAL = {"bert": False, "gpt2": True, "llama": True}


def build_model(kind: str, max_positions: int = 64) -> PreTrainedModel:
    torch.manual_seed(0)
    if kind == "bert":
        config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                            max_position_embeddings=max_positions, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        return BertForMaskedLM(config)
    if kind == "gpt2":
        config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=max_positions,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        return GPT2LMHeadModel(config)
    if kind == "llama":
        config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             intermediate_size=64, max_position_embeddings=max_positions, attention_dropout=0.0)
        return LlamaForCausalLM(config)
    raise ValueError(kind)


def make_samples(kind: str, count: int, seed: int = 1) -> list[dict[str, Tensor]]:
    """Sequences of LENGTH tokens; every other one right-padded (attention_mask 0, label -100)."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(count):
        input_ids = torch.randint(2, VOCAB, (LENGTH,), generator=g)
        attention_mask = torch.ones(LENGTH, dtype=torch.long)
        if i % 2:
            attention_mask[int(torch.randint(LENGTH // 2, LENGTH - 2, (), generator=g)):] = 0
            input_ids[attention_mask == 0] = 0
        if CAUSAL[kind]:
            labels = input_ids.masked_fill(attention_mask == 0, -100)
        else:  # masked LM: predict the original token at ~30% of the real positions
            chosen = (torch.rand(LENGTH, generator=g) < 0.3) & attention_mask.bool()
            labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
            input_ids = input_ids.masked_fill(chosen, 1)
        samples.append({"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels})
    return samples


class TinyLM(LightningModule):
    """Loss from the logits with the sequence-parallel helper; labels come pre-shifted for causal LMs under MQSP."""

    def __init__(self, kind: str, lr: float = 0.5, max_positions: int = 64) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = build_model(kind, max_positions)
        # A token-level torchmetric: each rank updates with its own tokens; compute() syncs over the whole world.
        self.val_token_nll = torchmetrics.MeanMetric()

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          position_ids=batch.get("position_ids")).logits

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = sequence_parallel_cross_entropy(self(batch), batch["labels"])
        self.log("train_loss", loss, sync_dist=True, on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        logits = self(batch)
        self.log("val_loss", sequence_parallel_cross_entropy(logits, batch["labels"]), sync_dist=True)
        valid = batch["labels"] != -100
        self.val_token_nll(torch.nn.functional.cross_entropy(logits[valid], batch["labels"][valid], reduction="none"))
        self.log("val_token_nll", self.val_token_nll)

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> Any:
        return {"logits": self(batch)}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)
