"""Peak memory per rank of one training step of a Hugging Face model, estimated without running it (fake tensors).

One step = forward, backward and an AdamW step (optimizer state already allocated, as in every step after the first),
at full sequence length L split over P sequence-parallel ranks (batch 1 by default), with MQSP attention in every
layer and everything else on this rank's l = L / P tokens. The step runs under ``FakeTensorMode`` (no storage is
allocated, no arithmetic done) on a fake process group of P ranks, and ``MemTracker`` records the peak of live tensor
bytes, by category, and the host memory the recipe's offload holds. The same code measures a real step on a real
process group: that is how the estimate is validated (``tests/test_estimate.py``). ``lightning-mqsp plan --verify``
runs it for one point; ``benchmarks/estimate_memory.py`` adds the baseline methods and writes ``docs/scaling.md``'s
tables (the other attention methods register themselves in :data:`ATTENTION_METHODS`).

What a fake CPU run cannot see, and what is assumed about it (``docs/scaling.md``):
- Memory inside kernels (flash-attention tiles, GEMM workspaces), the CUDA context and allocator fragmentation:
  the budgets are read as bytes of live tensors, in decimal GB.
- Attention kernels: ``attention_backend="triton"`` counts the GPU kernels' outputs from their fake
  implementations; ``cpu_flash`` is aten's CPU flash kernel, measurable on this CPU.
- Mixed precision is CPU autocast (softmax and layer_norm in bf16, where CUDA autocast runs them in float32).
- Causal models are estimated with non-causal attention (a fused kernel allocates no mask).
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
import transformers
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.testing._internal.distributed.fake_pg import FakeStore
from transformers import AttentionInterface, AutoModelForCausalLM, BertConfig, BertForMaskedLM, PretrainedConfig, PreTrainedModel

import lightning_mqsp.offload
from lightning_mqsp import chunked_causal_lm_cross_entropy, mqsp_attention
from lightning_mqsp.adapters.huggingface import enable_activation_checkpointing
from lightning_mqsp.comm import ProcessGroup
from lightning_mqsp.layer_offload import layer_offload
from lightning_mqsp.models import model_config
from lightning_mqsp.strategy_fsdp import make_root, shard_huggingface_model
from lightning_mqsp.tiling import tile_token_wise

GB = 10**9
GiB = 2**30

#: Gathered query rows per MQSP micro-step in the estimates (micro_q_size = this / P). A fake run
#: costs ~1 ms per dispatched op, so the step count sets its time; --micro-q-sweep shows the
#: training step's peak does not change from 512 to 131,072 gathered rows (it is not in attention).
ESTIMATE_GATHERED_ROWS = 32768
PRECISIONS = ("32-true", "bf16-mixed", "bf16-true")
#: Layer counts of the two fake runs a full-depth peak is extrapolated from.
PROBE_LAYERS = (1, 2)
#: The same for the Llama training recipes: with a layer's recompute and the embedding and head gradients in the
#: step, the peak is affine in depth only from three layers on (from (1, 2) the 32-layer peak of llama-8b's full
#: recipe came out 84% too high at L = 262,144, P = 8: 48.9 GB against 26.6 GB for a full-depth fake run).
RECIPE_PROBE_LAYERS = (3, 4)
#: Each recipe search checks its length with a fake run this deep against the probes' line. On long sequences the
#: peak is in a layer's backward and the line is exact (L = 5.6M, P = 8: 60,637,182,772 B both ways); on short ones
#: it moves to the end of backward, with every layer's gradient shard, whose per-layer slope is steeper (L = 262,144,
#: P = 8, full recipe: from 6 layers on; the 32-layer peak 11.5% above the line through 3 and 4 layers).
RECIPE_CHECK_LAYERS = 8


#: Training recipes, each adding to the one before: replicated parameters (DDP); parameters, gradients and AdamW
#: state sharded over the P ranks (MQSPFSDPStrategy); activation checkpointing of every decoder layer; the kept
#: hidden states and the attention's queries offloaded to host memory, the attention's backward one key/value head at a
#: time, the loss computed in chunks and the MLPs and norms in tiles (the full recipe); and the sharded parameters, their
#: gradients and AdamW state in host memory too (``offload_parameters=True``).
RECIPES = ("ddp", "sharded", "checkpointed", "full", "host_parameters")
RECIPE_LABELS = {
    "ddp": "MQSP, DDP (replicated parameters)", "sharded": "MQSP + FSDP2 sharding",
    "checkpointed": "MQSP + sharding + activation checkpointing",
    "full": "MQSP full recipe (sharding, checkpointing, offload, attention by head group, chunked loss, tiled MLP and norms)",
    "host_parameters": "MQSP full recipe + parameters, gradients and AdamW state in host memory (`offload_parameters`)",
}
#: The recipes that keep what the forward saves in host memory, and compute the loss and MLPs in pieces.
_FULL_RECIPES = ("full", "host_parameters")
#: Tokens per chunk of the chunked loss, and per tile of the tiled MLPs and norms, in the full recipe.
LOSS_CHUNK = MLP_TILE = 4096
#: Attention stand-ins besides MQSP, by name: ``attention(q, k, v, group) -> out`` ([B, H, l, D]); the
#: benchmarks register the baseline methods here.
AttentionFn = Callable[[Tensor, Tensor, Tensor, "ProcessGroup | None"], Tensor]
ATTENTION_METHODS: dict[str, AttentionFn] = {}


@dataclass(frozen=True)
class Setup:
    """One training step to measure: ``model`` (a built-in name of :data:`lightning_mqsp.models.MODELS`, or a config)
    at full length ``length`` over ``world_size`` ranks."""

    model: str | PretrainedConfig
    method: str
    length: int
    world_size: int
    precision: str = "bf16-mixed"
    batch: int = 1
    num_layers: int | None = None  # None: the model's own depth
    micro_q_size: int | None = None  # MQSP only; None: ESTIMATE_GATHERED_ROWS / P
    recipe: str = "ddp"  # one of RECIPES
    #: MQSP's local kernel: "cpu_flash" (measurable on this CPU), or "triton": the GPU kernels' footprint, from their
    #: fake implementations (estimates only: a real CPU step cannot run them).
    attention_backend: str = "cpu_flash"
    #: AdamW's foreach implementation (the CUDA default, whose temporaries span every parameter at once), or one
    #: parameter at a time (the footprint of the fused CUDA kernel, ``fused=True``, which long runs should use).
    optimizer_foreach: bool = True
    #: The full recipes: how many decoder layers, the first ones, keep their checkpoints in host memory (None: all),
    #: as the strategies' ``offload_activation_layers``.
    offload_layers: int | None = None
    #: The full recipes: the strategies' ``offload_prefetch`` (the next layer's checkpoint brought back ahead).
    offload_prefetch: bool = True
    #: The full recipes: the strategies' ``offload_queries`` (the attention's queries in host memory through backward).
    offload_queries: bool = True

    @property
    def local_length(self) -> int:
        return self.length // self.world_size

    def config(self) -> PretrainedConfig:
        if isinstance(self.model, str):
            config = model_config(self.model, self.length)
        else:  # a copy whose learned position table, if it has one, holds every position
            config = self.model.__class__.from_dict(self.model.to_dict())
            for key in ("max_position_embeddings", "n_positions"):
                if hasattr(config, key):
                    setattr(config, key, max(getattr(config, key), self.length))
        if self.num_layers is not None:
            config.num_hidden_layers = self.num_layers
        return config


@dataclass(frozen=True)
class StepMemory:
    """Peak live tensor bytes of one training step on this rank, and their MemTracker categories at that moment;
    with offload, the peak of the bytes held in host memory instead."""

    peak_bytes: int
    by_category: dict[str, int]
    host_peak_bytes: int = 0


def attention_heads(config: PretrainedConfig) -> tuple[int, int]:
    """(heads, head_dim) of the model's attention."""
    return config.num_attention_heads, getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class _AttentionThatCostsNothing(torch.autograd.Function):
    """An attention stand-in that saves nothing and allocates only its output: a step with it, subtracted from a
    step with MQSP, is the memory MQSP's attention itself needs (its share of the peak)."""

    @staticmethod
    def forward(ctx: Any, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        ctx.shapes = (key.shape, value.shape)
        return torch.empty_like(query)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return torch.empty_like(grad), grad.new_empty(ctx.shapes[0]), grad.new_empty(ctx.shapes[1])


def method_attention(setup: Setup) -> AttentionFn:
    """The method's ``attention(q, k, v, group)``; MQSP with the setup's micro-step size; "none": attention that costs nothing."""
    if setup.method == "none":
        return lambda q, k, v, group: _AttentionThatCostsNothing.apply(q, k, v)
    if setup.method == "mqsp":
        micro_q_size = setup.micro_q_size or max(1, min(setup.local_length, ESTIMATE_GATHERED_ROWS // setup.world_size))
        # The full recipes' strategy options: offload_activations (queries in host memory through backward) and
        # attention_head_groups set to the model's key/value heads (float32 dK/dV for one head at a time).
        full = setup.recipe in _FULL_RECIPES
        return lambda q, k, v, group: mqsp_attention(
            q, k, v, group=group, micro_q_size=micro_q_size, backend=setup.attention_backend,
            head_groups=setup.config().num_key_value_heads if full else 1, offload_queries=full and setup.offload_queries)
    if setup.method not in ATTENTION_METHODS:
        raise ValueError(f"method must be 'mqsp', 'none' or one of {sorted(ATTENTION_METHODS)}, got {setup.method!r}")
    return ATTENTION_METHODS[setup.method]


def register_attention(setup: Setup, group: ProcessGroup | None) -> str:
    """Register the setup's method with Hugging Face's attention interface; returns the name."""
    attention = method_attention(setup)

    def hf_attention(
        module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
        dropout: float = 0.0, scaling: float | None = None, **kwargs: Any,
    ) -> tuple[Tensor, None]:
        # Unmasked full-length training: no padding, and causal models are estimated non-causally (module docstring).
        return attention(query, key, value, group).transpose(1, 2).contiguous(), None

    name = f"estimate_{setup.method}"
    AttentionInterface.register(name, hf_attention)
    return name


def _precision_context(precision: str) -> Any:
    if precision == "bf16-mixed":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    if precision in PRECISIONS:
        return nullcontext()
    raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")


def new_model(config: PretrainedConfig) -> PreTrainedModel:
    """The model of a config: BERT's masked-LM model, any other's causal LM (on the current default device)."""
    return BertForMaskedLM(config) if isinstance(config, BertConfig) else AutoModelForCausalLM.from_config(config)


def build_model(setup: Setup, group: ProcessGroup | None) -> PreTrainedModel:
    model = new_model(setup.config())
    model.set_attn_implementation(register_attention(setup, group))
    return model.bfloat16() if setup.precision == "bf16-true" else model


def _allocate_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Run one step on zero gradients so AdamW's moments exist, as they do in every step after the first."""
    for param in model.parameters():
        param.grad = torch.zeros_like(param)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def measure_training_step(setup: Setup, group: ProcessGroup | None = None) -> StepMemory:
    """Build the model, then run one training step on this rank's tokens under MemTracker.

    Real or fake, whichever tensors and process group are active: on a real process group (or
    none, for P = 1) it measures, under ``fake_world`` it estimates."""
    if comm_size(group) != setup.world_size:
        raise ValueError(f"setup is for {setup.world_size} ranks, the process group has {comm_size(group)}")
    if setup.length % setup.world_size != 0:
        raise ValueError(f"length {setup.length} does not split over {setup.world_size} ranks")
    if setup.recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {RECIPES}, got {setup.recipe!r}")
    rank = dist.get_rank(group) if setup.world_size > 1 else 0
    model = build_model(setup, group)
    model.train()
    if setup.recipe in ("checkpointed", *_FULL_RECIPES):
        enable_activation_checkpointing(model)
    if setup.recipe in _FULL_RECIPES:
        tile_token_wise(model, MLP_TILE)
    if setup.recipe != "ddp":
        _shard(model, setup)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=setup.optimizer_foreach)
    _allocate_optimizer_state(model, optimizer)
    config = model.config
    input_ids = torch.randint(0, config.vocab_size, (setup.batch, setup.local_length))
    positions = torch.arange(rank * setup.local_length, (rank + 1) * setup.local_length).expand(setup.batch, -1)
    saved_tensors: Any = nullcontext()
    if setup.recipe in _FULL_RECIPES:  # the strategies' offload_activations (and offload_activation_layers)
        if setup.offload_layers is None:
            saved_tensors = lightning_mqsp.offload.offloaded_saved_tensors(prefetch=setup.offload_prefetch)
        else:
            selected = layer_offload([model], setup.offload_layers)
            selected.attach()
            saved_tensors = selected.saved_tensors(prefetch=setup.offload_prefetch)

    host = _HostMemory()
    tracker = _DeviceMemTracker(model, parameters_on_host=setup.recipe == "host_parameters", host=host)
    tracker.track_external(model, optimizer)
    with tracker, host.installed():  # the queries too: a layer's recompute offloads them in backward
        with _precision_context(setup.precision), saved_tensors:
            if setup.recipe in _FULL_RECIPES:
                hidden = model.base_model(input_ids=input_ids, position_ids=positions).last_hidden_state
                loss = _ChunkedLoss(model.get_output_embeddings())(hidden, input_ids)
                del hidden  # a training step's loss() returns the loss alone: nothing else holds the hidden states
            else:
                loss = model(input_ids=input_ids, position_ids=positions, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    peak = tracker.device_peak_snapshot
    total = peak.pop("Total")
    return StepMemory(peak_bytes=total, by_category={str(getattr(k, "value", k)): v for k, v in peak.items() if v},
                      host_peak_bytes=max(host.peak_bytes, tracker.host_peak_bytes))


class _DeviceMemTracker(MemTracker):
    """MemTracker, and with ``parameters_on_host`` the device's share of its tally: FSDP2's ``CPUOffloadPolicy`` keeps
    the parameter shards, their gradients and the optimizer state in host memory and steps the optimizer there, which
    a CPU run (one device) cannot show. The device's bytes are then the total less the storages of the shards and
    their gradients (looked up after every op: a gradient shard goes to the host as soon as it is reduced) and less
    everything the optimizer holds or makes (MemTracker's optimizer category). The unsharded parameters a layer
    gathers while it runs, and its unsharded gradients, stay on the device. Overrides ``_update_peak_stats``, which
    MemTracker calls after every op (torch 2.13, pinned by the Makefile), and keeps only the global peak: MemTracker's
    per-module peaks, which nothing here reads, cost a walk over every tracked module after every op (a third of a
    P=32 fake run's time). Its host peak is of the parameters' bytes and ``host``'s offloaded activations together, at
    the same moment (a sum of their two peaks would count the gradient shards, which exist only once backward has
    freed most activations, on top of every activation)."""

    def __init__(self, model: torch.nn.Module, parameters_on_host: bool, host: _HostMemory) -> None:
        super().__init__()
        # The shards, taken now: while a layer runs, FSDP2 registers its unsharded parameters on the module instead.
        self._shards, self._parameters_on_host = list(model.parameters()), parameters_on_host
        self._device_peak: dict[str, int] = {}
        self._counted: tuple[list[Tensor | None], list[Any]] | None = None
        self.host_peak_bytes = 0
        self._host = host

    @property
    def device_peak_snapshot(self) -> dict[Any, int]:
        """The categories at the device's peak, with its "Total"."""
        if not self._parameters_on_host:
            return self.get_tracker_snapshot("peak")[torch.device("cpu")]
        return dict(self._device_peak)

    def _host_bytes(self) -> int:
        """Bytes of the parameter shards and their gradients (outside the optimizer category); recounted only when a
        gradient changed (this runs after every op)."""
        grads = [param.grad for param in self._shards]
        if self._counted is None or any(g is not c for g, c in zip(grads, self._counted[0])):
            tensors = [t for t in (*self._shards, *grads) if t is not None]
            # The local tensor of a DTensor by its attribute: to_local() would dispatch ops into this very tracker.
            storages = {id(s): s for s in (getattr(t, "_local_tensor", t).untyped_storage() for t in tensors)}
            winfos = [self._WINFO.get(s, (None, None))[0] for s in storages.values()]
            self._counted = (grads, [w for w in winfos if w is not None and w.reftype != _MemRefType.OPT])
        return sum(w.mem_consumed for w in self._counted[1])

    def _update_peak_stats(self, peak_state: Any) -> None:
        cpu = torch.device("cpu")
        snap = self._curr_mem_snap.get(cpu)
        if snap is None:
            return
        if self._peak_mem.get(cpu, 0) < snap["Total"]:
            self._peak_mem[cpu], self._peak_mem_snap[cpu] = snap["Total"], dict(snap)
        if not self._parameters_on_host:
            return
        host = self._host_bytes() + snap[_MemRefType.OPT]
        self.host_peak_bytes = max(self.host_peak_bytes, host + self._host.bytes)
        if snap["Total"] - host > self._device_peak.get("Total", 0):
            self._device_peak = {**snap, "In host memory": -host, "Total": snap["Total"] - host}


class _ChunkedLoss(torch.nn.Module):
    """The chunked causal-LM loss as a module: MemTracker follows a module (the head) called once per chunk only
    inside another module."""

    def __init__(self, head: torch.nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, hidden: Tensor, labels: Tensor) -> Tensor:
        return chunked_causal_lm_cross_entropy(hidden, self.head, labels, chunk_size=LOSS_CHUNK)


class _HostMemory:
    """Host memory for the accounting of a CPU run: while :meth:`installed`, :mod:`lightning_mqsp.offload`'s copies
    (what the strategies' ``offload_activations`` hooks and MQSP's ``offload_queries`` make) are ``meta`` tensors of
    their size, counted from the copy until they are freed, and reading one back gives zeros of its shape (values do
    not matter to a memory measurement). The real hooks run: the estimate offloads what the strategy offloads."""

    def __init__(self) -> None:
        self.bytes = self.peak_bytes = 0

    @contextmanager
    def installed(self) -> Iterator[None]:
        # to_device, and the copy back that the saved-tensor hooks start ahead of use (their prefetch), without a wait
        offload = lightning_mqsp.offload
        replaced = offload.to_host, offload.to_device, offload._start_to_device
        offload.to_host, offload.to_device = self.to_host, self.to_device  # type: ignore[assignment]
        offload._start_to_device = lambda tensor, device: (self.to_device(tensor, device), None)  # type: ignore[assignment]
        try:
            yield
        finally:
            offload.to_host, offload.to_device, offload._start_to_device = replaced

    def to_host(self, tensor: Tensor) -> Tensor:
        """A copy in host memory; a tensor there already (an offloaded query, or a view of one) stays as it is, as
        ``offload.to_host`` keeps it. Indices and masks stay too: tiny, and their values matter even here."""
        if not tensor.is_floating_point() or self.on_host(tensor):
            return tensor
        nbytes = tensor.numel() * tensor.element_size()  # the copy holds the tensor, not all of its storage
        self.bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.bytes)
        copy = tensor.to("meta")
        weakref.finalize(copy, self._release, nbytes)
        return copy

    def to_device(self, tensor: Tensor, device: torch.device) -> Tensor:
        return torch.zeros(tensor.shape, dtype=tensor.dtype, device=device) if self.on_host(tensor) else tensor

    def on_host(self, tensor: Tensor) -> bool:
        return tensor.device.type == "meta"

    def _release(self, nbytes: int) -> None:
        self.bytes -= nbytes


_world_meshes: dict[int, DeviceMesh] = {}


def _shard(model: PreTrainedModel, setup: Setup) -> None:
    """FSDP2 over all ranks, as MQSPFSDPStrategy shards a Hugging Face model (its ``shard_huggingface_model`` and
    ``make_root``), with its bf16 mixed-precision policy under bf16-mixed."""
    mesh = _world_meshes.get(setup.world_size) or init_device_mesh("cpu", (setup.world_size,))
    policy = MixedPrecisionPolicy()
    if setup.precision == "bf16-mixed":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    offload = CPUOffloadPolicy(pin_memory=False) if setup.recipe == "host_parameters" else OffloadPolicy()
    shard_huggingface_model(model, partial(fully_shard, mesh=mesh, mp_policy=policy, offload_policy=offload))
    make_root(model)


def comm_size(group: ProcessGroup | None) -> int:
    return dist.get_world_size(group) if dist.is_initialized() else 1


@contextmanager
def fake_world(world_size: int) -> Iterator[None]:
    """Fake tensors on a fake process group of ``world_size`` ranks, as seen from rank 0."""
    if dist.is_initialized():
        raise RuntimeError("fake_world needs a process without a process group; one is already initialised")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    # A device mesh reads its rank table on the host, which a fake tensor cannot answer: build it before.
    _world_meshes[world_size] = init_device_mesh("cpu", (world_size,))
    try:
        with ExitStack() as stack:
            stack.enter_context(FakeTensorMode())
            yield
    finally:
        del _world_meshes[world_size]
        dist.destroy_process_group()


def estimate_training_step(setup: Setup) -> StepMemory:
    """The setup's peak per rank from a fake run (no memory allocated, seconds at any length)."""
    with fake_world(setup.world_size):
        return measure_training_step(setup)


def extrapolated_peak(setup: Setup) -> int:
    """Full-depth peak from two shallow fake runs: every layer adds the same saved activations, so
    the peak is affine in the layer count (checked by ``check_layer_linearity``)."""
    return extrapolated_memory(setup)[0]


def extrapolated_memory(setup: Setup, probe_layers: tuple[int, int] = PROBE_LAYERS) -> tuple[int, int]:
    """(device peak, host peak) at full depth from fake runs of ``probe_layers`` layers (both affine in the layer
    count from there on); a model no deeper than the probes is run whole."""
    depth = setup.config().num_hidden_layers
    if depth <= probe_layers[1]:
        whole = estimate_training_step(replace(setup, num_layers=depth))
        return whole.peak_bytes, whole.host_peak_bytes
    return _at_depth(_probes(setup, probe_layers), probe_layers, depth)


def _probes(setup: Setup, probe_layers: tuple[int, int]) -> tuple[StepMemory, StepMemory]:
    shallow, deeper = (estimate_training_step(replace(setup, num_layers=n)) for n in probe_layers)
    return shallow, deeper


def _at_depth(probes: tuple[StepMemory, StepMemory], probe_layers: tuple[int, int], depth: int) -> tuple[int, int]:
    """(device peak, host peak) at ``depth`` on the line through the probes."""
    shallow, deeper = probes
    layers = (depth - probe_layers[0]) / (probe_layers[1] - probe_layers[0])
    return (int(shallow.peak_bytes + layers * (deeper.peak_bytes - shallow.peak_bytes)),
            int(shallow.host_peak_bytes + layers * (deeper.host_peak_bytes - shallow.host_peak_bytes)))


def quiet() -> None:
    """MemTracker's module hooks warn once per module about weak references under fake tensors: thousands of lines in
    a length search."""
    warnings.filterwarnings("ignore", message="Module is None")
    transformers.logging.set_verbosity_error()


