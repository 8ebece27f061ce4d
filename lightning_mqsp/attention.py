"""``mqsp_attention``: exact attention over a sequence split across the ranks of a group.

Per rank (DESIGN.md section 2): queries are all-gathered one micro-step of ``micro_q_size``
rows at a time, keys and values never leave the rank, each rank computes the column block of
the attention map that belongs to its keys, and a distributed softmax merges the P partial
results of every row at the row's owner. Backward recomputes each micro-step from the saved
inputs; nothing of size (P x micro_q_size) x S_local outlives a step.

Communication overlaps compute: the next micro-step's gather is issued before the current
step computes, and each step's outputs travel back while the next step computes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_mqsp import comm
from lightning_mqsp.backends import AttentionMask, LocalAttentionBackend, available_backends, resolve_backend
from lightning_mqsp.comm import ProcessGroup
from lightning_mqsp.dropout import draw_seed
from lightning_mqsp.layout import Layout, global_positions
from lightning_mqsp.validation import METADATA_FIELDS, check_group_membership, local_input_error, synchronized_metadata

Gathered = TypeVar("Gathered")
Inputs = TypeVar("Inputs")

#: With micro_q_size=None each micro-step gathers about this many query rows from the whole group.
AUTO_GATHERED_ROWS = 1024


def auto_micro_q_size(local_length: int, world_size: int) -> int:
    """Rows per rank per micro-step when none is given: about AUTO_GATHERED_ROWS gathered rows a
    step, so the step's buffers stay a constant size however long the sequence grows."""
    return max(1, min(local_length, math.ceil(AUTO_GATHERED_ROWS / world_size)))


def communication_bytes(
    *, batch: int, heads: int, kv_heads: int, local_length: int, head_dim: int, world_size: int,
    dtype: torch.dtype, backward: bool = True,
) -> dict[str, int]:
    """Bytes one rank sends in one call (forward, plus backward if asked), per collective.

    Forward: the queries, (P-1) x l x H x D in the input dtype (= (P-1)/P x L x H x D), and the
    partial outputs with their log-sum-exp, (P-1) x l x H x (D+1) float32. Backward: queries and
    output gradients again (2D per row, input dtype), two float32 row statistics, and the partial
    query gradients, (P-1) x l x H x D float32. Plus one metadata row of int64s for the checks.
    Independent of micro_q_size and of the key/value heads: keys and values never travel.
    """
    if world_size == 1:
        return {}
    rows = (world_size - 1) * batch * heads * local_length
    itemsize = torch.empty((), dtype=dtype).element_size()
    sent = {
        "all_gather": (world_size - 1) * len(METADATA_FIELDS) * 8 + rows * head_dim * itemsize,
        "all_to_all": rows * (head_dim + 1) * 4,
    }
    if backward:
        sent["all_gather"] += rows * (2 * head_dim * itemsize + 2 * 4)
        sent["reduce_scatter"] = rows * head_dim * 4
    return sent


@dataclass(frozen=True)
class _Plan:
    """Everything about one call that is not a tensor to differentiate."""

    group: ProcessGroup | None
    world_size: int
    rank: int
    backend: LocalAttentionBackend
    positions: Tensor  # [P, S_local]: global position of every rank's tokens
    micro_q_size: int
    causal: bool
    scale: float
    dropout_p: float
    dropout_seed: int

    def steps(self) -> list[tuple[int, int]]:
        local_length = self.positions.size(1)
        return [(start, min(start + self.micro_q_size, local_length)) for start in range(0, local_length, self.micro_q_size)]

    def mask(self, start: int, stop: int, key_padding_mask: Tensor | None) -> AttentionMask:
        """The mask for the gathered rows [start, stop) of every rank against this rank's keys."""
        return AttentionMask(
            query_positions=self.positions[:, start:stop].reshape(-1),
            key_positions=self.positions[self.rank],
            causal=self.causal,
            key_padding_mask=key_padding_mask,
            dropout_p=self.dropout_p,
            dropout_seed=self.dropout_seed,
        )


