"""The sequence-parallel machinery both strategies share (``docs/design.md``).

:class:`SequenceParallelism` is mixed into a Lightning strategy that owns the process group and
the parameters: :class:`~lightning_mqsp.MQSPStrategy` (DDP, replicated parameters) and
:class:`~lightning_mqsp.MQSPFSDPStrategy` (FSDP2, sharded parameters). It builds the
``("data_parallel", "sequence_parallel")`` mesh (:mod:`lightning_mqsp.mesh`), switches the model's
attention to MQSP (:mod:`lightning_mqsp.adapters`), shards every batch
(:mod:`lightning_mqsp.sharding`), routes attention in steps and in backward, checkpoints
activations per decoder layer (optionally offloading what they keep to host memory), and makes
a failing rank end its peers with a named error. With the full-sequence loss of
:mod:`lightning_mqsp.loss` on every rank and gradients averaged over all dp x sp ranks (DDP's
all-reduce or FSDP's reduce-scatter), the result is the exact data-parallel gradient.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.strategies import ParallelStrategy
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from lightning.pytorch.trainer.connectors.signal_connector import _get_sigkill_signal
from lightning.pytorch.utilities.rank_zero import rank_zero_debug, rank_zero_info
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh
from torch.optim import Optimizer
from typing_extensions import override

from lightning_mqsp import comm, offload
from lightning_mqsp.adapters import AttentionAudit, SequenceParallelContext, activate, huggingface, reject_unroutable_modules
from lightning_mqsp.adapters.sdpa import RouteScaledDotProductAttention
from lightning_mqsp.comm import ProcessGroup
from lightning_mqsp.layer_offload import LayerOffload, OffloadLayers, check_offload_layers, layer_offload
from lightning_mqsp.layout import Layout, check_layout
from lightning_mqsp.mesh import check_sizes, sequence_parallel_mesh
from lightning_mqsp.sharding import PREDICT_OUTPUTS, BatchSharder, PredictOutputs, gather_outputs
from lightning_mqsp.tiling import tile_token_wise
from lightning_mqsp.watchdog import PeerFailureWatchdog

_CAUSAL_LM_SUFFIXES = ("ForCausalLM", "LMHeadModel")

class SequenceParallelism(ParallelStrategy):
    """Everything sequence parallelism adds to a Lightning ``ParallelStrategy``; mixed in before it
    (``class MQSPStrategy(SequenceParallelism, DDPStrategy)``), so its hooks wrap the strategy's."""

    # Defined by every launching ParallelStrategy (DDPStrategy, ModelParallelStrategy), not by ParallelStrategy itself.
    num_nodes: int
    num_processes: int

    def _configure_sequence_parallelism(
        self,
        sequence_parallel_size: int | None,
        micro_q_size: int | None,
        attention_backend: str,
        layout: Layout,
        sequence_keys: Sequence[str],
        pad_token_id: int | None,
        shift_labels: bool | None,
        allow_sequence_pooling: bool,
        sequence_parallel_timeout: float | datetime.timedelta,
        activation_checkpointing: bool,
        offload_activations: bool,
        mlp_tile_size: int | None,
        attention_head_groups: int,
        predict_outputs: PredictOutputs,
        offload_activation_layers: OffloadLayers = None,
        offload_prefetch: bool = True,
        offload_queries: bool | None = None,
    ) -> None:
        check_layout(layout)
        if predict_outputs not in PREDICT_OUTPUTS:
            raise ValueError(f"predict_outputs must be one of {PREDICT_OUTPUTS}, got {predict_outputs!r}.")
        self.predict_outputs = predict_outputs
        if sequence_parallel_size is not None and sequence_parallel_size < 1:
            raise ValueError(f"sequence_parallel_size must be a positive int, got {sequence_parallel_size}.")
        if not isinstance(sequence_parallel_timeout, datetime.timedelta):
            sequence_parallel_timeout = datetime.timedelta(seconds=sequence_parallel_timeout)
        if sequence_parallel_timeout.total_seconds() <= 0:
            raise ValueError(f"sequence_parallel_timeout must be positive, got {sequence_parallel_timeout}.")
        self._sequence_parallel_size = sequence_parallel_size
        self.sequence_parallel_timeout = sequence_parallel_timeout
        #: The one object that carries the sequence-parallel settings to every attention call.
        if isinstance(attention_head_groups, bool) or not (isinstance(attention_head_groups, int) and attention_head_groups >= 1):
            raise ValueError(f"attention_head_groups must be a positive int, got {attention_head_groups!r}.")
        # With offload, the attention keeps its queries in host memory through backward as well, unless told not to.
        if offload_queries is not None and not isinstance(offload_queries, bool):
            raise ValueError(f"offload_queries must be True, False or None (as offload_activations), got {offload_queries!r}.")
        self.sequence_parallel = SequenceParallelContext(
            layout=layout, micro_q_size=micro_q_size, backend=attention_backend, head_groups=attention_head_groups,
            offload_queries=offload_activations if offload_queries is None else offload_queries,
        )
        self.sequence_keys = tuple(sequence_keys)
        self.pad_token_id = pad_token_id
        self.shift_labels = shift_labels
        self.allow_sequence_pooling = allow_sequence_pooling
        if mlp_tile_size is not None and not (isinstance(mlp_tile_size, int) and mlp_tile_size >= 1):
            raise ValueError(f"mlp_tile_size must be a positive int or None, got {mlp_tile_size!r}.")
        self.activation_checkpointing = activation_checkpointing
        self.offload_activations = offload_activations
        check_offload_layers(offload_activation_layers, offload_activations)
        self.offload_activation_layers = offload_activation_layers
        if not isinstance(offload_prefetch, bool):
            raise ValueError(f"offload_prefetch must be True or False, got {offload_prefetch!r}.")
        self.offload_prefetch = offload_prefetch
        self._layer_offload: LayerOffload | None = None
        self.mlp_tile_size = mlp_tile_size
        self._device_mesh: DeviceMesh | None = None
        self._sharder: BatchSharder | None = None
        self._undo_model_patches: list[Callable[[], None]] = []
        self._audit: AttentionAudit | None = None
        self._audited_steps: set[str] = set()
        self._watchdog: PeerFailureWatchdog | None = None

    # -- sizes and the mesh ---------------------------------------------------------------

    @property
    def layout(self) -> Layout:
        return self.sequence_parallel.layout

    @property
    def micro_q_size(self) -> int | None:
        return self.sequence_parallel.micro_q_size

    @property
    def attention_backend(self) -> str:
        return self.sequence_parallel.backend

    @property
    def sequence_parallel_size(self) -> int:
        return self._sequence_parallel_size or self.num_processes

    @property
    def data_parallel_size(self) -> int:
        return self.world_size // self.sequence_parallel_size

    @property
    def device_mesh(self) -> DeviceMesh:
        if self._device_mesh is None:
            raise RuntimeError("Accessing the device mesh before processes have initialized is not allowed.")
        return self._device_mesh

    @property
    def sequence_parallel_group(self) -> ProcessGroup:
        return self.device_mesh["sequence_parallel"].get_group()

    @property
    def sequence_parallel_rank(self) -> int:
        return self.device_mesh["sequence_parallel"].get_local_rank()

    @property
    def data_parallel_rank(self) -> int:
        return self.device_mesh["data_parallel"].get_local_rank()

    @override
    def _configure_launcher(self) -> None:
        # Called in the launching process when the Trainer is built: fail before any process starts.
        check_sizes(self.num_nodes * self.num_processes, self.sequence_parallel_size)
        super()._configure_launcher()

    @override
    def setup_environment(self) -> None:
        super().setup_environment()
        self._build_mesh()

    def _build_mesh(self) -> None:
        """The mesh, once the default process group exists; the LightningModule sees it as ``self.device_mesh``."""
        self._device_mesh = sequence_parallel_mesh(self.root_device.type, self.sequence_parallel_size, self.sequence_parallel_timeout)
        context = self.sequence_parallel
        context.group, context.rank, context.world_size = (
            self.sequence_parallel_group, self.sequence_parallel_rank, self.sequence_parallel_size,
        )
        rank_zero_debug(f"MQSPStrategy: device mesh {self._device_mesh}, sequence-parallel timeout {self.sequence_parallel_timeout}.")
        # A failure on any rank ends this one within seconds, also where its collectives would not see it (NCCL).
        if self._watchdog is None:
            self._watchdog = PeerFailureWatchdog(self.sequence_parallel_group, on_give_up=self._end_launched_processes)
            self._watchdog.start()
        # The LightningModule sees it as `self.device_mesh`, as under ModelParallelStrategy.
        assert self.lightning_module is not None
        self.lightning_module._device_mesh = self._device_mesh

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        # Every rank of a sequence-parallel group must load the same samples.
        return {"num_replicas": self.data_parallel_size, "rank": self.data_parallel_rank}

    # -- model -----------------------------------------------------------------------------

    @override
    def setup(self, trainer: Trainer) -> None:
        module = self.lightning_module
        assert module is not None
        self._prepare_model(module)
        super().setup(trainer)

    def _prepare_model(self, module: LightningModule) -> None:
        reject_unroutable_modules(module)
        self._undo_model_patches = huggingface.prepare(module, self.allow_sequence_pooling)
        hf_models = huggingface.huggingface_models(module)
        if self.activation_checkpointing:
            if not hf_models:
                raise ValueError(
                    "activation_checkpointing=True checkpoints the decoder layers of Hugging Face models, and this module has "
                    "none: wrap your layers in torch.utils.checkpoint yourself (attention is routed in backward too)."
                )
            for hf_model in hf_models:
                huggingface.enable_activation_checkpointing(hf_model)
        if self.offload_activation_layers is not None:
            self._layer_offload = layer_offload(hf_models, self.offload_activation_layers)
            self._undo_model_patches.append(self._layer_offload.attach())
        if self.mlp_tile_size is not None:
            if not any(type(m).__name__.endswith("MLP") for m in module.modules()):
                raise ValueError("mlp_tile_size was given, but the module has no MLP (no submodule whose class name ends with 'MLP').")
            self._undo_model_patches += tile_token_wise(module, self.mlp_tile_size)
        shift_labels = self.shift_labels
        if shift_labels is None:
            shift_labels = any(type(m).__name__.endswith(_CAUSAL_LM_SUFFIXES) for m in hf_models)
        self.sequence_parallel.labels_shifted = shift_labels
        pad_token_id = self.pad_token_id
        if pad_token_id is None:
            pad_token_id = next((m.config.pad_token_id for m in hf_models if m.config.pad_token_id is not None), 0)
        self._sharder = BatchSharder(
            rank=self.sequence_parallel_rank, world_size=self.sequence_parallel_size, layout=self.layout,
            sequence_keys=self.sequence_keys, pad_token_id=pad_token_id, shift_labels=shift_labels,
            position_ids_fn=next((fn for m in hf_models if (fn := huggingface.position_ids_fn(m)) is not None), None),
        )
        self._audit = AttentionAudit(module)
        self._audited_steps = set()
        rank_zero_info(
            f"MQSPStrategy: {self.data_parallel_size} data-parallel x {self.sequence_parallel_size} sequence-parallel ranks, "
            f"{self.layout} layout{', causal-LM labels shifted before sharding' if shift_labels else ''}."
        )

    @override
    def teardown(self) -> None:
        if self._watchdog is not None:
            self._watchdog.stop()
            self._watchdog = None
        for undo in self._undo_model_patches:
            undo()
        self._undo_model_patches = []
        super().teardown()

    @override
    def on_exception(self, exception: BaseException) -> None:
        # Every peer's watchdog sees this in the store within a second and ends its collectives; a peer blocked in
        # one with this rank can then name it and why.
        comm.report_failure(exception)
        # A broken sequence-parallel group cannot recover, and a peer that hangs outside a collective would
        # outlive this process: the launching process ends the processes it started (Lightning does so
        # only on KeyboardInterrupt), whatever the exception.
        self._end_launched_processes()
        super().on_exception(exception)

    def _end_launched_processes(self) -> None:
        if isinstance(self.launcher, _SubprocessScriptLauncher):
            self.launcher.kill(_get_sigkill_signal())

    # -- batches and steps -----------------------------------------------------------------

    @override
    def batch_to_device(self, batch: Any, device: torch.device | None = None, dataloader_idx: int = 0) -> Any:
        batch = super().batch_to_device(batch, device, dataloader_idx)
        assert self._sharder is not None, "MQSPStrategy.setup() has not run"
        batch = self._sharder.shard(batch)
        self.sequence_parallel.full_length = self._sharder.last_full_length
        self.sequence_parallel.document_ids = self._sharder.last_document_ids
        return batch

    @contextmanager
    def _routing(self) -> Iterator[None]:
        """Attention calls go through MQSP: in steps, and in backward, where activation checkpointing recomputes them."""
        with activate(self.sequence_parallel), RouteScaledDotProductAttention(self.sequence_parallel):
            yield

    @contextmanager
    def _sequence_parallel_step(self, step_name: str) -> Iterator[None]:
        """Route attention for the step; on the first step of each kind, audit that it was routed."""
        assert self._audit is not None
        with self._routing():
            if step_name in self._audited_steps:
                yield
                return
            with self._audit.audit(self.sequence_parallel, step_name):
                yield
            self._audited_steps.add(step_name)

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        with ExitStack() as stack:
            stack.enter_context(self._sequence_parallel_step("training_step"))
            if self._layer_offload is not None:  # the first layers' checkpoints go to host memory
                stack.enter_context(self._layer_offload.saved_tensors(prefetch=self.offload_prefetch))
            elif self.offload_activations:  # what the forward saves for backward goes to host memory
                stack.enter_context(offload.offloaded_saved_tensors(prefetch=self.offload_prefetch))
            return super().training_step(*args, **kwargs)

    @override
    def backward(self, closure_loss: Tensor, optimizer: Optimizer | None, *args: Any, **kwargs: Any) -> Tensor:
        with self._routing():
            return super().backward(closure_loss, optimizer, *args, **kwargs)

    @override
    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        with self._sequence_parallel_step("validation_step"):
            return super().validation_step(*args, **kwargs)

    @override
    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        with self._sequence_parallel_step("test_step"):
            return super().test_step(*args, **kwargs)

    @override
    def predict_step(self, *args: Any, **kwargs: Any) -> Any:
        """The step's outputs, with every [batch, local sequence, ...] tensor as ``predict_outputs`` says: this rank's
        shard, or gathered back to full length (in order, without padding) on the group's first rank or on all."""
        with self._sequence_parallel_step("predict_step"):
            outputs = super().predict_step(*args, **kwargs)
        if self.predict_outputs == "shard":
            return outputs
        assert self._sharder is not None and self._sharder.last_full_length is not None
        full_length = self._sharder.last_full_length
        local_length = self._sharder.padded_length(full_length) // self.sequence_parallel_size
        return gather_outputs(outputs, local_length, self.sequence_parallel_group, self.layout, full_length,
                              first_rank_only=self.predict_outputs == "first_rank")
