"""LightningCLI entry for the strategy tests: ``python cli_mqsp.py fit --config CONFIG.yaml``.

Rank 0 writes $MQSP_TEST_OUT/result.pt: the strategy's class and sizes and the first logged loss.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningCLI
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).parent))
from tiny_lm import TinyLM, make_samples

import lightning_mqsp  # noqa: F401  (registers "mqsp" for `strategy: mqsp`)


class TinyData(LightningDataModule):
    def __init__(self, kind: str = "bert", samples: int = 4, batch_size: int = 2) -> None:
        super().__init__()
        self.kind, self.samples, self.batch_size = kind, samples, batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(make_samples(self.kind, self.samples), batch_size=self.batch_size)


class RecordingCLI(LightningCLI):
    def after_fit(self) -> None:
        strategy = self.trainer.strategy
        if self.trainer.global_rank == 0:
            torch.save({
                "strategy": type(strategy).__name__, "sequence_parallel_size": strategy.sequence_parallel_size,
                "layout": strategy.layout, "loss": float(self.trainer.callback_metrics["train_loss"]),
            }, Path(os.environ["MQSP_TEST_OUT"]) / "result.pt")


if __name__ == "__main__":
    torch.set_num_threads(1)
    RecordingCLI(TinyLM, TinyData, save_config_callback=None)