def _rows_to_ranks(x: Tensor, world_size: int) -> Tensor:
    """[B, H, P*c, ...] (rows of rank 0, then rank 1, ...) -> [P, B, H, c, ...]."""
    b, h, rows = x.shape[:3]
    return x.reshape(b, h, world_size, rows // world_size, *x.shape[3:]).movedim(2, 0)


def _ranks_to_rows(x: Tensor) -> Tensor:
    """[P, B, H, c, ...] -> [B, H, P*c, ...], the inverse of ``_rows_to_ranks``."""
    p, b, h, c = x.shape[:4]
    return x.movedim(0, 2).reshape(b, h, p * c, *x.shape[4:])


def _merge_partials(packed: Tensor) -> tuple[Tensor, Tensor]:
    """Distributed softmax: [P, B, H, c, D+1] partial (out | lse) from every rank -> out, lse.

    lse = logsumexp_r lse_r and out = sum_r exp(lse_r - lse) out_r, in float32. A row with no
    visible key on any rank has lse = -inf and gets zeros."""
    part_out, part_lse = packed[..., :-1], packed[..., -1]
    lse = torch.logsumexp(part_lse, dim=0)
    finite_lse = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
    weights = torch.exp(part_lse - finite_lse)
    return (weights.unsqueeze(-1) * part_out).sum(dim=0), lse


def _run_micro_steps(
    num_steps: int,
    gather: Callable[[int], Gathered],
    unpack: Callable[[Gathered], Inputs],
    compute: Callable[[int, Inputs], comm.Pending],
    finish: Callable[[int, Tensor], None],
) -> None:
    """The micro-step loop of forward and backward, with communication overlapping compute.

    Step j's gathered inputs are unpacked (freeing the raw receive buffers) before step j+1's
    gather is issued; step j's result is sent back while step j+1 computes, and ``finish``
    stores it once it has arrived.
    """
    next_gather = gather(0)
    in_flight: tuple[int, comm.Pending] | None = None
    for j in range(num_steps):
        inputs = unpack(next_gather)
        if j + 1 < num_steps:
            next_gather = gather(j + 1)
        returned = compute(j, inputs)
        del inputs  # free this step's buffers before the next step allocates its own
        if in_flight is not None:
            finish(in_flight[0], in_flight[1].wait())
        in_flight = (j, returned)
    assert in_flight is not None
    finish(in_flight[0], in_flight[1].wait())


class _MQSPAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None, plan: _Plan) -> Tensor:  # type: ignore[override]
        b, h, _, d = query.shape
        out = torch.empty_like(query)
        lse = torch.empty(query.shape[:3], dtype=torch.float32, device=query.device)
        steps = plan.steps()

        def gather(j: int) -> comm.Pending:
            start, stop = steps[j]
            return comm.all_gather(query[:, :, start:stop], plan.group)

        def compute(j: int, gathered_query: Tensor) -> comm.Pending:
            start, stop = steps[j]
            part_out, part_lse = plan.backend.forward(gathered_query, key, value, plan.mask(start, stop, key_padding_mask), plan.scale)
            # Pack (out | lse) rank-major in one strided copy: the all-to-all then sends it as it is.
            packed = part_out.new_empty((plan.world_size, b, h, stop - start, d + 1))
            packed_rows = packed.movedim(0, 2)  # [B, H, P, c, D+1], a view
            packed_rows[..., :d] = part_out.view(b, h, plan.world_size, stop - start, d)
            packed_rows[..., d] = part_lse.view(b, h, plan.world_size, stop - start)
            return comm.all_to_all(packed, plan.group)

        def finish(j: int, returned: Tensor) -> None:
            start, stop = steps[j]
            out[:, :, start:stop], lse[:, :, start:stop] = _merge_partials(returned)

        _run_micro_steps(len(steps), gather, lambda pending: _ranks_to_rows(pending.wait()), compute, finish)
        ctx.plan = plan
        ctx.save_for_backward(query, key, value, out, lse, key_padding_mask)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, Tensor, Tensor, None, None]:  # type: ignore[override]
        plan: _Plan = ctx.plan
        query, key, value, out, lse, key_padding_mask = ctx.saved_tensors
        d = query.size(-1)
        grad_query = torch.empty(query.shape, dtype=torch.float32, device=query.device)
        grad_kv: list[Tensor] = []  # [dK, dV] accumulators: the first step's gradients, added into
        steps = plan.steps()

        def gather(j: int) -> tuple[comm.Pending, comm.Pending]:
            start, stop = steps[j]
            # Query rows and their output gradients travel in the input dtype, row statistics in float32.
            step_grad_out = grad_out[:, :, start:stop]
            delta = (step_grad_out.float() * out[:, :, start:stop].float()).sum(dim=-1)
            rows = torch.cat([query[:, :, start:stop], step_grad_out.to(query.dtype)], dim=-1)
            stats = torch.stack([lse[:, :, start:stop], delta], dim=-1)
            return comm.all_gather(rows, plan.group), comm.all_gather(stats, plan.group)

        def unpack(pending: tuple[comm.Pending, comm.Pending]) -> tuple[Tensor, Tensor, Tensor]:
            rows = pending[0].wait()
            # Straight into contiguous [B, H, P*c, D] tensors: one copy, none in the kernel.
            return _ranks_to_rows(rows[..., :d]), _ranks_to_rows(rows[..., d:]), _ranks_to_rows(pending[1].wait())

        def compute(j: int, inputs: tuple[Tensor, Tensor, Tensor]) -> comm.Pending:
            start, stop = steps[j]
            step_query, step_grad_out, stats = inputs
            part_grad_query, *part_grad_kv = plan.backend.backward(
                step_query, key, value, step_grad_out, stats[..., 0], stats[..., 1],
                plan.mask(start, stop, key_padding_mask), plan.scale,
            )
            if grad_kv:
                for total, part in zip(grad_kv, part_grad_kv):
                    total.add_(part)
            else:  # no zero-filled accumulators
                grad_kv.extend(part_grad_kv)
            return comm.reduce_scatter(_rows_to_ranks(part_grad_query, plan.world_size), plan.group)

        def finish(j: int, returned: Tensor) -> None:
            start, stop = steps[j]
            grad_query[:, :, start:stop] = returned

        _run_micro_steps(len(steps), gather, unpack, compute, finish)
        grad_key, grad_value = grad_kv
        return grad_query.to(query.dtype), grad_key.to(key.dtype), grad_value.to(value.dtype), None, None


