"""Trainer runs for the strategy tests; rank 0 writes what the tests compare to references.

    python tests/scripts/train_mqsp.py OUT_DIR --model bert [gpt2 llama] --devices 4 --sp 2 --epochs 2 [--resume CKPT]
                                       [--strategy mqsp [ddp]] [--validate] [--predict]

Each strategy trains each model in turn, in the same processes (launched once: each process's imports
take several seconds), into OUT_DIR/<strategy>/<model>/: result.pt (losses per step, every rank's; the logged
sync_dist loss; the averaged gradients after the first backward; the final parameters; validation
metrics; predictions) and checkpoints/. After each run rank 0 writes the line ``FINISHED <model>``
to stderr, so a reader can tell each run's messages apart.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).parent))
from tiny_lm import TinyLM, make_samples

import lightning_mqsp  # noqa: F401  (registers "mqsp")
from lightning_mqsp import MQSPStrategy
from lightning_mqsp.sharding import PREDICT_OUTPUTS

BATCH_SIZE = 2
FINISHED = "FINISHED"
TRAIN_SAMPLES = 8
VAL_SAMPLES = 4


class Recorder(Callback):
    def __init__(self) -> None:
        self.losses: list[list[float]] = []
        self.logged: list[float] = []
        self.first_grads: dict[str, torch.Tensor] | None = None
        self.samplers: list[list[int]] = []  # (sampler rank, replicas) of every global rank

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        sampler = trainer.train_dataloader.sampler
        self.samplers = pl_module.all_gather(torch.tensor([sampler.rank, sampler.num_replicas])).tolist()

    def on_after_backward(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.first_grads is None:  # DDP has averaged them over the world by now
            self.first_grads = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters()}

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.losses.append(pl_module.all_gather(outputs["loss"].detach()).reshape(-1).tolist())
        self.logged.append(float(trainer.callback_metrics["train_loss"]))


def train(kind: str, strategy_name: str, out: Path, args: argparse.Namespace) -> None:
    strategy: Any = MQSPStrategy(sequence_parallel_size=args.sp) if strategy_name == "mqsp" else strategy_name
    recorder = Recorder()
    trainer = Trainer(
        strategy=strategy, accelerator="cpu", devices=args.devices, max_epochs=args.epochs, logger=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        callbacks=[recorder, ModelCheckpoint(dirpath=out / "checkpoints", save_top_k=-1, every_n_epochs=1)],
    )
    module = TinyLM(kind)
    train = DataLoader(make_samples(kind, TRAIN_SAMPLES), batch_size=BATCH_SIZE)
    trainer.fit(module, train, ckpt_path=args.resume)
    result: dict[str, Any] = {
        "losses": recorder.losses, "logged": recorder.logged, "first_grads": recorder.first_grads, "samplers": recorder.samplers,
        "params": {n: p.detach().clone() for n, p in module.named_parameters()},
    }
    if args.validate:
        val = DataLoader(make_samples(kind, VAL_SAMPLES, seed=2), batch_size=BATCH_SIZE)
        result["validate"] = trainer.validate(module, val, verbose=False)[0]
    if args.predict:  # each of the strategy's predict_outputs, and what every rank holds of the logits then
        result["predictions"], result["predictions_held"] = {}, {}
        for mode in PREDICT_OUTPUTS:
            trainer.strategy.predict_outputs = mode
            predictions = trainer.predict(module, DataLoader(make_samples(kind, VAL_SAMPLES, seed=2), batch_size=BATCH_SIZE))
            held: list[Any] = [None] * trainer.world_size
            dist.all_gather_object(held, [None if p is None else tuple(p["logits"].shape) for p in predictions])
            result["predictions"][mode], result["predictions_held"][mode] = predictions, held
    if trainer.global_rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        torch.save(result, out / "result.pt")
        print(f"{FINISHED} {kind}", file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--model", nargs="+", default=["bert"])
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--sp", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--strategy", nargs="+", default=["mqsp"])
    parser.add_argument("--resume", default=None)
    parser.add_argument("--validate", action="store_true")
    parser.add_argument("--predict", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for strategy in args.strategy:
        for kind in args.model:
            train(kind, strategy, args.out / strategy / kind, args)


if __name__ == "__main__":
    main()
