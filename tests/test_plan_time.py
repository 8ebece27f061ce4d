"""benchmarks/plan_time.py's dry run: the planner's time model against steps measured on gloo ranks, on tiny sizes
(its figures are the benchmark's, never asserted here: timings belong to benchmark scripts)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.append(str(Path(__file__).resolve().parents[1]))  # `benchmarks` is not installed: the root, after site-packages

from benchmarks import plan_time


@pytest.mark.timeout(240)
def test_dry_run_measures_and_predicts_each_world_size(tmp_path: Path) -> None:
    out = tmp_path / "plan_time.json"
    rows = plan_time.main(["--dry-run", "--out", str(out)])
    written = json.loads(out.read_text())
    assert [row["world_size"] for row in written["rows"]] == [1, 2] == [row["world_size"] for row in rows]
    for row in written["rows"]:
        assert row["measured_s"] > 0 and row["predicted_s"] > 0
        assert row["predicted_s"] == pytest.approx(sum(row["parts"].values()))
        assert row["measured_over_predicted"] == pytest.approx(row["measured_s"] / row["predicted_s"])
        assert row["rates"]["matmul_flops"] > 0 and row["rates"]["attention_flops"] > 0
    assert "link_bytes" not in written["rows"][0]["rates"] and written["rows"][1]["rates"]["link_bytes"] > 0
    assert written["rows"][1]["parts"]["attention communication (exposed)"] > 0


def test_ranks_beyond_the_cores_share_their_compute(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hardware the model gets: a rank a core; P ranks on fewer cores each get cores / P of the one-thread rates."""
    monkeypatch.setattr(plan_time.os, "cpu_count", lambda: 2)
    sizes = plan_time.DRY_RUN
    compute = {"matmul_flops": 4e10, "attention_flops": 2e10}
    rates = {p: plan_time.predicted(sizes, p, compute, {"0": 1e8} if p > 1 else {})["rates"] for p in (1, 2, 4)}
    assert rates[1]["matmul_flops"] == rates[2]["matmul_flops"] == 4e10 and rates[4]["matmul_flops"] == 2e10
    assert rates[4]["attention_flops"] == 1e10 and rates[4]["link_bytes"] == 1e8


def test_a_world_size_that_does_not_split_the_length_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        plan_time.main(["--dry-run", "--world-sizes", "3"])
    assert "3 ranks cannot split L = 64; give divisors of it" in capsys.readouterr().err
