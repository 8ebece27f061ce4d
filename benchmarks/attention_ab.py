"""MQSP attention of this tree against an earlier commit's, with Ulysses in every run as the yardstick.

On a shared 2-core machine absolute times move by 5-10% from one run to the next, so two versions of
``mqsp_attention`` are compared through their ratio to Ulysses measured in the same run: each round
runs the earlier commit, then this tree, each on fresh gloo ranks that time MQSP and Ulysses
interleaved (the median of ``--repeats`` fwd+bwd calls of the slowest rank), and records the wall
time and every rank's CPU time (its process, and its main thread alone; the rest is mostly gloo's
threads). The earlier commit is checked out into a temporary git worktree.

    python benchmarks/attention_ab.py --against cab87e9 --world-size 4 --length 4096 --causal
    python benchmarks/attention_ab.py --against HEAD~3 --world-size 2 --length 16384 --rounds 3

Prints one line per run and the median ratio per version; writes JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
METHODS = ("mqsp", "ulysses")


def _rank(rank: int, args: argparse.Namespace, init_file: str, result_file: str) -> None:
    import torch
    import torch.distributed as dist

    from benchmarks.baselines import METHODS as ALL_METHODS  # the tree under test's

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.world_size))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=args.world_size)
    torch.manual_seed(rank)
    shape = (1, args.heads, args.length // args.world_size, args.head_dim)
    q, k, v = (torch.randn(shape, requires_grad=True) for _ in range(3))
    dout = torch.randn(shape)

    def fwd_bwd(name: str) -> None:
        for t in (q, k, v):
            t.grad = None
        ALL_METHODS[name].attention(q, k, v, None, args.causal).backward(dout)

    for name in METHODS:  # warm-up: the first call of a signature checks it across ranks
        fwd_bwd(name)
    samples: dict[str, list[tuple[float, float, float]]] = {name: [] for name in METHODS}
    for _ in range(args.repeats):
        for name in METHODS:
            dist.barrier()
            wall, process, thread = time.perf_counter(), time.process_time(), time.thread_time()
            fwd_bwd(name)
            samples[name].append((time.perf_counter() - wall, time.process_time() - process, time.thread_time() - thread))
    medians = {name: [statistics.median(s[i] for s in samples[name]) for i in range(3)] for name in METHODS}
    gathered: list[Any] = [None] * args.world_size
    dist.all_gather_object(gathered, medians)
    if rank == 0:
        Path(result_file).write_text(json.dumps({
            name: {"wall_s": max(g[name][0] for g in gathered), "cpu_s": [g[name][1] for g in gathered],
                   "main_thread_s": [g[name][2] for g in gathered]} for name in METHODS
        }))
    dist.destroy_process_group()


def worker(args: argparse.Namespace) -> None:
    """Time both methods on ``--world-size`` fresh ranks of the tree this process imports; print the result as JSON."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="mqsp-ab-") as tmp:
        result = os.path.join(tmp, "result.json")
        mp.spawn(_rank, args=(args, os.path.join(tmp, "rendezvous"), result), nprocs=args.world_size)
        print(Path(result).read_text())


def run_tree(tree: Path, args: argparse.Namespace) -> dict[str, Any]:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", "--world-size", str(args.world_size),
               "--length", str(args.length), "--heads", str(args.heads), "--head-dim", str(args.head_dim),
               "--repeats", str(args.repeats)] + (["--causal"] if args.causal else [])
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the run in {tree} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", default="HEAD", help="the earlier commit (any git revision)")
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--causal", action="store_true", help="causal attention (MQSP in the zigzag layout)")
    parser.add_argument("--repeats", type=int, default=7, help="timed fwd+bwd calls of each method per run")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each version, alternating")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "attention_ab.json")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    revision = subprocess.run(["git", "rev-parse", "--short", args.against], cwd=REPO, capture_output=True, text=True, check=True)
    against = revision.stdout.strip()
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="mqsp-ab-tree-") as tmp:
        baseline = Path(tmp) / against
        subprocess.run(["git", "worktree", "add", "--detach", "--quiet", str(baseline), against], cwd=REPO, check=True)
        try:
            for round_ in range(args.rounds):
                for version, tree in ((against, baseline), ("this tree", REPO)):
                    result = run_tree(tree, args)
                    ratio = result["mqsp"]["wall_s"] / result["ulysses"]["wall_s"]
                    runs.append({"round": round_, "version": version, "ratio": ratio, **result, "load_average": os.getloadavg()})
                    mqsp, ulysses = result["mqsp"], result["ulysses"]
                    print(f"round {round_} {version:>10}: MQSP {mqsp['wall_s']:.3f} s, Ulysses {ulysses['wall_s']:.3f} s, "
                          f"MQSP / Ulysses {ratio:.3f}; CPU per rank MQSP "
                          + " ".join(f"{c:.3f}" for c in mqsp["cpu_s"]) + " (main thread "
                          + " ".join(f"{c:.3f}" for c in mqsp["main_thread_s"]) + "), Ulysses "
                          + " ".join(f"{c:.3f}" for c in ulysses["cpu_s"]), flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(baseline)], cwd=REPO, check=False)
    summary = {version: statistics.median(r["ratio"] for r in runs if r["version"] == version) for version in (against, "this tree")}
    print("median MQSP / Ulysses: " + ", ".join(f"{v} {r:.3f}" for v, r in summary.items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "against": against, "runs": runs,
                                    "median_ratio": summary}, indent=1))


if __name__ == "__main__":
    main()
