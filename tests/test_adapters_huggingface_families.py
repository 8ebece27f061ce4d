"""Hugging Face families x long-context recipes through MQSP on 2 gloo ranks, against the same model
trained in one process: the loss and every parameter's gradient.

Each rank runs the model exactly as ``MQSPStrategy`` does (the strategy's batch sharder, the
adapter's hooks, attention routed in forward and in backward, ``model(**batch).loss``), and the
ranks' gradients are averaged as DDP averages them. The reference is the unmodified model on
the full batch with transformers' own attention and loss.
"""

from __future__ import annotations

import inspect
from contextlib import nullcontext

import pytest
import torch
import torch.distributed as dist
from hf_families import FAMILIES, Family, make_batch
from reference import relative_error
from torch import nn

from lightning_mqsp.adapters import SequenceParallelContext, activate, huggingface
from lightning_mqsp.sharding import BatchSharder

FP32_TOLERANCE = 1e-5
GRADIENT_FLOOR = 1e-3  # relative to max(|grad|, this): gradients that are zero up to rounding


def _loss(model: nn.Module, batch: dict, bf16: bool) -> torch.Tensor:
    extra = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
    with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext():
        return model(**batch, **extra).loss


def _reference(family: Family, batch: dict, bf16: bool) -> dict[str, torch.Tensor]:
    model = family.build().train()
    model.set_attn_implementation(family.reference_attention)
    loss = _loss(model, batch, bf16)
    loss.backward()
    return {"loss": loss.detach().float(), **{n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}}


def run_family(name: str, recipe: str, layout: str) -> dict[str, dict[str, float]]:
    """On each rank: this rank's share through MQSP; returns the errors against fp32 (and bf16) single-process runs."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    family = FAMILIES[name]
    batch = make_batch(family, packed=recipe == "packed")
    bf16 = recipe == "bf16-mixed"

    model = family.build().train()
    if recipe.startswith("checkpointing"):
        huggingface.enable_activation_checkpointing(model, use_reentrant=recipe.endswith("reentrant"))
    undo = huggingface.prepare(model)
    context = SequenceParallelContext(layout=layout, group=None, rank=rank, world_size=world_size, labels_shifted=family.causal)
    sharder = BatchSharder(rank=rank, world_size=world_size, layout=layout, shift_labels=family.causal,
                           pad_token_id=model.config.pad_token_id or 0, position_ids_fn=huggingface.position_ids_fn(model))
    sharded = sharder.shard(batch)
    context.full_length, context.document_ids = sharder.last_full_length, sharder.last_document_ids
    with activate(context):  # as MQSPStrategy routes attention in the step and in backward
        loss = _loss(model, sharded, bf16)
        loss.backward()
    assert context.attention_calls > 0
    for undo_patch in undo:
        undo_patch()
    actual = {"loss": loss.detach().float()}
    for parameter_name, parameter in model.named_parameters():
        if parameter.grad is not None:  # what DDP does: the mean over ranks (each back-propagated P x its share)
            dist.all_reduce(parameter.grad)
            actual[parameter_name] = parameter.grad.float() / world_size

    def errors(expected: dict[str, torch.Tensor]) -> dict[str, float]:
        assert set(expected) == set(actual), set(expected) ^ set(actual)
        return {k: relative_error(actual[k], expected[k], floor=GRADIENT_FLOOR) for k in expected}

    exact = _reference(family, batch, bf16=False)
    result = {"vs_fp32": errors(exact)}
    if bf16:  # how far one process's own bf16 run is from fp32: the yardstick for MQSP's bf16 run
        single = _reference(family, batch, bf16=True)
        result["single_bf16_vs_fp32"] = {k: relative_error(single[k], exact[k], floor=GRADIENT_FLOOR) for k in exact}
    return result


CAUSAL = [name for name, f in FAMILIES.items() if f.causal]
CASES = [
    *((name, "plain", "zigzag" if FAMILIES[name].causal else "contiguous") for name in FAMILIES),
    *((name, "checkpointing", "zigzag") for name in FAMILIES),
    ("llama", "checkpointing-reentrant", "contiguous"), ("bert", "checkpointing-reentrant", "zigzag"),
    *((name, "bf16-mixed", "zigzag") for name in FAMILIES),
    *((name, "packed", layout) for name in CAUSAL for layout in ("zigzag", "contiguous")),
]


@pytest.mark.parametrize(("family", "recipe", "layout"), CASES, ids=["-".join(c) for c in CASES])
def test_matches_single_process_training(workers, family: str, recipe: str, layout: str) -> None:
    for rank, result in enumerate(workers(2).run(run_family, family, recipe, layout, timeout=120)):
        mqsp = result["vs_fp32"]
        if recipe != "bf16-mixed":
            worst = max(mqsp, key=mqsp.get)
            assert mqsp[worst] <= FP32_TOLERANCE, f"rank {rank}: {worst} relative error {mqsp[worst]:.2e}"
            continue
        # bf16: both runs round every matmul to bf16, in different orders, so they differ from each other by about as
        # much as each differs from fp32. MQSP must be no worse than twice the single-process bf16 run's own error.
        single = result["single_bf16_vs_fp32"]
        for key in ("loss", "gradients"):
            names = ["loss"] if key == "loss" else [k for k in mqsp if k != "loss"]
            ours, theirs = max(mqsp[k] for k in names), max(single[k] for k in names)
            assert ours <= 2 * theirs + 1e-3, f"rank {rank}: {key} bf16 error {ours:.2e} vs single-process {theirs:.2e}"


def test_packed_documents_change_the_result() -> None:
    """The packed batch really has documents: transformers' own attention separates them (use_cache=False)."""
    family = FAMILIES["llama"]
    batch = make_batch(family, packed=True)
    model = family.build()
    separated = model(**batch, use_cache=False).loss
    plain_positions = {**batch, "position_ids": torch.arange(batch["input_ids"].size(1)).expand_as(batch["input_ids"])}
    assert not torch.isclose(separated, model(**plain_positions, use_cache=False).loss)


def peak_with_checkpointing(checkpointing: bool) -> int:
    """Peak memory (MemTracker, exact on CPU) of a forward and backward of a 4-layer Llama on 1024 tokens at P=2."""
    from torch.distributed._tools.mem_tracker import MemTracker
    from transformers import LlamaConfig, LlamaForCausalLM

    rank, world_size = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                                         intermediate_size=256, max_position_embeddings=2048)).train()
    if checkpointing:
        huggingface.enable_activation_checkpointing(model)
    huggingface.prepare(model)
    context = SequenceParallelContext(layout="zigzag", rank=rank, world_size=world_size, labels_shifted=True)
    ids = torch.randint(3, 97, (1, 1024), generator=torch.Generator().manual_seed(0))
    sharded = BatchSharder(rank, world_size, "zigzag", shift_labels=True).shard({"input_ids": ids, "labels": ids})
    tracker = MemTracker()
    tracker.track_external(model)
    with tracker, activate(context):
        model(**sharded).loss.backward()
    return tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]


def test_activation_checkpointing_keeps_its_memory_benefit(workers) -> None:
    pool = workers(2)
    without, with_checkpointing = (pool.run(peak_with_checkpointing, flag, timeout=120)[0] for flag in (False, True))
    # 4 layers of saved activations become 4 layer inputs plus one layer recomputed at a time.
    assert with_checkpointing < 0.6 * without, (with_checkpointing, without)
