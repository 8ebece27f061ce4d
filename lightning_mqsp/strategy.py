"""``MQSPStrategy``: DDP across sequence-parallel groups, each of which splits every sequence.

Parameters, gradients and optimizer state are replicated; DDP averages gradients over the whole
``dp x sp`` world, which with the full-sequence loss on every rank is the exact data-parallel
gradient, and checkpoints are ordinary DDP checkpoints. The sequence parallelism itself lives in
:class:`~lightning_mqsp.sequence_parallel.SequenceParallelism`; for sharded parameters see
:class:`~lightning_mqsp.MQSPFSDPStrategy`.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from typing import Any

from lightning.pytorch.strategies import DDPStrategy

from lightning_mqsp.layout import Layout
from lightning_mqsp.mesh import DEFAULT_SEQUENCE_PARALLEL_TIMEOUT
from lightning_mqsp.sequence_parallel import SequenceParallelism
from lightning_mqsp.sharding import DEFAULT_SEQUENCE_KEYS, PredictOutputs


class MQSPStrategy(SequenceParallelism, DDPStrategy):
    """Micro-Query Sequence Parallelism with replicated parameters (DDP across sequence-parallel groups).

    Args:
        sequence_parallel_size: ranks per sequence-parallel group. Default: the processes of one
            node (``devices``), data parallel across nodes. Must divide the world size.
        micro_q_size: local query rows per micro-step (None: automatic, see ``mqsp_attention``).
        attention_backend: local attention kernel: ``"auto"``, ``"cpu_flash"``, ``"reference"``, ``"triton"``.
        layout: ``"zigzag"`` (balanced causal work) or ``"contiguous"``.
        sequence_keys: batch keys holding [batch, sequence, ...] tensors to shard.
        pad_token_id: pad token for lengths that do not divide; default the model's
            ``config.pad_token_id``, else 0.
        shift_labels: shift ``labels`` left by one before sharding (causal LM; compute the loss
            without a shift, see :mod:`lightning_mqsp.loss`). Default: on when the module contains
            a Hugging Face ``*ForCausalLM``/``*LMHeadModel``.
        allow_sequence_pooling: accept a model that pools over the sequence (you gather the pooled
            token over the group yourself).
        sequence_parallel_timeout: seconds (or a ``timedelta``) a collective of a sequence-parallel
            group waits for a missing rank before every waiting rank fails with an error that names
            the attention call (default 600). Gradient reduction keeps the strategy's ``timeout``.
        activation_checkpointing: recompute every Hugging Face decoder layer in backward instead of
            keeping its activations (``activation_checkpointing_enable``, non-reentrant).
        offload_activations: keep what the forward saves for backward (with activation
            checkpointing: the layers' input hidden states) in host memory, pinned on a GPU
            (:func:`lightning_mqsp.offload.offloaded_saved_tensors`: asynchronous copies ordered by events), and
            bring it back in backward; the attention keeps
            its queries there through backward as well and copies back one micro-step's rows at a time
            (``offload_queries`` of ``mqsp_attention``).
        mlp_tile_size: run every MLP and normalisation layer on this many tokens at a time, each tile recomputed in backward
            (:mod:`lightning_mqsp.tiling`), so that its wide intermediates never exist for the whole shard.
        attention_head_groups: run the attention's backward over its key/value heads in this many groups, one
            after the other (``head_groups`` of ``mqsp_attention``; it must divide the model's key/value heads):
            the float32 dK/dV accumulators hold one group's heads at a time.
        predict_outputs: what ``predict_step`` returns of the outputs' [batch, sequence, ...] tensors: ``"shard"``
            (default) each rank's own tokens, as the model computed them (in the ``layout``'s order, with the
            strategy's padding); ``"first_rank"`` the full sequences, in order and without padding, on the first
            rank of each sequence-parallel group (the others return ``None``); ``"all"`` the full sequences on
            every rank. Full-length logits can be huge ([B, L, vocab]: 256 GB in bf16 at L = 1M with a 128k
            vocabulary), so a full gather is opt-in.
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
        **kwargs: everything :class:`~lightning.pytorch.strategies.DDPStrategy` takes.
    """

    strategy_name = "mqsp"

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
        offload_activation_layers: int | float | None = None,
        offload_prefetch: bool = True,
        offload_queries: bool | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._configure_sequence_parallelism(
            sequence_parallel_size, micro_q_size, attention_backend, layout, sequence_keys, pad_token_id, shift_labels,
            allow_sequence_pooling, sequence_parallel_timeout, activation_checkpointing, offload_activations, mlp_tile_size,
            attention_head_groups, predict_outputs, offload_activation_layers, offload_prefetch, offload_queries,
        )
