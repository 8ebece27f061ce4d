"""MQSPFSDPStrategy end to end: the full long-context recipe (FSDP2 sharding over all ranks, activation checkpointing
with offload, the chunked loss, packed documents) against single-process training; resume at another SP size;
the sharded checkpoint into a plain Hugging Face model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from hf_families import FAMILIES
from lightning.pytorch.strategies import StrategyRegistry
from test_strategy import ATOL, RTOL, assert_tensors_match, run_script
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from lightning_mqsp import MQSPFSDPStrategy


@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """SP=2 x DP=2 on 4 processes, 2 epochs of 2 steps, with the single-process reference; the parameters, gradients
    and optimizer state in host memory (on a CPU the same memory, but FSDP2's offload path: its copies and a step on
    the offloaded shards)."""
    out = tmp_path_factory.mktemp("fsdp")
    args = ("--devices", "4", "--sp", "2", "--offload-parameters", "--reference")
    return run_script("train_fsdp.py", str(out), *args, out=out) | {"out": out}


@pytest.mark.timeout(600)
def test_full_recipe_matches_single_process(recipe_run: dict[str, Any]) -> None:
    assert recipe_run["offloaded"]
    reference = recipe_run["reference"]
    torch.testing.assert_close(torch.tensor(recipe_run["losses"]), torch.tensor(reference["losses"]), rtol=RTOL, atol=0)
    strip = lambda d: {k.removeprefix("model."): v for k, v in d.items()}
    assert_tensors_match(recipe_run["first_grads"], strip(reference["first_grads"]))
    assert_tensors_match(recipe_run["params"], strip(reference["params"]))


@pytest.mark.timeout(600)
def test_sharded_checkpoint_resumes_at_another_sequence_parallel_size(recipe_run: dict[str, Any], tmp_path: Path) -> None:
    """The epoch-0 checkpoint of 4 ranks (a folder of shards, saved from host memory) resumes on 2 ranks at SP=1 (same
    data parallelism), without the parameter offload."""
    checkpoint = recipe_run["out"] / "checkpoints" / "epoch=0-step=2.ckpt"
    assert checkpoint.is_dir()
    resumed = run_script("train_fsdp.py", str(tmp_path), "--devices", "2", "--sp", "1", "--resume", str(checkpoint), out=tmp_path)
    torch.testing.assert_close(torch.tensor(resumed["losses"]), torch.tensor(recipe_run["losses"][2:]), rtol=RTOL, atol=0)
    assert_tensors_match(resumed["params"], {k.removeprefix("model."): v for k, v in recipe_run["params"].items()})


@pytest.mark.timeout(600)
def test_sharded_checkpoint_loads_into_the_plain_model(recipe_run: dict[str, Any], tmp_path: Path) -> None:
    """torch's own converter turns the shards into one file whose state dict the unmodified model loads strictly."""
    dcp_to_torch_save(recipe_run["out"] / "checkpoints" / "epoch=1-step=4.ckpt", tmp_path / "full.pt")
    state_dict = torch.load(tmp_path / "full.pt", weights_only=False)["state_dict"]
    model = FAMILIES["llama"].build()
    model.load_state_dict({k.removeprefix("model."): v for k, v in state_dict.items()}, strict=True)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, recipe_run["params"][f"model.{name}"], rtol=0, atol=ATOL)


@pytest.mark.timeout(300)
def test_parameter_offload_refuses_a_model_sharded_by_the_user(tmp_path: Path) -> None:
    """The strategy offloads only what it shards: a model sharded in configure_model gets a clear error, not a run whose
    parameters stay on the device after the user asked for host memory."""
    with pytest.raises(AssertionError, match=r"offload_policy=CPUOffloadPolicy\(\)"):
        run_script("train_fsdp.py", str(tmp_path), "--devices", "1", "--sp", "1", "--epochs", "1", "--offload-parameters",
                   "--shard-itself", out=tmp_path)


def test_registered_by_import() -> None:
    assert StrategyRegistry["mqsp_fsdp"]["strategy"] is MQSPFSDPStrategy


@pytest.mark.timeout(600)
def test_mixed_precision_computes_in_bf16_and_keeps_float32_weights(tmp_path: Path) -> None:
    run = run_script("train_fsdp.py", str(tmp_path), "--devices", "2", "--sp", "2", "--epochs", "1", "--mixed-precision",
                     "--reference", out=tmp_path)
    assert run["compute_dtypes"] == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in run["params"].values())
    assert not run["offloaded"]
    # bf16 compute: the losses within bf16 rounding of float32 training in one process on the same batches.
    torch.testing.assert_close(torch.tensor(run["losses"]), torch.tensor(run["reference"]["losses"]), rtol=1e-2, atol=0)


def test_the_embeddings_and_the_final_norm_are_units_of_their_own_and_the_model_is_the_root_of_every_unit() -> None:
    """A step that calls the base model and then the head (the chunked loss) must not make each a root of its own
    (the head's float32 gradient buffer would then live through the whole backward); the embeddings must not stay
    gathered with the base model through backward, nor be gathered ahead of their backward by the first layer; the
    final norm's reduce-scatter frees the head's buffer before the last layer's backward: the strategy's sharding, on
    a fake world of 2 ranks."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    from lightning_mqsp.estimate import _world_meshes, fake_world, new_model
    from lightning_mqsp.models import model_config
    from lightning_mqsp.strategy_fsdp import make_root, shard_huggingface_model

    with fake_world(2):
        model = new_model(model_config("tiny-llama", 64))
        shard_huggingface_model(model, lambda module: fully_shard(module, mesh=_world_meshes[2]))
        make_root(model)
        embeddings, head, norm = model.get_input_embeddings(), model.get_output_embeddings(), model.base_model.norm
        assert all(isinstance(part, FSDPModule) for part in (embeddings, head, norm))
        first = model.base_model.layers[0]
        assert first._get_fsdp_state()._states_to_backward_prefetch == [first._get_fsdp_state()]  # nothing ahead
        assert not model.base_model.layers[1]._get_fsdp_state()._states_to_backward_prefetch  # FSDP2's default
        root = model._get_fsdp_state()
        states = [part._get_fsdp_state() for part in (embeddings, head, norm, model.base_model)]
        assert root._is_root and not any(state._is_root for state in states)
        assert all(state._comm_ctx is root._comm_ctx for state in states)