def mqsp_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    group: ProcessGroup | None = None,
    key_padding_mask: Tensor | None = None,
    causal: bool = False,
    layout: Layout = "contiguous",
    scale: float | None = None,
    dropout_p: float = 0.0,
    micro_q_size: int | None = None,
    backend: str = "auto",
) -> Tensor:
    """Exact softmax attention over a sequence whose tokens are split across ``group``.

    Args:
        query: this rank's queries, [B, H, S_local, D].
        key, value: this rank's keys and values, [B, H_kv, S_local, D] with H % H_kv == 0
            (grouped-query and multi-query attention need no copies on the wire).
        group: the sequence-parallel process group; None for the default group. A group of one
            rank (or no initialised process group) runs plain local attention.
        key_padding_mask: this rank's [B, S_local] bool mask, True = attend. Stays local.
        causal: mask keys after each query, by global position.
        layout: how the full sequence was split: ``"contiguous"`` or ``"zigzag"``
            (see :mod:`lightning_mqsp.layout`; shard inputs with ``shard_sequence``).
        scale: score scale, default 1/sqrt(D).
        dropout_p: dropout on the attention probabilities; the mask is a hash of
            (seed, batch, head, positions), so forward and recompute agree and the result does
            not depend on ``micro_q_size``. The seed comes from torch's generator on the group's
            first rank.
        micro_q_size: local query rows per micro-step; None picks
            ``ceil(1024 / P)`` (capped at S_local), see :func:`auto_micro_q_size`.
        backend: local compute: ``"auto"``, ``"cpu_flash"``, ``"reference"`` or ``"triton"``.

    Returns:
        [B, H, S_local, D] in the query's dtype: this rank's rows of the attention output.

    Raises:
        ValueError: on bad input, on every rank of the group at once (no rank is left waiting).
    """
    check_group_membership(group)
    if backend not in available_backends():
        raise ValueError(f"Unknown attention backend {backend!r}; choose one of {available_backends()}.")
    error = local_input_error(query, key, value, key_padding_mask, layout, scale, dropout_p, micro_q_size)
    world_size = comm.group_size(group)
    seed = draw_seed() if dropout_p > 0 else 0
    if world_size > 1:
        seed = synchronized_metadata(group, error, query, key, causal, layout, key_padding_mask is not None, micro_q_size, dropout_p, scale, seed)
    elif error is not None:
        raise ValueError(f"mqsp_attention: {error}")
    rank = dist.get_rank(group) if world_size > 1 else 0
    local_length = query.size(2)
    positions = torch.stack([global_positions(local_length, r, world_size, layout, query.device) for r in range(world_size)])
    own_rows = AttentionMask(positions[rank], positions[rank], causal, key_padding_mask, dropout_p, seed)
    plan = _Plan(
        group=group,
        world_size=world_size,
        rank=rank,
        backend=resolve_backend(backend, query, own_rows),
        positions=positions,
        micro_q_size=micro_q_size or auto_micro_q_size(local_length, world_size),
        causal=causal,
        scale=scale if scale is not None else query.size(-1) ** -0.5,
        dropout_p=dropout_p,
        dropout_seed=seed,
    )
    return _MQSPAttention.apply(query, key, value, key_padding_mask, plan)
