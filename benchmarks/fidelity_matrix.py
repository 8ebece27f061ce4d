"""The Hugging Face family x recipe matrix of ``tests/test_adapters_huggingface_families.py``, as a table of errors.

    .venv/bin/python benchmarks/fidelity_matrix.py [--out benchmarks/out/fidelity.json]

Each row: the worst relative error, over the loss and every parameter's gradient, of MQSP on 2 gloo
ranks against the same model trained in one process in float32; for bf16-mixed also the single-process
bf16-mixed run's own error against float32, the yardstick the test holds MQSP to (at most twice it).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from distributed import WorkerPool  # noqa: E402
from test_adapters_huggingface_families import CASES, run_family  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    pool = WorkerPool(2)
    rows = []
    try:
        print("| family | recipe | layout | loss | worst gradient | single-process bf16 (loss / gradient) |")
        print("|---|---|---|---:|---:|---:|")
        for family, recipe, layout in CASES:
            result = pool.run(run_family, family, recipe, layout, timeout=300)
            errors = {key: max(r["vs_fp32"][key] for r in result) for key in result[0]["vs_fp32"]}
            row = {"family": family, "recipe": recipe, "layout": layout, "loss": errors.pop("loss"),
                   "gradient": max(errors.values())}
            single = ""
            if "single_bf16_vs_fp32" in result[0]:
                yardstick = dict(result[0]["single_bf16_vs_fp32"])
                row["single_loss"], row["single_gradient"] = yardstick.pop("loss"), max(yardstick.values())
                single = f"{row['single_loss']:.1e} / {row['single_gradient']:.1e}"
            rows.append(row)
            print(f"| {family} | {recipe} | {layout} | {row['loss']:.1e} | {row['gradient']:.1e} | {single} |", flush=True)
    finally:
        pool.close()
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
