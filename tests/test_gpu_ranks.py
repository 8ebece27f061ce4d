"""benchmarks/gpu_ranks.py's dry run: the multi-rank GPU check's code paths, on CPU tensors and kernels at tiny sizes,
so that the script cannot fail on a GPU for a reason the CPU could have shown."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(400)
def test_dry_run_passes_every_case_and_the_recipe_step(tmp_path: Path) -> None:
    out = tmp_path / "gpu_ranks.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_ranks.py"), "--dry-run", "--world-sizes", "2",
                           "--out", str(out)], capture_output=True, text=True, timeout=380, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert {row["case"] for row in report["attention"]} >= {"zigzag causal", "offloaded queries, checkpointed", "packed documents"}
    assert all(row["ok"] for row in report["attention"]) and len(report["attention"]) == 2 * 10  # every case on both ranks
    assert report["nccl"] == {"skipped": "no CUDA device or no NCCL"}
    (recipe,) = report["recipe"]
    assert recipe["ok"] and recipe["gradients_checked"] > 0 and recipe["worst_gradient_error"] <= 2 * recipe["its_bf16_noise"] + 1e-3
