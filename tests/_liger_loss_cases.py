"""liger-kernel's fused linear cross entropy (``chunked_cross_entropy(kernel="liger")``) on the CPU, through the
Triton interpreter: run by ``tests/test_loss.py`` in a fresh process with ``TRITON_INTERPRET=1`` (triton reads it
when it is imported, and the suite's process imports triton without it). To run directly:
``TRITON_INTERPRET=1 pytest tests/_liger_loss_cases.py``."""

from __future__ import annotations

import os

import pytest
import torch
from test_loss import _chunked_against_plain

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1 in the environment (see the docstring)"

#: float32 kernels against a float64 reference.
FP32_TOLERANCE = 1e-5


@pytest.mark.parametrize("sharded_head", [False, True], ids=["replicated head", "FSDP2-sharded head"])
@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_liger_loss_equals_the_plain_loss(workers, layout: str, sharded_head: bool) -> None:
    """Loss, hidden-state and weight gradients at P = 2 against the plain loss of the whole sequence's logits. The
    sharded head's weight exists only inside its forward: the fused kernel must run as that forward, between FSDP2's
    gather and its gradient's reduce-scatter."""
    for errors in workers(2).run(_chunked_against_plain, layout, 3, "liger", torch.float32, sharded_head):
        assert max(errors.values()) <= FP32_TOLERANCE, errors


def test_liger_refuses_float64_rather_than_compute_it_in_float32() -> None:
    from lightning_mqsp import chunked_cross_entropy

    head = torch.nn.Linear(8, 11, dtype=torch.float64)
    hidden, labels = torch.randn(1, 6, 8, dtype=torch.float64), torch.randint(0, 11, (1, 6))
    with pytest.raises(ValueError, match=r"float16, bfloat16 and float32 inputs, got torch.float64; pass kernel='torch'"):
        chunked_cross_entropy(hidden, head, labels, kernel="liger")
