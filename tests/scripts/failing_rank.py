"""A Trainer run in which sequence-parallel rank 1 fails in its second training step.

    python tests/scripts/failing_rank.py {raise,exit,hang} TIMEOUT_S

``raise``: rank 1 raises; ``exit``: rank 1's process dies (os._exit); ``hang``: rank 1 never comes
back; ``linger``: rank 1 reports a failure, as the strategy does for an exception, and then hangs with its
process alive. Rank 0 is then waiting in an attention collective; the run must end on every rank within
the sequence-parallel timeout, with an error that names mqsp_attention (and rank 1, when known).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).parent))
from tiny_lm import TinyLM, make_samples

from lightning_mqsp import MQSPStrategy, comm


class FailingLM(TinyLM):
    def __init__(self, mode: str) -> None:
        super().__init__("bert")
        self.mode = mode

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if batch_idx == 1 and self.global_rank == 1:
            if self.mode == "raise":
                raise RuntimeError("rank 1 broke on purpose")
            if self.mode == "exit":
                os._exit(3)
            if self.mode == "linger":
                comm.report_failure(RuntimeError("rank 1 broke on purpose"))
            time.sleep(3600)
        return super().training_step(batch, batch_idx)


def main() -> None:
    mode, timeout_s = sys.argv[1], float(sys.argv[2])
    torch.set_num_threads(1)
    trainer = Trainer(
        strategy=MQSPStrategy(sequence_parallel_size=2, sequence_parallel_timeout=timeout_s), accelerator="cpu",
        devices=2, max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(FailingLM(mode), DataLoader(make_samples("bert", 8), batch_size=2))


if __name__ == "__main__":
    main()
