"""sequence_parallel_loss / cross entropy on gloo ranks against the unsharded loss, values and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_mqsp import sequence_parallel_cross_entropy, shard_sequence


def make_case(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 8, 5, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 5, (2, 8), generator=g)
    labels[0, :5] = -100  # uneven valid counts across shards: a mean of local means would be wrong
    return logits, labels


def _sharded_loss(layout: str) -> tuple[float, torch.Tensor]:
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    logits, labels = make_case()
    local = shard_sequence(logits, 1, rank, world, layout).requires_grad_()
    loss = sequence_parallel_cross_entropy(local, shard_sequence(labels, 1, rank, world, layout), group=dist.group.WORLD)
    loss.backward()
    return loss.item(), local.grad


@pytest.mark.timeout(120)
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_full_sequence_loss_and_gradient(workers, layout: str) -> None:
    logits, labels = make_case()
    full = logits.clone().requires_grad_()
    expected = F.cross_entropy(full.flatten(0, 1), labels.flatten(), ignore_index=-100)
    expected.backward()
    results = workers(2).run(_sharded_loss, layout)
    from lightning_mqsp.layout import unshard_sequence

    for loss, _ in results:
        assert loss == pytest.approx(expected.item(), rel=1e-12)
    # Each rank's gradient is P x its share (the all-reduce backward sums): DDP's 1/(dp*sp) average makes it exact.
    grads = unshard_sequence([grad for _, grad in results], 1, layout)
    torch.testing.assert_close(grads, 2 * full.grad, rtol=1e-12, atol=1e-15)


def test_without_a_group_it_is_the_plain_mean() -> None:
    logits, labels = make_case()
    expected = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    assert sequence_parallel_cross_entropy(logits, labels).item() == pytest.approx(expected.item(), rel=1e-12)


def _hf_causal_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """What a Hugging Face *ForCausalLM computes: logits[t] predicts labels[t+1]."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)


def _sharded_causal_loss(layout: str) -> float:
    import torch.distributed as dist

    from lightning_mqsp import causal_lm_cross_entropy
    from lightning_mqsp.adapters import SequenceParallelContext, activate
    from lightning_mqsp.sharding import shift_left

    rank, world = dist.get_rank(), dist.get_world_size()
    logits, labels = make_case(seed=1)
    context = SequenceParallelContext(group=None, rank=rank, world_size=world, layout=layout, labels_shifted=True)
    with activate(context):  # as under MQSPStrategy: labels shifted before sharding
        local_labels = shard_sequence(shift_left(labels), 1, rank, world, layout)
        return causal_lm_cross_entropy(shard_sequence(logits, 1, rank, world, layout), local_labels).item()


@pytest.mark.timeout(120)
def test_causal_lm_loss_is_the_hugging_face_loss_under_mqsp_and_alone(workers) -> None:
    from lightning_mqsp import causal_lm_cross_entropy

    logits, labels = make_case(seed=1)
    expected = _hf_causal_loss(logits, labels).item()
    assert causal_lm_cross_entropy(logits, labels).item() == pytest.approx(expected, rel=1e-12)
    for loss in workers(2).run(_sharded_causal_loss, "zigzag"):
        assert loss == pytest.approx(expected, rel=1e-12)


def _chunked_against_plain(layout: str, chunk_size: int) -> dict[str, float]:
    """chunked_cross_entropy of a linear head on this rank's hidden states against the plain loss of the full
    logits: loss, and the gradients of the hidden states and of the head's weight (summed over ranks)."""
    import torch.distributed as dist

    from lightning_mqsp import chunked_cross_entropy
    from lightning_mqsp.layout import unshard_sequence

    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 16, 8, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 11, (2, 16), generator=g)
    labels[1, 3:9] = -100
    torch.manual_seed(0)  # the same head on every rank
    head = torch.nn.Linear(8, 11, dtype=torch.float64)
    full = hidden.clone().requires_grad_()
    expected = F.cross_entropy(head(full).flatten(0, 1), labels.flatten(), ignore_index=-100)
    expected.backward()
    expected_weight = head.weight.grad.clone()
    head.zero_grad()
    local = shard_sequence(hidden, 1, rank, world, layout).requires_grad_()
    loss = chunked_cross_entropy(local, head, shard_sequence(labels, 1, rank, world, layout), chunk_size=chunk_size,
                                 group=dist.group.WORLD)
    loss.backward()
    dist.all_reduce(head.weight.grad)
    grads = [torch.empty_like(local.grad) for _ in range(world)]
    dist.all_gather(grads, local.grad)
    return {
        "loss": abs(loss.item() - expected.item()) / expected.item(),
        "hidden": ((unshard_sequence(grads, 1, layout) / world - full.grad).abs().max() / full.grad.abs().max()).item(),
        "weight": ((head.weight.grad / world - expected_weight).abs().max() / expected_weight.abs().max()).item(),
    }


@pytest.mark.parametrize(("layout", "chunk_size"), [("zigzag", 3), ("contiguous", 100)])
def test_chunked_loss_equals_the_plain_loss(workers, layout: str, chunk_size: int) -> None:
    for errors in workers(2).run(_chunked_against_plain, layout, chunk_size):
        assert max(errors.values()) <= 1e-12, errors


def test_chunked_loss_keeps_one_chunk_of_logits_at_a_time() -> None:
    """The peak of a forward and backward grows with the chunk, not with the sequence (MemTracker, exact on CPU)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    from lightning_mqsp import chunked_cross_entropy

    def peak(chunk_size: int) -> int:
        weight = torch.randn(4096, 64, requires_grad=True)
        hidden = torch.randn(1, 2048, 64, requires_grad=True)
        labels = torch.randint(0, 4096, (1, 2048))
        tracker = MemTracker()
        tracker.track_external(weight, hidden)
        with tracker:  # (a plain function as the head: MemTracker refuses a module called once per chunk)
            chunked_cross_entropy(hidden, lambda h: F.linear(h, weight), labels, chunk_size=chunk_size).backward()
        return tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]

    logits_bytes = 2048 * 4096 * 4
    whole, chunked = peak(2048), peak(256)
    assert whole - chunked >= 0.8 * logits_bytes * (1 - 256 / 2048), (whole, chunked)
