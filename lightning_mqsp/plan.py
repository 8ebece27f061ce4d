"""``lightning-mqsp plan``: before a launch, how long a sequence each training recipe trains, with how much device and
host memory per rank, at what step time, and with which options.

    lightning-mqsp plan --model llama-3.1-8b --gpus 8
    lightning-mqsp plan --model path/to/config.json --gpus 32 --length 8388608 --write-config run.yaml
    python -m lightning_mqsp.plan --model qwen3-8b --gpus 4 --device-memory-gb 40 --json

Memory comes from an analytic model of what each recipe keeps (:func:`device_bytes`, :func:`host_bytes`): the
parameter, gradient and AdamW states of each recipe from the model's parameter count, what every decoder layer keeps
for backward, and the working set at the step's peak, per token and fixed. Its coefficients are byte counts of the
tensors the fake-tensor estimator (:mod:`lightning_mqsp.estimate`) sees at the peak; ``--verify`` runs that estimator
for one point (minutes at long lengths) and prints both. Time comes from FLOPs, a kernel-efficiency table and the link
bandwidths (:func:`step_time`); every assumption is printed with the table. ``docs/scaling.md`` says how it was
checked and how far it can be trusted.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, PretrainedConfig

from lightning_mqsp.adapters.huggingface import absolute_position_limit
from lightning_mqsp.attention import backward_row_width, communication_bytes
from lightning_mqsp.estimate import ESTIMATE_GATHERED_ROWS, LOSS_CHUNK, MLP_TILE, RECIPE_LABELS, RECIPES, new_model
from lightning_mqsp.layer_offload import decoder_layers
from lightning_mqsp.models import MODELS, model_config

GB = 10**9
#: Lengths the planner returns are multiples of this many tokens per rank.
LOCAL_GRANULARITY = 1024
#: Recipes that offload the activation checkpoints (and so may offload only some layers' of them).
OFFLOADING_RECIPES = ("full", "host_parameters")


@dataclass(frozen=True)
class ModelShape:
    """What the memory and time models need of a model: widths, depth and parameter counts (counted on the meta
    device, so any architecture's biases and norms are in them)."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    parameters: int
    layer_parameters: int  # one decoder layer's
    embedding_parameters: int  # the input embeddings and, untied, the output head: vocabulary x hidden, once or twice
    decoder: bool  # a causal LM (the loss is causal; BERT's is masked)
    position_table: int  # rows of a learned absolute position table (0: none), which must hold every position of L
    qk_norm: bool  # query and key norms in the attention (Qwen3)

    def parameters_at(self, length: int) -> int:
        """Parameters at full length ``length``: a learned position table grows to hold every position."""
        return self.parameters + (max(0, length - self.position_table) * self.hidden if self.position_table else 0)

    @property
    def query_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    @classmethod
    def of(cls, name: str, config: PretrainedConfig) -> ModelShape:
        with torch.device("meta"):
            model = new_model(config)
        # The repeated block (BERT lists its embeddings among the classes FSDP must not split, too).
        candidates = decoder_layers(model)
        layers = [layer for layer in candidates if type(layer) is type(candidates[-1])]
        heads = config.num_attention_heads
        embeddings = {id(p): p.numel() for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None
                      for p in m.parameters() if p.dim() == 2}
        return cls(
            name=name, hidden=config.hidden_size, layers=len(layers), heads=heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            intermediate=config.intermediate_size, vocab=config.vocab_size,
            parameters=sum(p.numel() for p in model.parameters()),
            layer_parameters=sum(p.numel() for p in layers[0].parameters()),
            embedding_parameters=sum(embeddings.values()), decoder="Bert" not in type(config).__name__,
            qk_norm=any(name.endswith("k_norm") for name, _ in layers[0].named_modules()),
            position_table=(absolute_position_limit(model) or ("", 0))[1],
        )


def load_config(model: str) -> tuple[str, PretrainedConfig]:
    """(name, config) of a built-in shape or of a local ``config.json`` (or the folder holding one); never a download."""
    if model in MODELS:
        return model, model_config(model, LOCAL_GRANULARITY)
    path = Path(model)
    if path.is_file() or (path / "config.json").is_file():
        return (path.parent.name if path.is_file() else path.name), AutoConfig.from_pretrained(str(path), local_files_only=True)
    raise ValueError(f"unknown model {model!r}: built-in shapes are {', '.join(sorted(MODELS))}; or give the path of a "
                     "local config.json (or of the folder holding it)")


# -- memory -----------------------------------------------------------------------------------------------------------
#
# bf16-mixed, as the recipes run it (FSDP2 with bf16 parameters and float32 master weights and reduction; DDP with
# float32 parameters under autocast). t = batch x l tokens on a rank, d layers, N parameters, p one layer's, E the
# embedding parameters (input and, untied, output), h, q, kv, i, D the hidden, query, key/value, MLP and head widths, V
# the vocabulary; bytes. Where each recipe peaks, and what is live there (docs/scaling.md, "The planner"):
#
# - DDP, sharding, checkpointing: in the loss, after the forward, before any gradient: the float32 parameters and
#   AdamW's two moments (12 bytes a parameter, over P when sharded), what every layer keeps for backward, and the
#   [t, V] logits in bf16 and float32 with the float32 softmax (12V a token) next to the last hidden states (8h + 4D +
#   12). A layer keeps, without checkpointing, its activations (sharded, bf16: 16h + 4q + 4kv + 8i + 2D + 8; DDP under
#   autocast, float32 residuals: 25h + 4.5q + 8.5kv + 7.75i + 10D + 4, and the bf16 copy of its weights, 2p), and with
#   checkpointing its bf16 input hidden states (2h). DDP also keeps the head's bf16 weights (2Vh).
# - The full recipes: in a layer's backward, the loss done in chunks: AdamW's states and the embeddings' gradient
#   shards (none on the device with offload_parameters); the layer's and the next layer's gathered bf16 parameters
#   (FSDP2 prefetches one; the first layer none), with the float32 gradient buffer FSDP2 keeps until the next
#   reduce-scatter (the previous layer's, 4p; the untied head's goes at the final norm's, a unit of its own; a tied
#   head stays gathered with the model, 2Vh); the gradient shards of the layers done; and the largest of three
#   moments, with 2(q + kv) more a token where queries and keys have norms (Qwen3), 2h a token for each layer whose
#   checkpoint stays on the device and for the next layer's checkpoint when it is prefetched (offload_prefetch), 2q at
#   the first two moments when the queries stay on the device (offload_queries), and 6D + 16 for the rotary tables
#   and positions. The norms are fused into what they feed (lightning_mqsp/tiling.py), so no norm's output is among
#   them:
#   - the MLP's backward: the layer's input, the gradient flowing back, the residual the MLP adds to, its tiles' input
#     gradients, and the attention output, keys and values kept for attention's backward (6h + 2q + 4kv a token); the
#     MLP's unsharded bf16 weight gradients (6hi) and a tile's temporaries (8 MLP_TILE i);
#   - the attention's backward: the input and the gradient flowing back, the output gradient and dQ, keys, values and
#     their gradients, one key/value head's float32 dK and dV, the row statistics and delta (4h + 4q + 8kv + 8D + 12H a
#     token); the micro-step's buffers (:func:`attention_step_bytes`) and the layer's weight gradients so far
#     (6hi + 2qh);
#   - the rotary embedding's backward on dQ (the peak of models with few key/value heads): the input, the gradient,
#     dQ and the three q-sized temporaries of Hugging Face's rotary backward, dK and dV (4h + 8q + 4kv a token), and
#     the layer's weight gradients so far.
#   On shorter sequences they peak in the loss instead: a chunk's float32 logits, softmax and gradient (LOSS_CHUNK_BYTES
#   a chunk token and vocabulary entry) next to the hidden states (4h + 3D a token).
# - Every recipe, on short sequences: at the optimizer step, with every float32 gradient and AdamW's temporaries for
#   its largest tensor (8 bytes an element of the Vh embeddings).
#
# Each term is a byte count of tensors the fake-tensor estimator (lightning_mqsp.estimate) sees at that moment;
# tests/test_plan.py checks points of Llama-3.1-8B and others against it, docs/scaling.md lists the rest.

def attention_step_bytes(heads: int, head_dim: int) -> int:
    """Bytes a micro-step of the attention's backward holds per gathered row (the fake-tensor estimator's): the rows of
    queries, output gradients and statistics in bf16 with their prefetched successor, and a float32 partial dQ, of every
    head (a head group's step takes as many more rows as it has fewer heads)."""
    return heads * (2 * 2 * backward_row_width(head_dim, torch.bfloat16) + 4 * head_dim)


#: Bytes the chunked loss holds per chunk token per vocabulary entry (float32 logits, their softmax and gradient).
LOSS_CHUNK_BYTES = 14.05


@dataclass(frozen=True)
class Point:
    """One recipe at one length on P ranks, with ``offloaded_layers`` of the layers offloading their checkpoints."""

    recipe: str
    length: int
    world_size: int
    batch: int = 1
    offloaded_layers: int | None = None  # None: every layer (offloading recipes only)
    prefetch: bool = True  # offload_prefetch: the next layer's checkpoint brought back while a layer's backward runs
    queries_on_host: bool = True  # offload_queries: the attention's queries in host memory through backward

    @property
    def tokens(self) -> int:
        """Tokens on a rank."""
        return self.batch * (self.length // self.world_size)


def _offloaded(shape: ModelShape, point: Point) -> int:
    if point.recipe not in OFFLOADING_RECIPES:
        return 0
    return shape.layers if point.offloaded_layers is None else point.offloaded_layers


def device_bytes(shape: ModelShape, point: Point) -> int:
    """The device's peak of live tensor bytes on one rank (the fake-tensor estimator's quantity): the largest of the
    moments the step can peak at (see above)."""
    recipe, t, p, d, n = point.recipe, point.tokens, point.world_size, shape.layers, shape.parameters_at(point.length)
    h, q, kv, i, D, V = shape.hidden, shape.query_width, shape.kv_width, shape.intermediate, shape.head_dim, shape.vocab
    shards = 1 if recipe == "ddp" else p
    # The optimizer step: every float32 gradient, and AdamW's temporaries for its largest tensor (the embeddings).
    optimizer_step = (16 * n + 8 * V * h) // shards
    if recipe in OFFLOADING_RECIPES:
        states = 0 if recipe == "host_parameters" else 12 * n // p
        embedding_gradients = 4 * shape.embedding_parameters // p if recipe == "full" else 0
        layer_bytes = 2 * shape.layer_parameters  # a layer's bf16 parameters
        tied = shape.embedding_parameters == V * h
        offloaded = _offloaded(shape, point)
        kept = (d - offloaded) * 2 * h
        per_token = 6 * D + 16 + (2 * (q + kv) if shape.qk_norm else 0) + kept
        mlp_gradients, output_gradients = 6 * h * i, 2 * q * h  # the layer's unsharded bf16 weight gradients so far
        step = attention_step_bytes(shape.heads, D) * min(point.length, ESTIMATE_GATHERED_ROWS) * point.batch

        def layer_backward(prefetched_unit: int, prefetched_per_token: int, layers_done: int) -> float:
            """A layer's peak, with the next unit's bf16 parameters and the next checkpoint prefetched (or not), after
            ``layers_done`` layers' backward (their float32 gradient shards, on the device unless offload_parameters)."""
            # this layer's bf16 parameters and the previous layer's float32 gradient buffer (4p: twice layer_bytes)
            fixed = states + embedding_gradients + 3 * layer_bytes + prefetched_unit + (2 * V * h if tied else 0)
            fixed += layers_done * 4 * shape.layer_parameters // p if recipe == "full" else 0
            token = per_token + prefetched_per_token
            queries = 0 if point.queries_on_host else 2 * q  # from the recomputation through attention's backward
            mlp_backward = fixed + mlp_gradients + 8 * MLP_TILE * i + t * (6 * h + 2 * q + 4 * kv + queries + token)
            fixed += mlp_gradients + output_gradients
            attention_backward = fixed + step + t * (4 * h + 4 * q + 8 * kv + 8 * D + 12 * shape.heads + queries + token)
            rotary_backward = fixed + t * (4 * h + 8 * q + 4 * kv + token)
            return max(mlp_backward, attention_backward, rotary_backward)

        # The later a layer's backward, the more gradient shards beside it: the second layer's peak is the largest of
        # those that prefetch the next layer's parameters, and its checkpoint with offload_prefetch; the first layer
        # has neither (the embeddings are not gathered ahead, see strategy_fsdp.shard_huggingface_model).
        later_layer = layer_backward(layer_bytes, 2 * h if point.prefetch and offloaded else 0, max(0, d - 2))
        first_layer = layer_backward(0, 0, d - 1)
        loss_chunk = states + 2 * V * h + LOSS_CHUNK_BYTES * LOSS_CHUNK * V + t * (4 * h + 3 * D + kept)
        moments = [later_layer, first_layer, loss_chunk] + ([optimizer_step] if recipe == "full" else [])
        return int(max(moments))
    loss = 12 * V + 8 * h + 4 * D + 12
    if recipe == "ddp":
        layer = 25 * h + 4.5 * q + 8.5 * kv + 7.75 * i + 10 * D + 4
        forward = 12 * n + 2 * V * h + d * 2 * shape.layer_parameters + t * (d * layer + loss)
    else:
        layer = 16 * h + 4 * q + 4 * kv + 8 * i + 2 * D + 8 if recipe == "sharded" else 2 * h
        forward = 12 * n // p + t * (d * layer + loss)
    return int(max(forward, optimizer_step))


def host_bytes(shape: ModelShape, point: Point) -> int:
    """Host memory one rank holds at its peak: the offloaded checkpoints (bf16, 2h a token a layer), and the larger of
    what follows the last layer at the end of forward when every layer offloads (the final norm's input, 2h; the loss
    keeps its inputs on the device) and one layer's queries through its backward (2q); with ``offload_parameters``
    the float32 shards and AdamW's moments (12 bytes a parameter over P) and the untied head's gradient shard (the
    other gradient shards arrive as backward frees the checkpoints)."""
    if point.recipe not in OFFLOADING_RECIPES:
        return 0
    offloaded = _offloaded(shape, point)
    after_last = 2 * shape.hidden if offloaded == shape.layers else 0
    queries = 2 * shape.query_width if point.queries_on_host else 0
    activations = point.tokens * (2 * shape.hidden * offloaded + max(after_last, queries))
    if point.recipe != "host_parameters":
        return activations
    # The float32 shards and AdamW's moments, and from the loss's backward on the output head's gradient shard
    # (the other layers' arrive as backward frees their checkpoints).
    untied_head = shape.embedding_parameters - shape.vocab * shape.hidden  # 0 when tied to the input embeddings
    return activations + (12 * shape.parameters_at(point.length) + 4 * untied_head) // point.world_size


@dataclass(frozen=True)
class Budget:
    """Memory per rank: the device's, and the host's share of a node's (``host_per_node / gpus_per_node``)."""

    device_bytes: int
    host_bytes: int


def fits(shape: ModelShape, point: Point, budget: Budget) -> bool:
    return device_bytes(shape, point) <= budget.device_bytes and host_bytes(shape, point) <= budget.host_bytes


def fewest_offloaded_layers(shape: ModelShape, point: Point, budget: Budget) -> int | None:
    """The fewest layers that must offload their checkpoints for ``point`` to fit the device (each one kept costs the
    device 2h bytes a token and spares the host as much); None when no number fits both budgets."""
    kept_cost = 2 * shape.hidden * point.tokens
    everything = device_bytes(shape, replace(point, offloaded_layers=0))
    needed = 0 if everything <= budget.device_bytes else math.ceil((everything - budget.device_bytes) / kept_cost)
    # One more when the prefetched checkpoint (2h a token, from the first offloaded layer on) tips it over.
    for count in (needed, needed + 1):
        chosen = replace(point, offloaded_layers=count)
        if count <= shape.layers and device_bytes(shape, chosen) <= budget.device_bytes:
            return count if host_bytes(shape, chosen) <= budget.host_bytes else None
    return None


#: The offloading recipes' (offload_prefetch, offload_queries) in the order :func:`best_point` tries them: the copies
#: each saves first (prefetch hides the checkpoints' copies back; queries on the device make none), then memory.
OFFLOAD_CHOICES = ((True, False), (True, True), (False, False), (False, True))


def best_point(shape: ModelShape, point: Point, budget: Budget) -> Point | None:
    """``point`` with the layers to offload chosen (offloading recipes), prefetching the checkpoints and keeping the
    queries on the device unless only otherwise the point fits (``OFFLOAD_CHOICES``); None when it does not fit."""
    if point.recipe not in OFFLOADING_RECIPES:
        return point if fits(shape, point, budget) else None
    for prefetch, queries_on_host in OFFLOAD_CHOICES:
        candidate = replace(point, prefetch=prefetch, queries_on_host=queries_on_host)
        offloaded = fewest_offloaded_layers(shape, candidate, budget)
        if offloaded is not None:
            return replace(candidate, offloaded_layers=offloaded)
    return None


#: Longest sequence the search considers: 2^40 tokens.
MAX_LENGTH = 2**40


def longest_point(shape: ModelShape, recipe: str, world_size: int, budget: Budget, batch: int = 1) -> Point | None:
    """The longest length (a multiple of LOCAL_GRANULARITY tokens a rank) that fits both budgets, by bisection on the
    analytic model (memory grows with length); None if the shortest does not fit."""
    step = LOCAL_GRANULARITY * world_size

    def at(n: int) -> Point | None:
        return best_point(shape, Point(recipe, n * step, world_size, batch), budget)

    if at(1) is None:
        return None
    good, bad = 1, 2
    while at(bad) is not None and bad * step < MAX_LENGTH:
        good, bad = bad, bad * 2
    while bad - good > 1:
        middle = (good + bad) // 2
        good, bad = (middle, bad) if at(middle) is not None else (good, middle)
    return at(good)


# -- time ---------------------------------------------------------------------------------------------------------------


#: mqsp_attention's forward+backward TFLOP/s by "head_dim/causal", from benchmarks/RESULTS.md (one H200, S = 16384,
#: bf16; the H100 is taken to reach the same); a gpu_check.py JSON replaces them (--kernel-json).
ATTENTION_TFLOPS = {"64/False": 319.0, "64/True": 281.0, "128/False": 330.0, "128/True": 302.0}


@dataclass(frozen=True)
class Hardware:
    """The machine the plan is for; defaults: H100 SXM nodes of 8 GPUs (ALST's)."""

    gpus: int
    gpus_per_node: int = 8
    device_memory_gb: float = 80.0
    host_memory_gb_per_node: float = 1900.0
    peak_tflops: float = 989.0  # dense bf16, H100 SXM
    intra_node_gbps: float = 360.0  # GB/s a GPU sends within a node (NVLink 4, what NCCL's collectives reach)
    inter_node_gbps: float = 50.0  # GB/s a GPU sends to other nodes (one 400 Gb/s InfiniBand NIC per GPU)
    pcie_gbps: float = 25.0  # GB/s of a host copy in one direction (PCIe 5 x16, pinned, as measured copies reach)
    matmul_efficiency: float = 0.6  # fraction of the peak the linear layers reach (an assumption, not measured here)
    attention_tflops: dict[str, float] = field(default_factory=lambda: dict(ATTENTION_TFLOPS))
    host_adam_params_per_s: float = 2e9  # a rank's share of a host's CPU AdamW (offload_parameters)

    def budget(self) -> Budget:
        ranks_per_node = min(self.gpus, self.gpus_per_node)
        return Budget(int(self.device_memory_gb * GB), int(self.host_memory_gb_per_node * GB / ranks_per_node))


def attention_tflops_from_gpu_check(report: dict[str, Any]) -> dict[str, float]:
    """The longest sequence's forward+backward TFLOP/s of each head_dim and mask in a ``gpu_check.py`` report."""
    rows = [row for row in report.get("timings", {}).get("mqsp", []) if "fwd_bwd_tflops" in row]
    if not rows:
        raise ValueError("the gpu_check.py report has no timed mqsp rows (timings.mqsp[*].fwd_bwd_tflops): run it on a GPU")
    longest = {}
    for row in sorted(rows, key=lambda row: row["seq"]):
        longest[f"{row['head_dim']}/{row['causal']}"] = float(row["fwd_bwd_tflops"])
    return longest


def _attention_rate(hardware: Hardware, head_dim: int, causal: bool) -> float:
    table = hardware.attention_tflops
    key = f"{head_dim}/{causal}"
    if key in table:
        return table[key] * 1e12
    nearest = min(table, key=lambda k: (k.split("/")[1] != str(causal), abs(int(k.split("/")[0]) - head_dim)))
    return table[nearest] * 1e12


def step_time(shape: ModelShape, point: Point, hardware: Hardware, causal: bool = True) -> dict[str, Any]:
    """Seconds of one training step on a rank, by part, with what dominates and the MFU.

    Compute: the linear layers' 6 FLOPs a parameter a token (forward, and backward's two matmuls), plus a forward
    again for each recomputation (checkpointing: every layer; the full recipes' tiled MLPs: the MLP a third time; the
    chunked loss: the head again), at ``matmul_efficiency`` of the peak; attention's 4 B H L l D forward FLOPs (halved
    when causal) times 3.5 for forward+backward (plus a forward when recomputed) at the kernel table's rate.
    Communication: MQSP's bytes (``communication_bytes``) overlap the attention's compute except one micro-step's
    (the code prefetches the next step's rows while one computes); FSDP2's all-gathers and reduce-scatters overlap the
    previous layer (prefetch), DDP's all-reduce the backward; a collective's bytes that leave the node go at the
    inter-node rate. Offload copies (checkpoints and queries, to the host and back) run on a copy stream of their own,
    the next layer's prefetched (``lightning_mqsp/offload.py``): only what exceeds the step's compute adds;
    offload_parameters adds the parameters' copies and the host's AdamW step. Without prefetch the checkpoints' copies
    back add whole."""
    recipe, t, p, d = point.recipe, point.tokens, point.world_size, shape.layers
    h, q, i = shape.hidden, shape.query_width, shape.intermediate
    checkpointed = recipe not in ("ddp", "sharded")
    full = recipe in OFFLOADING_RECIPES
    mlp, attention_projections = 3 * h * i, shape.layer_parameters - 3 * h * i
    head = shape.vocab * h
    forwards = 3 + checkpointed  # forward, backward (2), and the recomputation
    linear_flops = 2 * t * (d * (forwards * attention_projections + (forwards + full) * mlp) + (3 + full) * head)
    attention_forward = 4 * point.batch * shape.heads * point.length * (point.length // p) * shape.head_dim / (2 if causal else 1)
    attention_flops = d * attention_forward * (3.5 + checkpointed)
    matmul_s = linear_flops / (hardware.peak_tflops * 1e12 * hardware.matmul_efficiency)
    attention_s = attention_flops / _attention_rate(hardware, shape.head_dim, causal)

    def link_seconds(nbytes: float) -> float:
        if p <= hardware.gpus_per_node:
            return nbytes / (hardware.intra_node_gbps * GB)
        outside = (p - hardware.gpus_per_node) / (p - 1)
        return nbytes * (1 - outside) / (hardware.intra_node_gbps * GB) + nbytes * outside / (hardware.inter_node_gbps * GB)

    micro_q_size = planned_micro_q_size(point)
    sent = communication_bytes(batch=point.batch, heads=shape.heads, kv_heads=shape.kv_heads, local_length=point.length // p,
                               head_dim=shape.head_dim, world_size=p, dtype=torch.bfloat16, causal=causal,
                               layout="zigzag" if causal else "contiguous", micro_q_size=micro_q_size,
                               head_groups=shape.kv_heads if full else 1)
    recomputed = communication_bytes(batch=point.batch, heads=shape.heads, kv_heads=shape.kv_heads, local_length=point.length // p,
                                     head_dim=shape.head_dim, world_size=p, dtype=torch.bfloat16, backward=False, causal=causal,
                                     layout="zigzag" if causal else "contiguous", micro_q_size=micro_q_size) if checkpointed else {}
    attention_comm_s = d * link_seconds(sum(sent.values()) + sum(recomputed.values()))
    micro_steps = max(1, math.ceil((point.length // p) / micro_q_size))
    exposed_attention_comm_s = max(0.0, attention_comm_s - attention_s) + attention_comm_s / micro_steps
    if recipe == "ddp":
        parameter_comm_s = link_seconds(2 * 4 * shape.parameters * (p - 1) / p) if p > 1 else 0.0
    else:  # all-gather bf16 parameters for forward, recomputation and backward; reduce-scatter float32 gradients
        parameter_comm_s = link_seconds((2 * (2 + checkpointed) + 4) * shape.parameters * (p - 1) / p) if p > 1 else 0.0
    exposed_parameter_comm_s = max(0.0, parameter_comm_s - matmul_s)
    offload_s = 0.0
    if full:
        offloaded = _offloaded(shape, point)
        copies_s = 2 * t * (2 * h * offloaded + (d * 2 * q if point.queries_on_host else 0)) / (hardware.pcie_gbps * GB)
        offload_s = max(0.0, copies_s - (matmul_s + attention_s))  # hidden behind the kernels, up to their time
        if not point.prefetch:  # each checkpoint's copy back waits for backward to ask for it
            offload_s += t * 2 * h * offloaded / (hardware.pcie_gbps * GB)
    host_optimizer_s = 0.0
    if recipe == "host_parameters":
        offload_s += (2 * 4 * shape.parameters / p) / (hardware.pcie_gbps * GB) * 2  # shards in, twice; gradients out
        host_optimizer_s = shape.parameters / p / hardware.host_adam_params_per_s
    parts = {"matmuls": matmul_s, "attention": attention_s, "attention communication (exposed)": exposed_attention_comm_s,
             "parameter communication (exposed)": exposed_parameter_comm_s, "offload copies (exposed)": offload_s,
             "host optimizer": host_optimizer_s}
    total = sum(parts.values())
    model_flops = 2 * t * (3 * (shape.parameters - shape.embedding_parameters + head)) + d * attention_forward * 3.5
    return {"seconds": total, "parts": parts, "dominant": max(parts, key=parts.__getitem__),
            "mfu": model_flops / (total * hardware.peak_tflops * 1e12), "micro_q_size": micro_q_size}


def planned_micro_q_size(point: Point) -> int:
    """The micro_q_size to run with: ESTIMATE_GATHERED_ROWS gathered rows a micro-step, the size the memory model's
    working set was measured with (its buffers are a fixed few hundred MB; larger steps amortise the per-step launches
    and collectives that ``benchmarks/RESULTS.md`` finds dominate small steps)."""
    local = point.length // point.world_size
    return max(1, min(local, ESTIMATE_GATHERED_ROWS // point.world_size))


# -- the plan -----------------------------------------------------------------------------------------------------------


def assumptions(shape: ModelShape, hardware: Hardware, batch: int, causal: bool) -> list[str]:
    """Everything the numbers rest on, printed with them."""
    budget = hardware.budget()
    caveat = [] if shape.decoder else [
        f"{shape.name}: the memory model's coefficients are the Llama family's (RMSNorm, gated MLP, rotary positions); "
        "this model's LayerNorm, GELU MLP and learned positions are not in them beyond the parameter count: --verify"]
    return [
        *caveat,
        f"model {shape.name}: {shape.parameters / 1e9:.2f}B parameters, {shape.layers} layers, hidden {shape.hidden}, "
        f"{shape.heads} heads ({shape.kv_heads} key/value) of {shape.head_dim}, intermediate {shape.intermediate}, "
        f"vocabulary {shape.vocab}",
        f"{hardware.gpus} GPUs, {hardware.gpus_per_node} a node, one sequence over all of them (P = {hardware.gpus}), "
        f"batch {batch}, bf16-mixed, AdamW (fused: one parameter at a time), MQSP attention (Triton kernels)",
        f"budgets per rank: device {budget.device_bytes / GB:.1f} GB of live tensors (kernel workspaces, the CUDA context "
        f"and fragmentation not counted), host {budget.host_bytes / GB:.1f} GB ({hardware.host_memory_gb_per_node:g} GB a "
        f"node over {min(hardware.gpus, hardware.gpus_per_node)} ranks)",
        "memory: the analytic model of docs/scaling.md (\"The planner\"), within 3% of the fake-tensor estimator at the "
        "points checked on Llama-3.1-8B's shape near the budgets; less sure elsewhere, listed there (--verify runs it)",
        f"full recipes: checkpoints offloaded for the fewest layers that fit the device, the next one brought back ahead "
        f"(offload_prefetch) unless only without it the length fits, loss chunks and MLP tiles of {LOSS_CHUNK} and "
        f"{MLP_TILE} tokens (norms fused into what they feed), attention's backward one key/value head at a time",
        f"time: {hardware.peak_tflops:g} TFLOP/s peak, linear layers at {hardware.matmul_efficiency:.0%} of it (assumed), "
        f"attention at {', '.join(f'{k}: {v:g}' for k, v in hardware.attention_tflops.items())} TFLOP/s (head_dim/causal; "
        f"benchmarks/RESULTS.md, or --kernel-json), {'causal' if causal else 'non-causal'} attention",
        f"links: {hardware.intra_node_gbps:g} GB/s a GPU within a node, {hardware.inter_node_gbps:g} GB/s across nodes, "
        f"{hardware.pcie_gbps:g} GB/s host copies (on their own stream: hidden up to the kernels' time); MQSP's exchange overlaps "
        "attention but for one micro-step, FSDP's overlaps the linear layers",
    ]


def plan_rows(shape: ModelShape, hardware: Hardware, batch: int = 1, length: int | None = None, causal: bool = True,
              recipes: Sequence[str] = RECIPES) -> list[dict[str, Any]]:
    """For each recipe: the longest length within both budgets (and within the device's alone), and at ``length``
    (default: that longest) the memory, the layers to offload, the step time and MFU."""
    budget, p = hardware.budget(), hardware.gpus
    unlimited_host = replace(budget, host_bytes=2**62)
    rows = []
    for recipe in recipes:
        longest = longest_point(shape, recipe, p, budget, batch)
        device_only = longest_point(shape, recipe, p, unlimited_host, batch)
        row: dict[str, Any] = {"recipe": recipe, "label": RECIPE_LABELS[recipe],
                               "longest": longest.length if longest else 0,
                               "longest_device_only": device_only.length if device_only else 0}
        point = longest
        if length is not None:
            asked = Point(recipe, length, p, batch)
            point = best_point(shape, asked, budget)
            if point is None:
                point = replace(asked, offloaded_layers=None)
                row["note"] = (f"does not fit at {length:,}: device {device_bytes(shape, point) / GB:.1f} GB of "
                               f"{budget.device_bytes / GB:.0f}, host {host_bytes(shape, point) / GB:.1f} GB of "
                               f"{budget.host_bytes / GB:.0f}")
        if point is None:
            row["note"] = f"does not fit at {LOCAL_GRANULARITY * p:,} tokens"
            rows.append(row)
            continue
        timing = step_time(shape, point, hardware, causal)
        row |= {"length": point.length, "device_gb": device_bytes(shape, point) / GB, "host_gb": host_bytes(shape, point) / GB,
                "offloaded_layers": _offloaded(shape, point) if recipe in OFFLOADING_RECIPES else None,
                "offload_prefetch": point.prefetch if recipe in OFFLOADING_RECIPES else None,
                "offload_queries": point.queries_on_host if recipe in OFFLOADING_RECIPES else None,
                "step_seconds": timing["seconds"], "mfu": timing["mfu"], "dominant": timing["dominant"],
                "time_parts": timing["parts"], "micro_q_size": timing["micro_q_size"]}
        rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """The rows as a plain-text table."""
    header = ("recipe", "longest L", "device-only L", "at L", "device GB", "host GB", "offloaded", "step s", "MFU",
              "dominated by", "micro_q_size")
    lines = []
    for row in rows:
        if "device_gb" not in row:
            lines.append((row["recipe"], f"{row['longest']:,}", f"{row['longest_device_only']:,}", row.get("note", ""),
                          *("",) * 7))
            continue
        offloaded = "-" if row["offloaded_layers"] is None else str(row["offloaded_layers"])
        if row.get("offload_prefetch") is False:
            offloaded += ", no prefetch"
        if row.get("offload_queries") is False:
            offloaded += ", queries on device"
        lines.append((row["recipe"], f"{row['longest']:,}", f"{row['longest_device_only']:,}", f"{row['length']:,}",
                      f"{row['device_gb']:.1f}", f"{row['host_gb']:.1f}", offloaded, f"{row['step_seconds']:.1f}",
                      f"{100 * row['mfu']:.0f}%", row["dominant"], str(row["micro_q_size"])))
    widths = [max(len(str(line[k])) for line in (header, *lines)) for k in range(len(header))]
    text = [" | ".join(str(cell).ljust(w) for cell, w in zip(line, widths)).rstrip() for line in (header, *lines)]
    text.insert(1, "-+-".join("-" * w for w in widths))
    notes = [f"  {row['recipe']}: {row['note']}" for row in rows if "note" in row and "device_gb" in row]
    return "\n".join(text + notes)


def write_config(path: Path, shape: ModelShape, row: dict[str, Any], hardware: Hardware, batch: int, command: str) -> None:
    """A LightningCLI config that runs ``examples/llama_long.py`` with the row's recipe and options."""
    recipe, p = row["recipe"], hardware.gpus
    args: dict[str, Any] = {"sequence_parallel_size": p, "micro_q_size": row["micro_q_size"], "layout": "zigzag"}
    if recipe != "ddp":
        args["mixed_precision"] = True
    if recipe not in ("ddp", "sharded"):
        args["activation_checkpointing"] = True
    if recipe in OFFLOADING_RECIPES:
        args |= {"offload_activations": True, "offload_activation_layers": row["offloaded_layers"],
                 "offload_prefetch": row["offload_prefetch"], "offload_queries": row["offload_queries"], "mlp_tile_size": MLP_TILE,
                 "attention_head_groups": shape.kv_heads, "offload_parameters": recipe == "host_parameters"}
    strategy = "lightning_mqsp.MQSPStrategy" if recipe == "ddp" else "lightning_mqsp.MQSPFSDPStrategy"
    preset = "llama-8b" if shape.name in ("llama-8b", "llama-3.1-8b") else None
    model = f"  preset: {preset}" if preset else f"  pretrained: {shape.name}  # a hub name or local path of the weights"
    lines = [
        f"# {row['label']}: {row['length']:,} tokens, {row['device_gb']:.1f} GB a device, {row['host_gb']:.1f} GB host a rank,",
        f"# about {row['step_seconds']:.1f} s a step (MFU {100 * row['mfu']:.0f}%), as planned by: {command}",
        "# python examples/llama_long.py fit --config THIS_FILE --data.tokenizer=<your tokenizer>",
        "seed_everything: 0", "trainer:", "  accelerator: gpu", f"  devices: {min(p, hardware.gpus_per_node)}",
        f"  num_nodes: {max(1, p // hardware.gpus_per_node)}", "  precision: bf16-mixed", "  strategy:",
        f"    class_path: {strategy}", "    init_args:",
        *(f"      {key}: {json.dumps(value)}" for key, value in args.items()),
        "model:", model, f"  vocab_size: {shape.vocab}", f"  max_positions: {row['length']}", f"  loss_chunk_size: {LOSS_CHUNK}",
        "data:", "  objective: packed", f"  seq_len: {row['length']}", f"  batch_size: {batch}",
    ]
    path.write_text("\n".join(lines) + "\n")


def verify(config: PretrainedConfig, row: dict[str, Any], hardware: Hardware, batch: int) -> dict[str, int]:
    """The fake-tensor estimator at the row's point with every checkpoint offloaded (its depth extrapolated from 3 and
    4 layers): minutes at long lengths."""
    from lightning_mqsp.estimate import RECIPE_PROBE_LAYERS, Setup, extrapolated_memory, quiet

    quiet()
    setup = Setup(config, "mqsp", row["length"], hardware.gpus, batch=batch, recipe=row["recipe"], attention_backend="triton",
                  optimizer_foreach=False, offload_prefetch=row.get("offload_prefetch") is not False,
                  offload_queries=row.get("offload_queries") is not False)
    device, host = extrapolated_memory(setup, RECIPE_PROBE_LAYERS)
    return {"device_bytes": device, "host_bytes": host}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="lightning-mqsp plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help=f"a built-in shape ({', '.join(sorted(MODELS))}) or a local config.json")
    parser.add_argument("--gpus", type=int, required=True, help="GPUs the sequence is split over (P)")
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--device-memory-gb", type=float, default=80.0)
    parser.add_argument("--host-memory-gb", type=float, default=1900.0, help="host memory of a node")
    parser.add_argument("--intra-node-gbps", type=float, default=360.0)
    parser.add_argument("--inter-node-gbps", type=float, default=50.0)
    parser.add_argument("--pcie-gbps", type=float, default=25.0)
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--kernel-json", type=Path, help="a benchmarks/gpu_check.py report: its mqsp TFLOP/s replace the defaults")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--precision", default="bf16-mixed", help="bf16-mixed (the only precision the model covers)")
    parser.add_argument("--length", type=int, help="report memory and time at this length (default: each recipe's longest)")
    parser.add_argument("--non-causal", action="store_true", help="time non-causal attention (memory is the same)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument("--write-config", type=Path, help="write a LightningCLI YAML for examples/llama_long.py")
    parser.add_argument("--recipe", choices=RECIPES, help="the recipe --write-config and --verify use (default: the longest)")
    parser.add_argument("--verify", action="store_true", help="run the fake-tensor estimator at that recipe's point (minutes)")
    args = parser.parse_args(argv)
    if args.precision != "bf16-mixed":
        parser.error(f"--precision {args.precision}: the analytic model covers bf16-mixed only; estimate other precisions "
                     "with lightning_mqsp.estimate (benchmarks/estimate_memory.py)")
    if args.gpus < 1 or args.gpus_per_node < 1 or args.batch < 1:
        parser.error("--gpus, --gpus-per-node and --batch must be positive")
    if args.length is not None and (args.length < args.gpus or args.length % args.gpus):
        parser.error(f"--length {args.length} must be a positive multiple of --gpus {args.gpus} (each rank holds L / P tokens)")
    name, config = load_config(args.model)
    shape = ModelShape.of(name, config)
    kernels = attention_tflops_from_gpu_check(json.loads(args.kernel_json.read_text())) if args.kernel_json else ATTENTION_TFLOPS
    hardware = Hardware(gpus=args.gpus, gpus_per_node=args.gpus_per_node, device_memory_gb=args.device_memory_gb,
                        host_memory_gb_per_node=args.host_memory_gb, peak_tflops=args.peak_tflops,
                        intra_node_gbps=args.intra_node_gbps, inter_node_gbps=args.inter_node_gbps, pcie_gbps=args.pcie_gbps,
                        attention_tflops=dict(kernels))
    causal = shape.decoder and not args.non_causal
    rows = plan_rows(shape, hardware, args.batch, args.length, causal)
    result: dict[str, Any] = {"model": asdict(shape), "hardware": asdict(hardware), "batch": args.batch,
                              "assumptions": assumptions(shape, hardware, args.batch, causal), "recipes": rows}
    fitting = [row for row in rows if "device_gb" in row and "note" not in row]
    chosen = next((row for row in rows if row["recipe"] == args.recipe), None) if args.recipe else \
        max(fitting, key=lambda row: row["length"], default=None)
    if (args.write_config or args.verify) and (chosen is None or "device_gb" not in chosen or "note" in chosen):
        parser.error(f"recipe {args.recipe or 'none'} does not fit: nothing to write or verify (see the table)")
    if args.verify:
        assert chosen is not None
        result["verify"] = {"recipe": chosen["recipe"], "length": chosen["length"], "offload_prefetch": chosen.get("offload_prefetch"),
                            "offload_queries": chosen.get("offload_queries"), **verify(config, chosen, hardware, args.batch)}
    if args.write_config:
        assert chosen is not None
        command = "lightning-mqsp plan " + " ".join(sys.argv[1:] if argv is None else argv)
        write_config(args.write_config, shape, chosen, hardware, args.batch, command)
    if args.json:
        print(json.dumps(result, indent=1))
        return result
    print("\n".join(f"- {line}" for line in result["assumptions"]))
    print()
    print(format_table(rows))
    if "verify" in result:
        v = result["verify"]
        point = Point(v["recipe"], v["length"], hardware.gpus, args.batch, prefetch=v.get("offload_prefetch") is not False,
                      queries_on_host=v.get("offload_queries") is not False)
        print(f"\nverify {v['recipe']} at {v['length']:,} (every checkpoint offloaded): fake-tensor estimate device "
              f"{v['device_bytes'] / GB:.2f} GB, host {v['host_bytes'] / GB:.2f} GB; the model, the same point: device "
              f"{device_bytes(shape, point) / GB:.2f} GB, host {host_bytes(shape, point) / GB:.2f} GB")
    if args.write_config:
        assert chosen is not None
        print(f"\nwrote {args.write_config} ({chosen['recipe']} at {chosen['length']:,} tokens)")
    return result


def cli() -> None:
    """``lightning-mqsp``: its one command is ``plan``."""
    if len(sys.argv) < 2 or sys.argv[1] != "plan":
        sys.exit("usage: lightning-mqsp plan --model MODEL --gpus P [options] (lightning-mqsp plan --help)")
    main(sys.argv[2:])


if __name__ == "__main__":
    main()
