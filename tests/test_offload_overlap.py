"""benchmarks/offload_overlap.py's dry run: the overlap measurement's code on the CPU, so that it cannot fail on a GPU
for a reason the CPU could have shown, and its stand-in step under copies that land late (``test_offload.py``'s double):
every value it brings back is read after its copies."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from test_offload import late_copies

sys.path.append(str(Path(__file__).resolve().parents[1]))  # `benchmarks` is not installed: the root, after site-packages

from benchmarks import offload_overlap


def test_dry_run_reports_the_three_timings(tmp_path: Path) -> None:
    out = tmp_path / "overlap.json"
    report = offload_overlap.main(["--dry-run", "--repeats", "1", "--out", str(out)])
    written = json.loads(out.read_text())
    assert written["values_ok"] and report.values_ok
    assert all(written[name] > 0 for name in ("copies_s", "compute_s", "both_s"))
    assert written["hidden_fraction"] == (report.copies_s + report.compute_s - report.both_s) / report.copies_s


def test_the_stand_in_step_reads_every_copy_after_it_lands() -> None:
    """Under the double every layer's output is copied to the host and back (2 copies a layer), each read NaN until
    its wait: the values that come back are still the ones sent."""
    sizes = offload_overlap.Sizes.of(dry_run=True)
    with late_copies() as engine:
        step = offload_overlap._Step(sizes)
        back = step.run(copies=True, compute=True)
    assert (engine.started, engine.brought) == (sizes.layers, sizes.layers)
    assert all(came.equal(sent) for came, sent in zip(back, reversed(step.outputs), strict=True))
