"""A Trainer run of the full long-context recipe with sharded parameters, and the same training in one process.

    python tests/scripts/train_fsdp.py OUT_DIR [--devices 4] [--sp 2] [--epochs 2] [--resume CKPT] [--full-checkpoint]
        [--offload-parameters] [--mixed-precision] [--shard-itself] [--reference] [--reference-bf16] [--accelerator cuda]

MQSPFSDPStrategy (FSDP2 over all ranks) with activation checkpointing of every decoder layer, the
checkpointed hidden states and the attention's queries offloaded to host memory, the attention's backward over its two key/value
heads one at a time, MLPs and norms in tiles of 5 tokens, and the chunked causal-LM loss computed from
the final hidden states and the output head, on a tiny Llama over packed documents. Rank 0 writes
OUT_DIR/result.pt: losses per step, the first step's (full) gradients, the final (full) parameters,
and, with --reference, the single-process run's (with --reference-bf16 also that run with bfloat16 weights: what
bf16 alone does to the step, the measure of a bf16 run's tolerance). ``--accelerator cuda`` puts every rank on the
one GPU, over gloo (``benchmarks/gpu_ranks.py``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent))
from hf_families import FAMILIES, make_batch
from single_process_training import dp_batches

from lightning_mqsp import MQSPFSDPStrategy, chunked_causal_lm_cross_entropy

SAMPLES, BATCH_SIZE, CHUNK = 8, 2, 8


def samples() -> list[dict[str, Tensor]]:
    rows = []
    for seed in range(SAMPLES // 2):
        batch = make_batch(FAMILIES["llama"], packed=True, seed=seed + 1)
        rows += [{k: v[i] for k, v in batch.items()} for i in range(2)]
    return rows


def full(tensor: Tensor) -> Tensor:
    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().cpu().clone()


class LongContextLM(LightningModule):
    def __init__(self, shard_itself: bool = False) -> None:
        super().__init__()
        self.model = FAMILIES["llama"].build()
        self.shard_itself = shard_itself

    def configure_model(self) -> None:
        if self.shard_itself:
            fully_shard(self.model, mesh=init_device_mesh("cpu", (self.trainer.world_size,)))

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        hidden = self.model.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).last_hidden_state
        loss = chunked_causal_lm_cross_entropy(hidden, self.model.lm_head, batch["labels"], chunk_size=CHUNK)
        self.log("train_loss", loss, sync_dist=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.5)


class Recorder(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []
        self.first_grads: dict[str, Tensor] | None = None

    def on_after_backward(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.first_grads is None:  # full tensors: every rank takes part in gathering its shards
            self.first_grads = {n: full(p.grad) for n, p in pl_module.named_parameters()}

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.losses.append(float(trainer.callback_metrics["train_loss"]))


def offloaded(module: LightningModule) -> bool:
    """Whether every shard of every FSDP unit is kept in host memory (FSDP2's own record; it has no public getter)."""
    units = [m for m in module.modules() if isinstance(m, FSDPModule)]
    params = [p for unit in units if (group := unit._get_fsdp_state()._fsdp_param_group) for p in group.fsdp_params]
    return bool(params) and all(p.offload_to_cpu for p in params)


def single_process(epochs: int, dp_size: int, device: str = "cpu", bf16: bool = False) -> dict[str, Any]:
    """The same training in one process; ``bf16``: with the weights in bfloat16, as FSDP2's mixed precision computes
    (``param_dtype=bfloat16``), the gradients returned in float32."""
    model = FAMILIES["llama"].build().to(device, torch.bfloat16 if bf16 else torch.float32)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    losses, first_grads = [], None
    for epoch in range(epochs):
        for step in dp_batches(samples(), dp_size, BATCH_SIZE, epoch):
            optimizer.zero_grad()
            loss = torch.stack([model(**{k: v.to(device) for k, v in batch.items()}, use_cache=False).loss for batch in step]).mean()
            loss.backward()
            if first_grads is None:
                first_grads = {f"model.{n}": p.grad.detach().float().cpu().clone() for n, p in model.named_parameters()}
            optimizer.step()
            losses.append(loss.item())
    return {"losses": losses, "first_grads": first_grads,
            "params": {f"model.{n}": p.detach().cpu().clone() for n, p in model.named_parameters()}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--sp", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--full-checkpoint", action="store_true", help="save the full state dict on rank 0")
    parser.add_argument("--reference", action="store_true", help="also train in one process")
    parser.add_argument("--mixed-precision", action="store_true", help="bf16 compute, float32 master weights and reduction")
    parser.add_argument("--offload-parameters", action="store_true", help="parameters, gradients, optimizer state in host memory")
    parser.add_argument("--shard-itself", action="store_true", help="the LightningModule shards its model in configure_model")
    parser.add_argument("--reference-bf16", action="store_true", help="also train in one process with bfloat16 weights")
    parser.add_argument("--accelerator", choices=["cpu", "cuda"], default="cpu", help="cuda: every rank on the one GPU, over gloo")
    args = parser.parse_args()
    torch.set_num_threads(1)
    strategy = MQSPFSDPStrategy(sequence_parallel_size=args.sp, activation_checkpointing=True, offload_activations=True, mlp_tile_size=5,
                                attention_head_groups=2,
                                save_distributed_checkpoint=not args.full_checkpoint, mixed_precision=args.mixed_precision,
                                offload_parameters=args.offload_parameters,
                                **({"process_group_backend": "gloo"} if args.accelerator == "cuda" else {}))
    if args.accelerator == "cuda":  # NCCL refuses two ranks on one device: gloo, collectives staged through host memory
        strategy.parallel_devices = [torch.device("cuda", 0)] * args.devices
    recorder = Recorder()
    compute_dtypes: set[torch.dtype] = set()
    trainer = Trainer(
        strategy=strategy, accelerator=args.accelerator, devices=1 if args.accelerator == "cuda" else args.devices,
        max_epochs=args.epochs, logger=False,
        enable_progress_bar=False, enable_model_summary=False,
        callbacks=[recorder, ModelCheckpoint(dirpath=args.out / "checkpoints", save_top_k=-1, every_n_epochs=1)],
    )
    module = LongContextLM(shard_itself=args.shard_itself)
    module.model.lm_head.register_forward_hook(lambda mod, args, out: compute_dtypes.add(out.dtype))
    trainer.fit(module, DataLoader(samples(), batch_size=BATCH_SIZE), ckpt_path=args.resume)
    params = {n: full(p) for n, p in module.named_parameters()}
    if trainer.global_rank == 0:
        result: dict[str, Any] = {"losses": recorder.losses, "first_grads": recorder.first_grads, "params": params,
                                  "compute_dtypes": compute_dtypes, "offloaded": offloaded(module)}
        if args.reference:
            result["reference"] = single_process(args.epochs, trainer.world_size // args.sp, args.accelerator)
        if args.reference_bf16:
            result["reference_bf16"] = single_process(args.epochs, trainer.world_size // args.sp, args.accelerator, bf16=True)
        torch.save(result, args.out / "result.pt")


if __name__ == "__main__":
    main()
