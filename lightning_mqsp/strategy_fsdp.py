"""``MQSPFSDPStrategy``: sequence parallelism with parameters, gradients and optimizer state sharded by FSDP2.

Under DDP every rank holds the whole model and its AdamW state: an 8B model needs about 128 GB
for that alone. Here ``fully_shard`` (FSDP2) shards them over *all* ``dp x sp`` ranks, as
torchtitan does with context parallelism: each rank keeps 1/world of the parameters and gathers a
layer's parameters only while the layer runs. Gradients are reduce-scattered with the mean over
the world, which, with the full-sequence loss on every rank, is exactly what DDP's all-reduce gives.

Hugging Face models are sharded automatically (:func:`shard_huggingface_model`): one unit per decoder layer (the
model's ``_no_split_modules``), the input embeddings, the final norm and the output head each on their own (so that a
loss computed from the hidden states, :func:`~lightning_mqsp.chunked_cross_entropy`, can call the head), the base
model and the model itself, which is made the root of them all. A LightningModule whose ``configure_model`` shards its model
itself is left as it is. With ``offload_parameters`` the shards, their gradients and the optimizer
state live in host memory (FSDP2 ``CPUOffloadPolicy``), as ZeRO-3's offload does for ALST on one GPU.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
from lightning.fabric.utilities.init import _materialize_distributed_module
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from transformers import PreTrainedModel
from typing_extensions import override

from lightning_mqsp.adapters import huggingface
from lightning_mqsp.layout import Layout
from lightning_mqsp.mesh import DEFAULT_SEQUENCE_PARALLEL_TIMEOUT
from lightning_mqsp.sequence_parallel import SequenceParallelism
from lightning_mqsp.sharding import DEFAULT_SEQUENCE_KEYS, PredictOutputs


class MQSPFSDPStrategy(SequenceParallelism, ModelParallelStrategy):
    """Micro-Query Sequence Parallelism with parameters sharded over every rank (FSDP2).

    Args:
        sequence_parallel_size: ranks per sequence-parallel group. Default: the processes of one
            node (``devices``), data parallel across nodes. Must divide the world size.
        micro_q_size: local query rows per micro-step (None: automatic, see ``mqsp_attention``).
        attention_backend: local attention kernel: ``"auto"``, ``"cpu_flash"``, ``"reference"``, ``"triton"``.
        layout: ``"zigzag"`` (balanced causal work) or ``"contiguous"``.
        sequence_keys: batch keys holding [batch, sequence, ...] tensors to shard.
        pad_token_id: pad token for lengths that do not divide; default the model's
            ``config.pad_token_id``, else 0.
        shift_labels: shift ``labels`` left by one before sharding (causal LM). Default: on when
            the module contains a Hugging Face ``*ForCausalLM``/``*LMHeadModel``.
        allow_sequence_pooling: accept a model that pools over the sequence.
        sequence_parallel_timeout: seconds (or a ``timedelta``) a collective of a sequence-parallel
            group waits for a missing rank (default 600).
        activation_checkpointing: recompute every Hugging Face decoder layer in backward.
        offload_activations: keep what the forward saves for backward in host memory, and the attention's
            queries through backward (``offload_queries`` of ``mqsp_attention``).
        mlp_tile_size: run every MLP and normalisation layer on this many tokens at a time, each tile recomputed in backward.
        attention_head_groups: run the attention's backward over its key/value heads in this many groups
            (``head_groups`` of ``mqsp_attention``): float32 dK/dV accumulators for one group at a time.
        predict_outputs: ``"shard"`` (default), ``"first_rank"`` or ``"all"``: where ``predict_step``'s outputs
            are gathered to full length (see :class:`~lightning_mqsp.MQSPStrategy`).
        mixed_precision: compute with bfloat16 parameters while the sharded master weights and the
            gradient reduction stay float32 (FSDP2 ``MixedPrecisionPolicy``).
        offload_parameters: keep the sharded parameters, their gradients and the optimizer state in host
            memory (FSDP2 ``CPUOffloadPolicy``): a layer's parameters come to the device only while it runs,
            each gradient goes back as it is reduced, and the optimizer steps on the CPU. What lets an 8B model
            train on one 80 GB GPU (``docs/scaling.md``); it costs host-device transfers every step.
        offload_activation_layers: with ``offload_activations``, offload the checkpoints of only the first layers: a
            number of decoder layers (int >= 0) or a fraction of them (float in (0, 1], rounded up); the others stay on
            the device, so the host holds only what the device cannot (:mod:`lightning_mqsp.layer_offload`;
            ``lightning-mqsp plan`` chooses it). None (default): every layer's.
        offload_prefetch: with ``offload_activations``, start bringing back the next layer's checkpoint while a layer's
            backward runs (default), which hides the copy but holds one more hidden state a token on the device at the
            layer's peak; False: each copy back starts when backward needs it and waits (at the lengths offload is for,
            a fraction of a percent of a step). ``lightning-mqsp plan`` turns it off only where the memory needs it.
        offload_queries: whether the attention keeps its queries in host memory from forward through backward, a
            micro-step's rows copied back at a time. None (default): as ``offload_activations``. On the device they
            cost no copies, and the device's peak nothing where it falls after attention's backward (the rotary
            embedding's backward of models with few key/value heads); ``lightning-mqsp plan`` chooses it.
        save_distributed_checkpoint: True: each rank saves its shard (a folder, resumable at any
            world size); False: the full state dict on rank 0, loadable into the plain model.
        **kwargs: ``process_group_backend`` and ``timeout`` of :class:`~lightning.pytorch.strategies.ModelParallelStrategy`.
    """

    strategy_name = "mqsp_fsdp"

    def __init__(
        self,
        sequence_parallel_size: int | None = None,
        micro_q_size: int | None = None,
        attention_backend: str = "auto",
        layout: Layout = "zigzag",
        sequence_keys: Sequence[str] = DEFAULT_SEQUENCE_KEYS,
        pad_token_id: int | None = None,
        shift_labels: bool | None = None,
        allow_sequence_pooling: bool = False,
        sequence_parallel_timeout: float | datetime.timedelta = DEFAULT_SEQUENCE_PARALLEL_TIMEOUT,
        activation_checkpointing: bool = False,
        offload_activations: bool = False,
        mlp_tile_size: int | None = None,
        attention_head_groups: int = 1,
        predict_outputs: PredictOutputs = "shard",
        mixed_precision: bool = False,
        offload_parameters: bool = False,
        offload_activation_layers: int | float | None = None,
        offload_prefetch: bool = True,
        offload_queries: bool | None = None,
        save_distributed_checkpoint: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(save_distributed_checkpoint=save_distributed_checkpoint, **kwargs)
        self._configure_sequence_parallelism(
            sequence_parallel_size, micro_q_size, attention_backend, layout, sequence_keys, pad_token_id, shift_labels,
            allow_sequence_pooling, sequence_parallel_timeout, activation_checkpointing, offload_activations, mlp_tile_size,
            attention_head_groups, predict_outputs, offload_activation_layers, offload_prefetch, offload_queries,
        )
        self.mixed_precision = mixed_precision
        self.offload_parameters = offload_parameters
        self._sharded_models: list[nn.Module] = []

    @override
    def setup_environment(self) -> None:
        # ModelParallelStrategy's own would build a (data, tensor)-parallel mesh; ours replaces it.
        self._setup_distributed()
        self._build_mesh()

    @override
    def setup(self, trainer: Trainer) -> None:
        # ModelParallelStrategy.setup, less its demand that configure_model shards the model: here it is sharded for you.
        module = self.lightning_module
        assert module is not None and self.model is not None and self.accelerator is not None
        self.accelerator.setup(trainer)
        self._prepare_model(module)
        if not any(isinstance(m, FSDPModule) for m in module.modules()):
            self._shard(module)
        elif self.offload_parameters:
            raise ValueError(
                "MQSPFSDPStrategy(offload_parameters=True) applies to the models it shards, but `configure_model()` sharded "
                "the model already: pass `offload_policy=CPUOffloadPolicy()` to your own fully_shard calls instead."
            )
        _materialize_distributed_module(self.model, self.root_device)
        self.model = self.precision_plugin.convert_module(self.model)
        if self.offload_parameters:  # the shards stay in host memory; only the buffers go to the device
            _buffers_to_device(self.model, self.root_device)
        else:
            self.model_to_device()
        for model in self._sharded_models:  # their parameters are final now
            make_root(model)
        self.barrier()
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        if trainer.state.fn == TrainerFn.FITTING and not self.offload_parameters:
            _optimizers_to_device(self.optimizers, self.root_device)

    def _shard(self, module: LightningModule) -> None:
        """fully_shard every Hugging Face model inside ``module`` over all ranks (see the module docstring)."""
        models = huggingface.huggingface_models(module)
        if not models:
            raise ValueError(
                "MQSPFSDPStrategy shards Hugging Face models automatically and found none in the LightningModule: "
                "shard your model yourself in `configure_model()` with torch.distributed.fsdp.fully_shard."
            )
        world: DeviceMesh = init_device_mesh(self.root_device.type, (self.world_size,))
        policy = MixedPrecisionPolicy()
        if self.mixed_precision:  # bf16 compute; float32 master weights (the shards) and gradient reduction
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        # Pinned host memory makes the copies asynchronous; it needs an accelerator.
        offload = CPUOffloadPolicy(pin_memory=self.root_device.type != "cpu") if self.offload_parameters else OffloadPolicy()
        shard = partial(fully_shard, mesh=world, mp_policy=policy, offload_policy=offload)
        for model in models:
            shard_huggingface_model(model, shard)
        self._sharded_models = list(models)
        sharded = {id(p) for m in module.modules() if isinstance(m, FSDPModule) for p in m.parameters()}
        left = [name for name, p in module.named_parameters() if id(p) not in sharded]
        if left:
            raise ValueError(
                f"MQSPFSDPStrategy sharded the Hugging Face models, but these parameters of the LightningModule lie outside "
                f"them: {left[:5]}{' ...' if len(left) > 5 else ''}. Shard the whole module yourself in `configure_model()`."
            )


def shard_huggingface_model(model: PreTrainedModel, shard: Callable[[nn.Module], Any]) -> None:
    """Apply ``shard`` (``fully_shard`` with the mesh and policies bound) to each decoder layer, the input embeddings
    and the output head (each unless tied to the other: then both stay with the model), the base model and the model.

    The embeddings are a unit of their own because a unit's parameters stay gathered from the first gradient that
    reaches its output to the end of its backward: with the base model, that is the whole backward (1 GB of bf16
    Llama-3 embeddings on every device); alone, the embedding's backward only, at the end. What runs between the last
    layer and the head (the final norm) is a unit too: FSDP2 keeps a unit's float32 gradient buffer until the next
    unit's reduce-scatter, so the head's (2.1 GB for Llama-3) goes at the tiny norm's, before the last layer's backward
    instead of after it. The first layer does not gather the embeddings ahead of their backward. Call :func:`make_root`
    once the parameters are final."""
    layer_classes = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in layer_classes]
    for layer in layers:
        shard(layer)
    embeddings, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = isinstance(head, nn.Module) and _shares_parameters(head, embeddings)
    for part in (embeddings, head):
        if isinstance(part, nn.Module) and not tied and not isinstance(part, FSDPModule):
            shard(part)
    if layers and isinstance(embeddings, FSDPModule) and isinstance(layers[0], FSDPModule):
        # In backward the embeddings follow the first layer, and their backward reads no weight: gathered ahead (FSDP2's
        # default prefetch) they would sit beside the first layer's peak (2Vh). A unit that prefetches itself prefetches
        # nothing (it is gathered already); an empty list would mean the default.
        layers[0].set_modules_to_backward_prefetch([layers[0]])
    for part in _after_the_layers(model.base_model, layers):
        shard(part)
    if model.base_model is not model:
        shard(model.base_model)
    shard(model)


def _after_the_layers(base_model: nn.Module, layers: list[nn.Module]) -> list[nn.Module]:
    """The base model's children registered after the one that holds the decoder layers, with parameters of their own
    (the final norm of Hugging Face decoders: ``norm``, ``ln_f``, ``final_layer_norm``)."""
    children = list(base_model.children())
    holders = [i for i, child in enumerate(children) if any(layer is child or layer in child.modules() for layer in layers)]
    if not holders:
        return []
    return [child for child in children[holders[-1] + 1 :] if any(True for _ in child.parameters())
            and not isinstance(child, FSDPModule)]


def make_root(model: nn.Module) -> None:
    """Make the sharded ``model`` the root of its units now, as FSDP2 would at its first forward.

    FSDP2 takes the first unit that runs forward for the root. A training step that calls the base model and then the
    output head (the chunked loss: ``model.model(...)``, then ``model.lm_head``) would make each a root of its own;
    the head's units then share no state with the layers', and its float32 gradient buffer (4 bytes a parameter: 2.1
    GB for Llama-3's head) is kept through the whole backward instead of until the next layer's reduce-scatter, and a
    root keeps its parameters gathered after forward. FSDP2 has no public call for this: this runs its own lazy
    initialisation (private, present from torch 2.11 on), which the first forward would run and then skips."""
    model._get_fsdp_state()._lazy_init()  # type: ignore[operator]


def _buffers_to_device(module: nn.Module, device: torch.device) -> None:
    """Move the buffers of ``module`` (rotary frequencies, metric states), not its parameters."""
    for submodule in module.modules():
        for name, buffer in submodule._buffers.items():
            if buffer is not None:
                submodule._buffers[name] = buffer.to(device)


def _shares_parameters(first: nn.Module, second: nn.Module | None) -> bool:
    """Whether the two modules hold a parameter in common (tied input and output embeddings)."""
    return second is not None and bool({id(p) for p in first.parameters()} & {id(p) for p in second.parameters()})
