"""The Triton backend's tests, run in a fresh process under the Triton interpreter.

The cases live in ``_triton_kernel_cases.py``. They cannot run in the pytest process of the
whole suite: ``TRITON_INTERPRET`` is read when triton is imported, and the other test modules
import lightning_mqsp -> lightning -> torch._dynamo -> triton, without it, before this module
is even collected. So the cases run in a child pytest whose environment has it from the start.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

CASES = Path(__file__).with_name("_triton_kernel_cases.py")


# The interpreted cases took 185 s, and 230 s beside another job, on a slow 2-core host (AVX2 only, with steal
# time): the timeouts are there to catch a hang, not to time the run.
@pytest.mark.timeout(600)
def test_triton_backend_under_the_interpreter() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs", str(CASES)],
        env={**os.environ, "TRITON_INTERPRET": "1"}, cwd=CASES.parent.parent,
        capture_output=True, text=True, timeout=560,
    )
    report = result.stdout + result.stderr
    assert result.returncode == 0, report
    # Every case ran: a collection error or a skip would not show as a failure above.
    assert " passed" in report and " skipped" not in report and " error" not in report, report


@pytest.mark.timeout(300)
def test_kernels_compile_for_a_gpu_without_spills_and_pipelined(tmp_path: Path) -> None:
    """The interpreter does not run Triton's compiler: compile the heaviest variant of every kernel
    (head size 128, causal, GQA, dropout) in every autotune config for sm_90, through ptxas (no GPU
    needed), and check that no config spills registers and every one is software-pipelined."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    report = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, "benchmarks/kernel_compile_report.py", "--head-dims", "128", "--causal", "yes", "--gqa", "yes",
         "--masks", "dropout", "--json", str(report)],
        env=env, cwd=CASES.parent.parent, capture_output=True, text=True, timeout=280,
    )
    assert report.exists(), result.stdout + result.stderr
    records = json.loads(report.read_text())
    assert {r["kernel"] for r in records} == {"forward", "dkdv", "dq"}, records
    for r in records:
        assert r["spill_bytes"] == 0 and r["pipelined"], r
    assert result.returncode == 0, result.stdout + result.stderr
