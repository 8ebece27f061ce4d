"""BERT masked-language-model pretraining on long sequences, split over ranks with MQSP.

    python examples/bert_mlm.py fit --config examples/configs/bert_mlm.yaml
    python examples/bert_mlm.py fit --config examples/configs/bert_mlm.yaml --trainer.devices=1 --trainer.strategy=auto

The default data is the Python standard library's own documentation (no download): a WordPiece
tokenizer is trained on it locally and cached. ``--data.source`` takes a text file, a folder of
.txt files or a Hugging Face dataset name; ``--data.tokenizer`` a hub name or a local path;
``--model.pretrained`` a hub name or path of a BERT checkpoint to start from.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LightningCLI
from torch import Tensor
from transformers import BertConfig, BertForMaskedLM

sys.path.insert(0, str(Path(__file__).parent))
from text_data import TextDataModule

import lightning_mqsp  # noqa: F401  (registers the "mqsp" strategy name)
from lightning_mqsp import sequence_parallel_cross_entropy


class LanguageModel(LightningModule):
    """What the examples' language models share: the logged full-sequence ``loss`` (each defines it), AdamW and
    a linear warmup, from the hyperparameters ``lr``, ``weight_decay`` and ``warmup_steps``."""

    def loss(self, batch: dict[str, Tensor]) -> Tensor:
        raise NotImplementedError

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self.loss(batch)
        self.log("train_loss", loss, prog_bar=True, sync_dist=True)
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self.log("val_loss", self.loss(batch), prog_bar=True, sync_dist=True)

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = torch.optim.AdamW(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / max(1, hp.warmup_steps)))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": warmup, "interval": "step"}}


class BertMLM(LanguageModel):
    """A BERT encoder with a masked-LM head; the loss is exact over the whole sequence under MQSP.

    Args:
        vocab_size: set from the data module's tokenizer by the CLI.
        max_position_embeddings: at least the full sequence length (BERT's positions are absolute).
        dropout: hidden and attention-probability dropout (0 makes runs at different SP sizes
            comparable step by step; attention dropout under MQSP uses its own counter-based mask).
        pretrained: a hub name or path to start from instead of a fresh config.
        attn_implementation: Hugging Face attention kernel when not under MQSP (``"sdpa"`` or
            ``"eager"``); MQSPStrategy switches the model to ``"mqsp"`` itself.
    """

    def __init__(
        self, vocab_size: int = 8192, hidden_size: int = 128, num_layers: int = 2, num_heads: int = 4,
        intermediate_size: int = 512, max_position_embeddings: int = 4096, dropout: float = 0.0,
        lr: float = 1e-3, weight_decay: float = 0.01, warmup_steps: int = 20, pretrained: str | None = None,
        attn_implementation: str = "sdpa",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if pretrained is not None:
            self.model = BertForMaskedLM.from_pretrained(pretrained)
        else:
            self.model = BertForMaskedLM(BertConfig(
                vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
                intermediate_size=intermediate_size, max_position_embeddings=max_position_embeddings,
                hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
            ))
        self.model.set_attn_implementation(attn_implementation)

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        return self.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch.get("position_ids")
        ).logits

    def loss(self, batch: dict[str, Tensor]) -> Tensor:
        return sequence_parallel_cross_entropy(self(batch), batch["labels"])


class LanguageModelCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.vocab_size", "model.vocab_size", apply_on="instantiate")


def main(model_class: type[LightningModule] = BertMLM, args: list[str] | None = None) -> LanguageModelCLI:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    return LanguageModelCLI(model_class, TextDataModule, save_config_kwargs={"overwrite": True}, args=args)


if __name__ == "__main__":
    main()
