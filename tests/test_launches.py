"""Dispatcher ops per micro-step of the CPU path (``benchmarks/launches.py``): each op costs the host the same at any
step size, so a step that issues fewer of them leaves less of the step's time to the host. (The Triton path's
launches are counted under the interpreter, in ``_triton_kernel_cases.py``.)"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.append(str(Path(__file__).resolve().parents[1]))  # after site-packages: the installed package wins

from benchmarks.launches import Case, count_per_step

#: Ops per step at P = 2 (rows of 16 per rank, zigzag, sequence-major inputs as a Hugging Face layer hands them
#: over) before the micro-step rework: (forward, backward).
BEFORE = {"unmasked": (44.0, 41.0), "causal": (94.5, 49.5)}


def counts(causal: bool) -> tuple[float, float, dict[str, float], dict[str, float]]:
    counted = count_per_step(Case("cpu_flash", causal))
    return counted.forward_ops, counted.backward_ops, counted.forward_by_op, counted.backward_by_op


@pytest.mark.parametrize("causal", [False, True], ids=["unmasked", "causal"])
def test_a_cpu_micro_step_issues_few_ops(workers, causal: bool) -> None:
    """At most half the ops of before each way: unmasked 21 and 17 of 44 and 41; causal (its diagonal is several
    kernel calls, merged relative to each row's own level) 30.5 and 24.5 of 94.5 and 49.5. Exactly one kernel call
    a step unmasked, and no collective counted among the ops."""
    before = BEFORE["causal" if causal else "unmasked"]
    for forward, backward, forward_by_op, backward_by_op in workers(2).run(counts, causal):
        assert forward <= 0.5 * before[0] and backward <= 0.5 * before[1], (forward_by_op, backward_by_op)
        if not causal:
            assert forward_by_op["_scaled_dot_product_flash_attention_for_cpu"] == 1
            assert backward_by_op["_scaled_dot_product_flash_attention_for_cpu_backward"] == 1
