"""A task only cross-shard attention can solve: recall a value stored early in a long sequence.

Each sequence of L tokens is a blank filler token with a key-value *pair token* (one token
encodes a key and its value) somewhere in its first quarter, and ends with a *query token*
naming the key. The model must output the key's value at the last position. (A haystack of
varied filler tokens, or several keys per sequence, makes the task far slower to learn for a
small model at this length: raise NUM_FILLER, NUM_KEYS and PAIRS_PER_SEQUENCE to try it.)

With the sequence split over P ranks (contiguous layout), the query sits on the last rank and
the pair on the first: with MQSP the query attends to the whole sequence and the task is
learnable; with attention restricted to the local shard (what sequence sharding without MQSP
gives) the query cannot see the pair, and the model stays at chance (1 / number of values).

    python examples/long_range_retrieval.py --length 2048 --world-size 4 --steps 200

Runs both settings, prints their accuracy side by side, and writes JSON. The model is plain
PyTorch calling ``F.scaled_dot_product_attention``; the strategy routes that call through MQSP
without any change to the model.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

import lightning_mqsp  # noqa: F401  (registers the "mqsp" strategy name)
from lightning_mqsp import MQSPStrategy, sequence_parallel_cross_entropy, sequence_parallel_loss

NUM_KEYS, NUM_VALUES = 1, 16
NUM_FILLER = 1
PAIRS_PER_SEQUENCE = 1
# Token ids: [filler | pair tokens (key * NUM_VALUES + value) | query tokens (one per key)]
PAIR_BASE = NUM_FILLER
QUERY_BASE = PAIR_BASE + NUM_KEYS * NUM_VALUES
VOCAB = QUERY_BASE + NUM_KEYS
IGNORE = -100


class RetrievalData(Dataset):
    """Sample ``index`` is a pure function of (seed, index), so every rank builds the same one."""

    def __init__(self, length: int, size: int, seed: int) -> None:
        self.length, self.size, self.seed = length, size, seed

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        tokens = torch.randint(0, NUM_FILLER, (self.length,), generator=g)
        keys = torch.randperm(NUM_KEYS, generator=g)[:PAIRS_PER_SEQUENCE]
        values = torch.randint(0, NUM_VALUES, (PAIRS_PER_SEQUENCE,), generator=g)
        where = torch.randperm(self.length // 4, generator=g)[:PAIRS_PER_SEQUENCE]
        tokens[where] = PAIR_BASE + keys * NUM_VALUES + values
        asked = int(torch.randint(0, PAIRS_PER_SEQUENCE, (), generator=g))
        tokens[-1] = QUERY_BASE + keys[asked]
        labels = torch.full((self.length,), IGNORE)
        labels[-1] = values[asked]
        return {"input_ids": tokens, "labels": labels}


class SelfAttention(nn.Module):
    """Multi-head self-attention on ``F.scaled_dot_product_attention`` (routed through MQSP by the strategy)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        batch, length, dim = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v)
        return self.out(attended.transpose(1, 2).reshape(batch, length, dim))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.attention = nn.LayerNorm(dim), SelfAttention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim), nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class RetrievalModel(pl.LightningModule):
    """Embeddings, pre-LayerNorm blocks and a value classifier at every position (no positional
    encoding: the task is about content, and this keeps the model the same at any length)."""

    def __init__(self, dim: int = 64, heads: int = 4, layers: int = 2, lr: float = 3e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.embed = nn.Embedding(VOCAB, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, NUM_VALUES)

    def forward(self, input_ids: Tensor) -> Tensor:
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))

    def _step(self, batch: dict[str, Tensor], stage: str) -> Tensor:
        logits, labels = self(batch["input_ids"]), batch["labels"]
        loss = sequence_parallel_cross_entropy(logits, labels, ignore_index=IGNORE)
        valid = labels != IGNORE
        # Accuracy over the answered positions of the whole sequence (they may sit on any rank).
        accuracy = sequence_parallel_loss((logits.argmax(-1) == labels).float(), valid)
        self.log(f"{stage}_loss", loss, sync_dist=True, prog_bar=True)
        self.log(f"{stage}_accuracy", accuracy, sync_dist=True, prog_bar=True)
        return loss

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)


class LastShard(Dataset):
    """The last 1/P of each sequence: what the query's rank sees when attention stays local."""

    def __init__(self, data: Dataset, world_size: int) -> None:
        self.data, self.world_size = data, world_size

    def __len__(self) -> int:
        return len(self.data)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        sample = self.data[index]
        keep = sample["input_ids"].numel() // self.world_size
        return {name: t[-keep:] for name, t in sample.items()}


class TrainLossHistory(pl.Callback):
    """The training loss of every step (the same on every rank: it is the full-sequence loss)."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        self.losses.append(float(trainer.callback_metrics["train_loss"]))


def train(args: argparse.Namespace) -> dict:
    pl.seed_everything(args.seed)
    train_data = RetrievalData(args.length, args.steps * args.batch_size, seed=args.seed)
    val_data = RetrievalData(args.length, args.val_samples, seed=args.seed + 1)
    if args.mode == "local":
        train_data, val_data = LastShard(train_data, args.world_size), LastShard(val_data, args.world_size)  # type: ignore[assignment]
        trainer_kwargs: dict = {"devices": 1}
    else:
        strategy = MQSPStrategy(sequence_parallel_size=args.world_size, layout="contiguous")
        trainer_kwargs = {"devices": args.world_size, "strategy": strategy}
    history = TrainLossHistory()
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=args.steps, logger=False, enable_checkpointing=False, enable_model_summary=False,
        val_check_interval=args.steps, num_sanity_val_steps=0, callbacks=[history], **trainer_kwargs,
    )
    model = RetrievalModel(dim=args.dim, layers=args.layers, lr=args.lr)
    trainer.fit(model, DataLoader(train_data, batch_size=args.batch_size), DataLoader(val_data, batch_size=args.batch_size))
    metrics: dict = {name: float(value) for name, value in trainer.callback_metrics.items()}
    metrics["train_losses"] = history.losses
    if trainer.global_rank == 0 and args.result:
        Path(args.result).write_text(json.dumps(metrics))
    return metrics


def compare(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for mode in ("mqsp", "local"):
        result = out / f"retrieval_{mode}.json"
        command = [sys.executable, __file__, "--mode", mode, "--result", str(result),
                   *[f"--{name.replace('_', '-')}={value}" for name, value in vars(args).items() if name not in ("mode", "result", "out")]]
        start = time.perf_counter()
        subprocess.run(command, check=True)
        results[mode] = {**json.loads(result.read_text()), "seconds": time.perf_counter() - start}
    chance = 1 / NUM_VALUES
    print(f"\nLong-range retrieval, L={args.length} over P={args.world_size} ranks, {args.steps} steps of {args.batch_size}:")
    print(f"{'attention':<34} {'val accuracy':>12} {'val loss':>9} {'time':>7}")
    names = {"mqsp": "MQSP (whole sequence)", "local": "local shard only (no MQSP)"}
    for mode, r in results.items():
        print(f"{names[mode]:<34} {r['val_accuracy']:12.3f} {r['val_loss']:9.3f} {r['seconds']:6.0f}s")
    print(f"{'chance':<34} {chance:12.3f} {math.log(NUM_VALUES):9.3f}")
    (out / "retrieval.json").write_text(json.dumps({"args": vars(args), "chance": chance, **results}, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["both", "mqsp", "local"], default="both")
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--world-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--val-samples", type=int, default=64)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/retrieval")
    parser.add_argument("--result", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.mode == "both":
        compare(args)
    else:
        train(args)


if __name__ == "__main__":
    main()
