"""Error against float64 as the number of ranks grows: MQSP, ring attention and Ulysses, gloo on CPU.

    .venv/bin/python benchmarks/numerics.py                       # P = 1..16, all dtypes, causal and not
    .venv/bin/python benchmarks/numerics.py --world-sizes 1 4 --dtypes bfloat16 --quick

The peers' users report errors that grow with the world size, worst in backward. For each method, world size P,
input dtype and mask, every rank computes its shard of the output and of dQ, dK, dV from the same seeded inputs
(rounded to the dtype once), and the float64 attention of the same rounded inputs is the reference. The error of a
tensor is ``||actual - reference|| / ||reference||`` over the whole sequence (Frobenius: every rank's squared
differences summed; a max-based error follows single elements and jumps between runs). Micro-steps: MQSP runs
``--micro-q`` rows a rank a step, so that each rank holds several steps at every P. Writes a table, JSON
(``benchmarks/out/numerics.json``) and a plot (``docs/img/numerics.png``).
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.append(str(Path(__file__).resolve().parents[1]))  # `benchmarks` from anywhere, after the installed packages

from benchmarks.baselines import METHODS
from benchmarks.baselines.common import Shape, float64_reference, local_shard, make_inputs
from lightning_mqsp import mqsp_attention

TENSORS = ("out", "dq", "dk", "dv")
COMPARED = ("mqsp", "ring", "ulysses")


def reference_file(folder: str, dtype: str, causal: bool) -> str:
    return os.path.join(folder, f"reference-{dtype}-{'causal' if causal else 'none'}.pt")


def write_references(folder: str, jobs: list[dict[str, Any]]) -> None:
    """Once per (dtype, mask), in this process: the inputs rounded to the dtype and float64 attention of them (at
    16 heads the float64 score map is too large to build on each of 16 ranks)."""
    for dtype, causal in {(job["dtype"], job["causal"]) for job in jobs}:
        job = next(j for j in jobs if (j["dtype"], j["causal"]) == (dtype, causal))
        shape = Shape(1, job["heads"], job["length"], job["head_dim"], 1, causal)
        inputs = {name: tensor.to(getattr(torch, dtype)) for name, tensor in make_inputs(shape, seed=0).items()}
        expected = float64_reference({name: tensor.double() for name, tensor in inputs.items()}, causal)
        torch.save({"inputs": inputs, "expected": expected}, reference_file(folder, dtype, causal))


def squared_errors(job: dict[str, Any], folder: str, group: Any) -> dict[str, tuple[float, float]]:
    """For this rank's shard of each tensor: (sum of squared differences to float64, sum of squared reference values)."""
    rank, world_size = (dist.get_rank(group), dist.get_world_size(group)) if group is not None else (0, 1)
    saved = torch.load(reference_file(folder, job["dtype"], job["causal"]))
    inputs, expected = saved["inputs"], saved["expected"]
    method, causal = job["method"], job["causal"]
    chosen = METHODS[method]
    layout = chosen.layout(causal)
    q, k, v = (local_shard(inputs[name], rank, world_size, layout).requires_grad_() for name in "qkv")
    if method == "mqsp":  # the baseline's automatic micro-steps would give one step a rank at these lengths
        out = mqsp_attention(q, k, v, group=group, causal=causal, layout=layout, micro_q_size=job["micro_q"])
    else:
        out = chosen.attention(q, k, v, group, causal)
    out.backward(local_shard(inputs["dout"], rank, world_size, layout))
    actual = {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}
    sums = {}
    for name in TENSORS:
        reference = local_shard(expected[name], rank, world_size, layout)
        sums[name] = (float((actual[name].double() - reference).square().sum()), float(reference.square().sum()))
    return sums


def _rank_main(rank: int, world_size: int, folder: str, jobs: list[dict[str, Any]]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/pg", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=300))
    rows = []
    for job in jobs:
        sums = squared_errors(job, folder, dist.group.WORLD)
        everyone: list[Any] = [None] * world_size
        dist.all_gather_object(everyone, sums)
        errors = {name: (sum(s[name][0] for s in everyone) / sum(s[name][1] for s in everyone)) ** 0.5 for name in TENSORS}
        rows.append({**job, "world_size": world_size, **errors})
    if rank == 0:
        Path(folder, "rows.json").write_text(json.dumps(rows))
    dist.destroy_process_group()


def measure(world_size: int, jobs: list[dict[str, Any]], folder: str) -> list[dict[str, Any]]:
    if world_size == 1:  # no process group: every method's single-process path
        rows = []
        for job in jobs:
            sums = squared_errors(job, folder, None)
            rows.append({**job, "world_size": 1, **{name: (d / r) ** 0.5 for name, (d, r) in sums.items()}})
        return rows
    for stale in ("pg", "rows.json"):
        Path(folder, stale).unlink(missing_ok=True)
    mp.spawn(_rank_main, args=(world_size, folder, jobs), nprocs=world_size)
    return json.loads(Path(folder, "rows.json").read_text())


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| method | mask | dtype | P | out | dQ | dK | dV |", "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for row in sorted(rows, key=lambda r: (r["method"], r["causal"], r["dtype"], r["world_size"])):
        mask = "causal" if row["causal"] else "none"
        lines.append(f"| {row['method']} | {mask} | {row['dtype']} | {row['world_size']} | "
                     + " | ".join(f"{row[name]:.2e}" for name in TENSORS) + " |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = sorted({row["dtype"] for row in rows})
    fig, axes = plt.subplots(len(dtypes), len(TENSORS), figsize=(4 * len(TENSORS), 3.2 * len(dtypes)), squeeze=False)
    for (i, dtype), (j, name) in itertools.product(enumerate(dtypes), enumerate(TENSORS)):
        ax = axes[i][j]
        for method, causal in itertools.product(COMPARED, (False, True)):
            points = sorted((r["world_size"], r[name]) for r in rows
                            if r["method"] == method and r["dtype"] == dtype and r["causal"] == causal)
            if points:
                ax.plot(*zip(*points), marker="o", linestyle="-" if causal else "--",
                        label=f"{method} {'causal' if causal else 'no mask'}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{name}, {dtype}")
        ax.set_xlabel("ranks P")
        if j == 0:
            ax.set_ylabel("relative error vs float64")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float16", "float32"])
    parser.add_argument("--methods", nargs="+", default=list(COMPARED))
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=16, help="Ulysses needs P to divide them")
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--micro-q", type=int, default=16, help="MQSP rows per rank per micro-step")
    parser.add_argument("--quick", action="store_true", help="L = 512: a smoke run")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "numerics.json")
    parser.add_argument("--plot", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "img" / "numerics.png")
    args = parser.parse_args(argv)
    length = 512 if args.quick else args.length
    jobs = [{"method": method, "dtype": dtype, "causal": causal, "length": length, "heads": args.heads,
             "head_dim": args.head_dim, "micro_q": args.micro_q}
            for method, dtype, causal in itertools.product(args.methods, args.dtypes, (False, True))]
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        write_references(folder, jobs)
        for world_size in args.world_sizes:
            print(f"P = {world_size} ...", flush=True)
            # Ulysses spreads the heads over the ranks: it needs P to divide them.
            rows += measure(world_size, [job for job in jobs if job["method"] != "ulysses" or args.heads % world_size == 0], folder)
    text = table(rows)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "command": " ".join(sys.argv)}, indent=1))
    plot(rows, args.plot)
    return rows


if __name__ == "__main__":
    main()
