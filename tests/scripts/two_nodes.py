"""One node of a two-node run simulated on one machine: Lightning's own launcher, num_nodes=2, 2 devices a node.

    MASTER_ADDR=127.0.0.1 MASTER_PORT=<port> NODE_RANK=<0|1> python tests/scripts/two_nodes.py OUT_DIR

Trains a few steps of a tiny BERT under MQSPStrategy with the default sequence-parallel size (the
devices of one node); global rank 0 writes OUT_DIR/result.pt: every rank's node, its
sequence-parallel and data-parallel groups (global ranks), and the losses.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).parent))
from tiny_lm import TinyLM, make_samples

from lightning_mqsp import MQSPStrategy


class GroupsLM(TinyLM):
    def on_train_start(self) -> None:
        strategy = self.trainer.strategy
        mine = {
            "node": self.trainer.node_rank, "global_rank": self.global_rank,
            "sequence_parallel": dist.get_process_group_ranks(strategy.sequence_parallel_group),
            "data_parallel": dist.get_process_group_ranks(strategy.device_mesh["data_parallel"].get_group()),
        }
        self.groups: list = [None] * dist.get_world_size()
        dist.all_gather_object(self.groups, mine)


def main() -> None:
    torch.set_num_threads(1)
    out = Path(sys.argv[1])
    trainer = Trainer(strategy=MQSPStrategy(), accelerator="cpu", devices=2, num_nodes=2, max_steps=2, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    module = GroupsLM("bert")
    trainer.fit(module, DataLoader(make_samples("bert", 8), batch_size=2))
    if trainer.global_rank == 0:
        torch.save({"groups": module.groups, "loss": float(trainer.callback_metrics["train_loss"])}, out / "result.pt")


if __name__ == "__main__":
    main()
