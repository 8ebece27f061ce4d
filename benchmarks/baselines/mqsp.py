"""MQSP itself (:func:`lightning_mqsp.mqsp_attention`), wrapped as benchmark methods: ``mqsp`` shards
the sequence in the zigzag layout under a causal mask (its load balancing), ``mqsp_contiguous``
always contiguously; without a mask both are the same call."""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor

from lightning_mqsp import auto_micro_q_size, mqsp_attention
from lightning_mqsp.attention import communication_bytes as mqsp_communication_bytes
from lightning_mqsp.layout import Layout

from .common import Method, ProcessGroup, Shape, inputs_and_grads_bytes

#: Local-shard-sized buffers at the peak beyond inputs and gradients: saved out, float32 dq, dk,
#: dv accumulators and the output-gradient copy, with the row statistics (a generous bound).
SHARD_BUFFERS_AT_PEAK = 8


def attention(
    q: Tensor, k: Tensor, v: Tensor, group: ProcessGroup | None, causal: bool = False, micro_q_size: int | None = None,
    *, causal_layout: Layout = "zigzag", backend: str = "cpu_flash", head_groups: int = 1, offload_queries: bool = False,
) -> Tensor:
    layout = causal_layout if causal else "contiguous"
    return mqsp_attention(q, k, v, group=group, causal=causal, layout=layout, micro_q_size=micro_q_size, backend=backend,
                          head_groups=head_groups, offload_queries=offload_queries)


def communication_bytes(shape: Shape, causal_layout: Layout = "zigzag", rank: int = 0) -> dict[str, int]:
    """Bytes ``rank`` sends (by default rank 0, whose count the benchmark records): under a causal mask the
    ranks send different amounts, as only the ranks that see a row receive it."""
    return mqsp_communication_bytes(
        batch=shape.batch, heads=shape.heads, kv_heads=shape.heads, local_length=shape.local_length,
        head_dim=shape.head_dim, world_size=shape.world_size, dtype=torch.float32, causal=shape.causal,
        layout=causal_layout if shape.causal else "contiguous", rank=rank, aligned_rows=False,  # cpu_flash's rows
    )


def peak_memory_bytes(shape: Shape) -> int:
    """Linear in l: shard-sized buffers plus one micro-step's gathered rows (about 1024 x 4 rows
    of q, dout, partial out and dq, times B x H x D)."""
    rows = shape.world_size * auto_micro_q_size(shape.local_length, shape.world_size)
    step = 4 * shape.batch * shape.heads * rows * shape.head_dim * 4
    return inputs_and_grads_bytes(shape) + SHARD_BUFFERS_AT_PEAK * shape.local_elements() * shape.itemsize + step


METHOD = Method("mqsp", attention, communication_bytes, peak_memory_bytes, causal_layout="zigzag")
CONTIGUOUS = Method(
    "mqsp_contiguous", partial(attention, causal_layout="contiguous"), partial(communication_bytes, causal_layout="contiguous"),
    peak_memory_bytes,
)
