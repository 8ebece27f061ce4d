"""The Triton backend's tests, run in fresh processes under the Triton interpreter.

The cases live in ``_triton_kernel_cases.py``. They cannot run in the pytest process of the
whole suite: ``TRITON_INTERPRET`` is read when triton is imported, and the other test modules
import lightning_mqsp -> lightning -> torch._dynamo -> triton, without it, before this module
is even collected. So the cases run in child pytests whose environment has it from the start.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

CASES = Path(__file__).with_name("_triton_kernel_cases.py")
REPO = CASES.parent.parent
# The children start together and run side by side: each is one interpreted Python thread (the two-rank case two
# processes, the compile report one compiler), so one after another left a core idle; together they took
# 211 + 24 s one after another on a slow 2-core host (AVX2 only, with steal time). The timeout catches a hang.
CHILD_TIMEOUT_S = 560
INTERPRETED_GROUPS = {  # name -> pytest -k expression over _triton_kernel_cases.py; together: every case once
    "kernels": "not two_gloo_ranks and not gpu_check",
    "two gloo ranks": "two_gloo_ranks",
    "gpu_check dry run": "gpu_check",
}


class Child:
    """A command running in the background, its output going to a file (a pipe nobody reads could fill and block it)."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        with log.open("w") as out:
            self.process = subprocess.Popen(argv, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, text=True)

    def wait(self) -> tuple[int, str]:
        """(exit status, output); a child still running after CHILD_TIMEOUT_S is killed and the test fails."""
        try:
            status = self.process.wait(timeout=CHILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            pytest.fail(f"did not finish within {CHILD_TIMEOUT_S} s (a hang?):\n{self.log.read_text()[-6000:]}")
        return status, self.log.read_text()


@pytest.fixture(scope="module")
def children(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Child]]:
    """Every interpreted group and the compile report, started at once."""
    folder = tmp_path_factory.mktemp("triton")
    interpreted = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    started = {
        name: Child([sys.executable, "-P", "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs", str(CASES), "-k", expression],
                    interpreted, folder / f"{name}.log")
        for name, expression in INTERPRETED_GROUPS.items()
    }
    # The interpreter does not run Triton's compiler: that needs an environment without TRITON_INTERPRET.
    compiled = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    started["compile report"] = Child(
        [sys.executable, "benchmarks/kernel_compile_report.py", "--head-dims", "128", "--causal", "yes", "--gqa", "yes",
         "--masks", "dropout", "--json", str(folder / "report.json")],
        compiled, folder / "compile report.log",
    )
    yield started
    for child in started.values():
        if child.process.poll() is None:
            child.process.kill()
            child.process.wait()


@pytest.mark.timeout(CHILD_TIMEOUT_S + 40)
@pytest.mark.parametrize("group", INTERPRETED_GROUPS)
def test_triton_backend_under_the_interpreter(group: str, children: dict[str, Child]) -> None:
    status, report = children[group].wait()
    assert status == 0, report
    # Every case ran: a collection error or a skip would not show as a failure above.
    assert " passed" in report and " skipped" not in report and " error" not in report, report


@pytest.mark.timeout(CHILD_TIMEOUT_S + 40)
def test_kernels_compile_for_a_gpu_without_spills_and_pipelined(children: dict[str, Child]) -> None:
    """The interpreter does not run Triton's compiler: compile the heaviest variant of every kernel
    (head size 128, causal, GQA, dropout) in every autotune config for sm_90, through ptxas (no GPU
    needed), and check that no config spills registers and every one is software-pipelined."""
    child = children["compile report"]
    status, report = child.wait()
    report_file = child.log.with_name("report.json")
    assert report_file.exists(), report
    records = json.loads(report_file.read_text())
    assert {r["kernel"] for r in records} == {"forward", "dkdv", "dq"}, records
    for r in records:
        assert r["spill_bytes"] == 0 and r["pipelined"], r
    assert status == 0, report
