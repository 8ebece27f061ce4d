"""sequence_parallel_loss / cross entropy on gloo ranks against the unsharded loss, values and gradients."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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


def _chunked_against_plain(
    layout: str, chunk_size: int, kernel: str = "torch", dtype: torch.dtype = torch.float64, sharded_head: bool = False,
) -> dict[str, float]:
    """chunked_cross_entropy of a linear head on this rank's hidden states against the plain loss of the full
    logits: loss, and the gradients of the hidden states and of the head's weight (summed over ranks; with
    ``sharded_head`` the head is FSDP2-sharded over the ranks, which reduce-scatter the weight's gradient)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from lightning_mqsp import chunked_cross_entropy
    from lightning_mqsp.layout import unshard_sequence

    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 16, 8, generator=g, dtype=dtype)
    labels = torch.randint(0, 11, (2, 16), generator=g)
    labels[1, 3:9] = -100
    torch.manual_seed(0)  # the same head on every rank
    head = torch.nn.Linear(8, 11, dtype=dtype)
    reference = torch.nn.Linear(8, 11, dtype=torch.float64)
    reference.load_state_dict(head.state_dict())
    full = hidden.to(torch.float64, copy=True).requires_grad_()
    expected = F.cross_entropy(reference(full).flatten(0, 1), labels.flatten(), ignore_index=-100)
    expected.backward()
    if sharded_head:
        fully_shard(head, mesh=init_device_mesh("cpu", (world,)))
    local = shard_sequence(hidden, 1, rank, world, layout).requires_grad_()
    loss = chunked_cross_entropy(local, head, shard_sequence(labels, 1, rank, world, layout), chunk_size=chunk_size,
                                 group=dist.group.WORLD, kernel=kernel)
    loss.backward()
    if sharded_head:  # the mean over ranks, reduce-scattered
        weight_grad = head.weight.grad.full_tensor()
    else:
        dist.all_reduce(head.weight.grad)
        weight_grad = head.weight.grad / world
    grads = [torch.empty_like(local.grad) for _ in range(world)]
    dist.all_gather(grads, local.grad)
    return {
        "loss": abs(loss.item() - expected.item()) / expected.item(),
        "hidden": ((unshard_sequence(grads, 1, layout) / world - full.grad).abs().max() / full.grad.abs().max()).item(),
        "weight": ((weight_grad - reference.weight.grad).abs().max() / reference.weight.grad.abs().max()).item(),
    }


@pytest.mark.parametrize(("layout", "chunk_size"), [("zigzag", 3), ("contiguous", 100)])
def test_chunked_loss_equals_the_plain_loss(workers, layout: str, chunk_size: int) -> None:
    for errors in workers(2).run(_chunked_against_plain, layout, chunk_size):
        assert max(errors.values()) <= 1e-12, errors


@pytest.mark.timeout(300)
def test_the_fused_liger_loss_under_the_triton_interpreter() -> None:
    """liger-kernel's fused linear cross entropy against the plain loss, plain and FSDP2-sharded heads
    (``_liger_loss_cases.py``, in a child pytest with TRITON_INTERPRET=1, as ``test_backends_triton.py`` runs its
    cases: triton reads it when it is imported)."""
    cases = Path(__file__).with_name("_liger_loss_cases.py")
    result = subprocess.run(
        [sys.executable, "-P", "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs", str(cases)],
        env={**os.environ, "TRITON_INTERPRET": "1"}, cwd=cases.parent.parent, capture_output=True, text=True, timeout=280,
    )
    report = result.stdout + result.stderr
    assert result.returncode == 0, report
    assert " passed" in report and " skipped" not in report and " error" not in report, report


def _head_and_inputs() -> tuple[torch.nn.Linear, torch.Tensor, torch.Tensor]:
    return torch.nn.Linear(8, 11), torch.randn(1, 6, 8), torch.randint(0, 11, (1, 6))


def test_loss_kernel_choices_and_their_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel that is not one of LOSS_KERNELS, liger with a head that is not an nn.Linear, liger on CPU tensors
    outside the Triton interpreter, liger not installed: each refused with the fix. "auto" on CPU takes the torch path
    (liger's kernels are CUDA's)."""
    import builtins

    from lightning_mqsp import chunked_cross_entropy, loss

    head, hidden, labels = _head_and_inputs()
    with pytest.raises(ValueError, match=r"kernel must be one of \('auto', 'torch', 'liger'\), got 'fused'"):
        chunked_cross_entropy(hidden, head, labels, kernel="fused")
    with pytest.raises(ValueError, match=r"needs the head as an nn\.Linear.*pass kernel='torch'"):
        chunked_cross_entropy(hidden, lambda h: head(h), labels, kernel="liger")
    with pytest.raises(ValueError, match=r"runs Triton kernels.*set TRITON_INTERPRET=1.*pass kernel='torch'"):
        chunked_cross_entropy(hidden, head, labels, kernel="liger")  # on CPU, outside the interpreter
    assert loss._loss_kernel("auto", hidden, head, 6, 4) == "torch"
    fused = []
    monkeypatch.setattr(loss, "_fused_loss_sum", lambda *args: fused.append(args))
    expected = F.cross_entropy(head(hidden).flatten(0, 1), labels.flatten())
    assert chunked_cross_entropy(hidden, head, labels, chunk_size=4).item() == pytest.approx(expected.item(), rel=1e-6)
    assert not fused
    real_import = builtins.__import__

    def without_liger(name: str, *args, **kwargs):
        if name.startswith("liger_kernel"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_liger)
    with pytest.raises(ImportError, match=r"needs liger-kernel: `pip install liger-kernel`.*or pass kernel='torch'"):
        chunked_cross_entropy(hidden, head, labels, kernel="liger")
    assert not loss._liger_is_installed()


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
