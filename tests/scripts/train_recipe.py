"""Trainer runs of the long-context recipe on a tiny Llama, and the same training in one process.

    python tests/scripts/train_recipe.py OUT_DIR [--precision 32-true bf16-mixed] [--packed] [--checkpointing]

SP=2 on 2 processes: packed documents (position_ids that restart, no attention mask), activation
checkpointing, the model's own loss (``model(**batch).loss``) and a per-step metric over the whole
sequence (a torchmetrics mean of the probability given to each target token, fed with
``lightning_mqsp.gather_sequence``). Each precision is trained in turn in the same processes (launched
once); rank 0 writes OUT_DIR/<precision>/result.pt with the losses, metrics and first gradients of the
run and of the single-process reference.
"""

from __future__ import annotations

import argparse
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torchmetrics
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent))
from hf_families import FAMILIES, make_batch
from single_process_training import dp_batches

from lightning_mqsp import MQSPStrategy, gather_sequence
from lightning_mqsp.adapters.huggingface import enable_activation_checkpointing

SAMPLES, BATCH_SIZE, STEPS = 4, 2, 2


def samples(packed: bool) -> list[dict[str, Tensor]]:
    rows = []
    for seed in range(SAMPLES // 2):
        batch = make_batch(FAMILIES["llama"], packed=packed, seed=seed + 1)
        rows += [{k: v[i] for k, v in batch.items()} for i in range(2)]
    return rows


def target_probabilities(logits: Tensor, targets: Tensor) -> Tensor:
    """The probability the model gives each valid target token (targets already aligned with the logits)."""
    valid = targets != -100
    return logits.float().softmax(dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)[valid]


class RecipeLM(LightningModule):
    def __init__(self, checkpointing: bool) -> None:
        super().__init__()
        self.model = FAMILIES["llama"].build()
        if checkpointing:
            enable_activation_checkpointing(self.model)
        self.target_probability = torchmetrics.MeanMetric()
        self.losses: list[float] = []
        self.metrics: list[float] = []

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        output = self.model(**batch)  # labels passed to the model: its loss, over the whole sequence
        # Labels were shifted by the strategy: they align with the logits; gathered, both are the full sequence.
        value = self.target_probability(target_probabilities(gather_sequence(output.logits), gather_sequence(batch["labels"])))
        self.log("target_probability", value, on_step=True)
        self.metrics.append(value.item())
        self.losses.append(output.loss.item())
        return output.loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.5)


class FirstGradients(Callback):
    def __init__(self) -> None:
        self.gradients: dict[str, Tensor] | None = None

    def on_after_backward(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.gradients is None:
            self.gradients = {n: p.grad.detach().float().clone() for n, p in pl_module.named_parameters()}


def single_process(packed: bool, checkpointing: bool, bf16: bool) -> dict[str, Any]:
    module = RecipeLM(checkpointing)
    model = module.model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    losses, metrics, gradients = [], [], None
    for step in dp_batches(samples(packed), 1, BATCH_SIZE)[:STEPS]:
        batch = step[0]
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext():
            output = model(**batch, use_cache=False)  # without a cache transformers separates packed documents
        output.loss.backward()
        if gradients is None:
            gradients = {f"model.{n}": p.grad.detach().float().clone() for n, p in model.named_parameters()}
        optimizer.step()
        losses.append(output.loss.item())
        metrics.append(target_probabilities(output.logits[:, :-1], batch["labels"][:, 1:]).mean().item())
    return {"losses": losses, "metrics": metrics, "gradients": gradients}


def train(precision: str, out: Path, args: argparse.Namespace) -> None:
    gradients = FirstGradients()
    trainer = Trainer(
        strategy=MQSPStrategy(sequence_parallel_size=2), accelerator="cpu", devices=2, max_steps=STEPS, precision=precision,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[gradients],
    )
    module = RecipeLM(args.checkpointing)
    trainer.fit(module, DataLoader(samples(args.packed), batch_size=BATCH_SIZE))
    if trainer.global_rank == 0:
        bf16 = precision == "bf16-mixed"
        result = {
            "mqsp": {"losses": module.losses, "metrics": module.metrics, "gradients": gradients.gradients},
            "single": single_process(args.packed, args.checkpointing, bf16),
        }
        if bf16:
            result["single_fp32"] = single_process(args.packed, args.checkpointing, bf16=False)
        out.mkdir(parents=True, exist_ok=True)
        torch.save(result, out / "result.pt")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--precision", nargs="+", default=["32-true"])
    parser.add_argument("--packed", action="store_true")
    parser.add_argument("--checkpointing", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for precision in args.precision:
        train(precision, args.out / precision, args)


if __name__ == "__main__":
    main()
