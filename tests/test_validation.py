"""Bad input raises the same clear ValueError on every rank, before any attention collective."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from distributed import call_without_a_partner

from lightning_mqsp import mqsp_attention


def _inputs(rank: int, heads: int = 4, kv_heads: int = 4, length: int = 8, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(rank)
    q = torch.randn(2, heads, length, 16, generator=g).to(dtype)
    k = torch.randn(2, kv_heads, length, 16, generator=g).to(dtype)
    return q, k, k.clone()


def _call(problem: str) -> str:
    """Make one kind of mistake (on one rank only where that is the realistic case); return the error."""
    rank = dist.get_rank()
    q, k, v = _inputs(rank)
    kwargs: dict = {}
    one_rank = rank == 1
    if problem == "length_mismatch" and one_rank:
        q, k, v = _inputs(rank, length=10)
    elif problem == "heads_not_divisible" and one_rank:
        q, k, v = _inputs(rank, heads=4, kv_heads=3)
    elif problem == "zero_kv_heads" and one_rank:
        q, k, v = _inputs(rank, kv_heads=0)
    elif problem == "zero_head_dim" and one_rank:
        q, k, v = q[..., :0], k[..., :0], v[..., :0]
    elif problem == "dtype_mismatch" and rank == 0:
        k = k.half()
    elif problem == "dtype_differs_across_ranks" and one_rank:
        q, k, v = _inputs(rank, dtype=torch.bfloat16)
    elif problem == "device_mismatch" and one_rank:
        v = v.to("meta")
    elif problem == "full_length_mask":  # a user passing the unsharded mask
        kwargs["key_padding_mask"] = torch.ones(2, 8 * dist.get_world_size(), dtype=torch.bool)
    elif problem == "float_mask":
        kwargs["key_padding_mask"] = torch.ones(2, 8)
    elif problem == "list_mask" and one_rank:
        kwargs["key_padding_mask"] = [[True] * 8] * 2
    elif problem == "float_documents" and one_rank:
        kwargs["document_ids"] = torch.zeros(2, 8)
    elif problem == "micro_q_size_zero":
        kwargs["micro_q_size"] = 0
    elif problem == "micro_q_size_bool" and one_rank:
        kwargs["micro_q_size"] = True
    elif problem == "bad_layout":
        kwargs["layout"] = "striped"
    elif problem == "bad_dropout":
        kwargs["dropout_p"] = 1.0
    elif problem == "bogus_backend" and one_rank:
        kwargs["backend"] = "bogus"
    elif problem == "unsupported_backend" and one_rank:
        kwargs.update(backend="cpu_flash", softcap=30.0)
    elif problem == "huge_scale" and one_rank:
        kwargs["scale"] = 1e39  # not a float32
    elif problem == "tensor_scale" and one_rank:
        kwargs["scale"] = torch.tensor(0.25, requires_grad=True)
    elif problem == "bad_window" and one_rank:
        kwargs["window"] = (-1, 3)
    elif problem == "causal_differs_across_ranks":
        kwargs["causal"] = rank == 0
    elif problem == "window_differs_across_ranks":
        kwargs["window"] = (4, 4) if rank == 0 else (5, 5)
    elif problem == "unsharded_query" and rank == 0:  # rank 0 passes the whole sequence
        q = torch.cat([q, q], dim=2)
    elif problem == "head_groups_not_dividing" and one_rank:
        kwargs["head_groups"] = 3
    elif problem == "head_groups_with_dropout":
        kwargs.update(head_groups=2, dropout_p=0.1)
    elif problem == "head_groups_differ_across_ranks":
        kwargs["head_groups"] = 1 if rank == 0 else 2
    elif problem == "offload_queries_not_bool" and one_rank:
        kwargs["offload_queries"] = "yes"
    try:
        mqsp_attention(q, k, v, **kwargs)
    except ValueError as error:
        # The pool is still usable: a collective after the error must go through on every rank.
        dist.barrier()
        return str(error)
    return "no error"


PROBLEMS = {
    "length_mismatch": "local_seq_len` differs",
    "heads_not_divisible": "multiple of the key/value heads",
    "zero_kv_heads": "at least one batch entry, head, key/value head",
    "zero_head_dim": "at least one batch entry, head, key/value head",
    "dtype_mismatch": "must share a dtype",
    "dtype_differs_across_ranks": "`dtype` differs",
    "device_mismatch": "one device",
    "full_length_mask": "pass this rank's shard",
    "float_mask": "must be bool",
    "list_mask": "key_padding_mask must be a tensor",
    "float_documents": "must hold integer document ids",
    "micro_q_size_zero": "micro_q_size must be a positive int",
    "micro_q_size_bool": "micro_q_size must be a positive int",
    "bad_layout": "layout must be one of",
    "bad_dropout": "dropout_p must be a float in [0, 1)",
    "bogus_backend": "unknown attention backend 'bogus'",
    "unsupported_backend": "backend='cpu_flash' cannot run these inputs",
    "huge_scale": "scale must be a positive finite Python float (at most",
    "tensor_scale": "a tensor scale cannot be differentiated",
    "bad_window": "window must be None or a (left, right) tuple",
    "causal_differs_across_ranks": "`window_right` differs",
    "window_differs_across_ranks": "`window_left` differs",
    "unsharded_query": "do not match query",
    "head_groups_not_dividing": "head_groups must be a positive int that divides the 4 key/value heads (one of [1, 2, 4])",
    "head_groups_with_dropout": "cannot be combined with attention dropout",
    "head_groups_differ_across_ranks": "`head_groups` differs",
    "offload_queries_not_bool": "offload_queries must be a bool",
}


@pytest.mark.parametrize("problem", PROBLEMS)
def test_bad_input_raises_on_every_rank(workers, problem: str) -> None:
    messages = workers(2).run(_call, problem, timeout=60)
    for rank, message in enumerate(messages):
        assert message.startswith("mqsp_attention:"), f"rank {rank}: {message}"
    # The rank that made the mistake names the fix; the others point to it.
    assert any(PROBLEMS[problem] in m for m in messages), messages


def _call_outside_group() -> str:
    only_rank_0 = dist.new_group([0])
    q, k, v = _inputs(dist.get_rank())
    try:
        mqsp_attention(q, k, v, group=only_rank_0)
    except ValueError as error:
        return str(error)
    return "no error"


def test_rank_outside_the_group_is_told_so(workers) -> None:
    rank0, rank1 = workers(2).run(_call_outside_group, timeout=60)
    assert rank0 == "no error"  # a group of one rank: plain local attention
    assert "not a member of the process group" in rank1


def _attend_once(group: dist.ProcessGroup) -> None:
    q, k, v = _inputs(0)
    mqsp_attention(q, k, v, group=group)


@pytest.mark.timeout(90)
def test_a_missing_rank_times_out_instead_of_hanging(workers) -> None:
    pool = workers(2)
    rank0, rank1 = pool.run(call_without_a_partner, _attend_once, 2.0, timeout=60)
    assert rank1 == "skipped the call"
    assert rank0.startswith("raised:") and "timed out" in rank0.lower(), rank0
    pool.close(force=True)  # rank 0's connection may be left half-open: start the next tests on a fresh pool


def test_single_process_errors_are_raised_directly() -> None:
    q, k, v = _inputs(0)
    with pytest.raises(ValueError, match="micro_q_size"):
        mqsp_attention(q, k, v, micro_q_size=-1)
    with pytest.raises(ValueError, match="unknown attention backend"):
        mqsp_attention(q, k, v, backend="cuda_magic")
    with pytest.raises(ValueError, match="cannot run these inputs"):
        mqsp_attention(q, k, v, backend="cpu_flash", dropout_p=0.1)


def _automatic_and_explicit_micro_q_size() -> list[float]:
    """One rank leaves micro_q_size to the default, the other names the value the default resolves to."""
    q, k, v = _inputs(dist.get_rank())
    out = mqsp_attention(q, k, v, micro_q_size=None if dist.get_rank() == 0 else 8)
    return out.sum().item()


def test_automatic_micro_q_size_agrees_with_its_explicit_value(workers) -> None:
    assert len(workers(2).run(_automatic_and_explicit_micro_q_size, timeout=60)) == 2
