"""Per-rank peak memory, fwd+bwd time and bytes sent of mqsp_attention against its baselines.

Runs every method of :mod:`benchmarks.baselines` (MQSP, dense, Ring Self-Attention, ring
attention with online softmax, Ulysses) on P gloo ranks on this CPU, after checking each against
single-process float64 SDPA (outputs and dQ, dK, dV). Per configuration: one fwd+bwd under
``MemTracker`` (exact peak of every rank, and the warm-up) and ``count_communication`` (bytes each
rank sends), then the median of ``--repeats`` timed fwd+bwd runs (each the slowest rank's time),
interleaved over the methods. A configuration whose analytic peak exceeds the memory budget is
reported, not run.

    python benchmarks/attention.py                 # full run: ~15 min estimated on 2 idle cores (51 min measured under load)
    python benchmarks/attention.py --quick         # ~1 min estimated idle (5.5 min measured under load)
    python benchmarks/attention.py --causal        # causal: MQSP (zigzag and contiguous), dense, ring (zigzag), Ulysses
    python benchmarks/attention.py --micro-q-sweep # memory/time against micro_q_size at one L, P

Writes a table to stdout and JSON + PNG plots to ``--out`` (default benchmarks/out/).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed._tools.mem_tracker import MemTracker

sys.path.append(str(Path(__file__).resolve().parents[1]))  # `benchmarks` from anywhere, after the installed packages

from benchmarks.baselines import METHODS
from benchmarks.baselines.common import FP32_TOLERANCE, AttentionFn, Shape, reference_errors
from benchmarks.baselines.mqsp import CONTIGUOUS as MQSP_CONTIGUOUS
from lightning_mqsp import auto_micro_q_size, count_communication

GiB = 2**30
MiB = 2**20
#: The methods of a --causal run (RSA and Megatron-style attention hold L^2 maps; --methods adds them).
CAUSAL_METHODS = ["mqsp", "mqsp_contiguous", "dense", "ring", "ulysses"]
#: Without a mask the contiguous MQSP is the same call as ``mqsp``.
FULL_METHODS = [name for name in METHODS if name != MQSP_CONTIGUOUS.name]
#: Collectives wait this long for a slow rank; a 32k fwd+bwd on an oversubscribed core takes minutes.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=20)


@dataclass(frozen=True)
class Variant:
    """A method, and for MQSP the micro_q_size (None: automatic)."""

    method: str
    micro_q_size: int | None = None


@dataclass(frozen=True)
class Task:
    """The variants to measure at one ``shape``, each timed ``repeats`` times (0: memory and bytes only).

    Timed runs go round-robin over the variants, so load from other processes on a shared machine
    falls on all of them alike and their ratios stay meaningful."""

    shape: Shape
    variants: tuple[Variant, ...]
    repeats: int


@dataclass
class Record:
    """What one configuration gave (or why it was not run)."""

    method: str
    world_size: int
    length: int
    status: str  # "ok", or why the configuration was not run
    peak_estimate_bytes: int
    comm_formula_bytes: dict[str, int]
    peak_bytes: int | None = None  # the largest of the ranks' peaks
    peak_bytes_per_rank: list[int] = field(default_factory=list)
    time_s: float | None = None
    times_s: list[float] = field(default_factory=list)
    comm_counted_bytes: dict[str, int] = field(default_factory=dict)
    micro_q_size: int | None = None
    causal: bool = False
    load_average: list[float] = field(default_factory=list)  # /proc/loadavg when this (L, P) was measured


# ---------------------------------------------------------------------------------------------
# Inside the ranks


def _attention_for(variant: Variant) -> AttentionFn:
    fn = METHODS[variant.method].attention
    return partial(fn, micro_q_size=variant.micro_q_size) if variant.micro_q_size is not None else fn


def _max_over_ranks(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def _every_rank(value: float) -> list[float]:
    """``value`` of every rank, in rank order."""
    gathered = [torch.zeros(1, dtype=torch.float64) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, torch.tensor([value], dtype=torch.float64))
    return [t.item() for t in gathered]


def _measure(task: Task) -> list[Record]:
    """Per variant a warm-up fwd+bwd (MQSP's first call of a signature also checks the inputs across
    ranks, once), one MemTracker'd, byte-counted fwd+bwd, then the timed runs, interleaved over the
    variants; peaks and times are the slowest rank's, and every rank's peak is kept."""
    shape = task.shape
    local = (shape.batch, shape.heads, shape.local_length, shape.head_dim)
    q, k, v = (torch.randn(local, requires_grad=True) for _ in range(3))
    dout = torch.randn(local)

    def fwd_bwd(variant: Variant) -> None:
        for t in (q, k, v):
            t.grad = None
        _attention_for(variant)(q, k, v, None, shape.causal).backward(dout)

    peaks, sent = [], []
    for variant in task.variants:
        fwd_bwd(variant)
        tracker = MemTracker()
        tracker.track_external(q, k, v, dout)
        with count_communication() as counter, tracker:
            fwd_bwd(variant)
        peaks.append(tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"])
        sent.append(dict(counter.bytes_sent))
    times: list[list[float]] = [[] for _ in task.variants]
    for _ in range(task.repeats):
        for variant, variant_times in zip(task.variants, times):
            dist.barrier()
            start = time.perf_counter()
            fwd_bwd(variant)
            variant_times.append(time.perf_counter() - start)
    records = []
    for variant, peak, variant_sent, variant_times in zip(task.variants, peaks, sent, times):
        slowest = _max_over_ranks([peak, *variant_times])
        method = METHODS[variant.method]
        records.append(Record(
            method=variant.method, world_size=shape.world_size, length=shape.length, status="ok",
            peak_estimate_bytes=method.peak_memory_bytes(shape), comm_formula_bytes=method.communication_bytes(shape),
            peak_bytes=int(slowest[0]), peak_bytes_per_rank=[int(p) for p in _every_rank(peak)], times_s=slowest[1:],
            time_s=statistics.median(slowest[1:]) if variant_times else None, comm_counted_bytes=variant_sent,
            micro_q_size=variant.micro_q_size, causal=shape.causal, load_average=list(os.getloadavg()),
        ))
    return records


def _check(methods: list[str], shape: Shape) -> dict[str, dict[str, float]]:
    """Every method's worst relative error (over ranks) against float64 SDPA; raises above tolerance."""
    errors = {}
    for name in methods:
        local = reference_errors(METHODS[name], shape)
        errors[name] = dict(zip(local, _max_over_ranks(list(local.values()))))
        worst = max(errors[name].values())
        if worst > FP32_TOLERANCE:
            raise AssertionError(f"{name} at {shape}: relative error {errors[name]} > {FP32_TOLERANCE:g}; not timing it")
    return errors


def _rank_main(
    rank: int, world_size: int, init_method: str, threads: int, check_shape: Shape, tasks: list[Task], result_path: str,
) -> None:
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size, timeout=COLLECTIVE_TIMEOUT)
    try:
        torch.manual_seed(rank)
        errors = _check(sorted({v.method for t in tasks for v in t.variants}), check_shape)
        records = []
        for task in tasks:
            records += _measure(task)
            if rank == 0:
                print(f"  P={world_size} L={task.shape.length:>6} done: {', '.join(v.method for v in task.variants)}; "
                      f"load average {os.getloadavg()}", flush=True)
        if rank == 0:
            Path(result_path).write_text(json.dumps({"check_errors": errors, "records": [asdict(r) for r in records]}))
    finally:
        dist.destroy_process_group()


def run_on_ranks(world_size: int, threads: int, check_shape: Shape, tasks: list[Task]) -> dict[str, Any]:
    """Run ``tasks`` on ``world_size`` fresh gloo processes; return rank 0's checks and records."""
    with tempfile.TemporaryDirectory(prefix="mqsp-bench-") as tmp:
        result_path = os.path.join(tmp, "result.json")
        init_method = f"file://{os.path.join(tmp, 'rendezvous')}"
        mp.spawn(_rank_main, args=(world_size, init_method, threads, check_shape, tasks, result_path), nprocs=world_size)
        return json.loads(Path(result_path).read_text())


# ---------------------------------------------------------------------------------------------
# Planning: what to run, what to skip (analytically)


def rank_budget_bytes(args: argparse.Namespace, world_size: int) -> int:
    return int(min(args.rank_budget_gib, args.total_budget_gib / world_size) * GiB)


def skip_reason(args: argparse.Namespace, name: str, shape: Shape) -> str | None:
    """Why ``name`` cannot run at ``shape`` here, or None."""
    if shape.length % shape.world_size:
        return f"skipped (L not divisible by P={shape.world_size})"
    if name == "ulysses" and shape.heads % shape.world_size:
        return f"skipped (H={shape.heads} not divisible by P)"
    need = METHODS[name].peak_memory_bytes(shape)
    if need > rank_budget_bytes(args, shape.world_size):
        return f"skipped (would need {need / GiB:.1f} GiB)"
    if shape.local_length > args.max_local_length:
        return f"not run (l={shape.local_length} > --max-local-length: compute)"
    return None


def planned_records(args: argparse.Namespace, world_size: int) -> tuple[list[Task], list[Record]]:
    """The tasks to run on ``world_size`` ranks, and records for the configurations not run."""
    tasks, skipped = [], []
    for length in args.lengths:
        shape = Shape(args.batch, args.heads, length, args.head_dim, world_size, args.causal)
        variants = []
        for name in args.methods:
            reason = skip_reason(args, name, shape)
            if reason is None:
                variants.append(Variant(name))
            else:
                method = METHODS[name]
                skipped.append(Record(name, world_size, length, reason, method.peak_memory_bytes(shape), method.communication_bytes(shape),
                                      causal=args.causal))
        if variants:
            tasks.append(Task(shape, tuple(variants), args.repeats if length <= args.time_max_length else 0))
    return tasks, skipped


def refreshed(record: Record, args: argparse.Namespace) -> Record:
    """A record read back from an earlier run, with its analytic peak and byte formula (and a
    memory skip's "would need") recomputed by the current code; measurements are kept."""
    shape = Shape(args.batch, args.heads, record.length, args.head_dim, record.world_size, record.causal)
    method = METHODS[record.method]
    record.peak_estimate_bytes = method.peak_memory_bytes(shape)
    record.comm_formula_bytes = method.communication_bytes(shape)
    if record.status.startswith("skipped (would need"):
        record.status = skip_reason(args, record.method, shape) or "not run (the resumed run's estimate was over budget)"
    return record


def threads_per_rank(world_size: int) -> int:
    return max(1, (os.cpu_count() or 1) // world_size)


def check_shape_for(args: argparse.Namespace, world_size: int) -> Shape:
    return Shape(args.batch, args.heads, args.check_length, args.head_dim, world_size, args.causal)


# ---------------------------------------------------------------------------------------------
# Reporting


def machine() -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), platform.processor())
    repo = Path(__file__).resolve().parents[1]
    commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    # The package is imported from the working tree: say whether it differs from the commit.
    dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "lightning_mqsp"], capture_output=True, text=True).stdout
    return {
        "cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
        "commit": commit + ("+uncommitted lightning_mqsp changes" if dirty.strip() else ""),
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "load_average_at_start": os.getloadavg(),
    }


def fmt_bytes(n: int | None) -> str:
    return "-" if n is None else (f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / MiB:.1f} MiB")


def fmt_comm(sent: dict[str, int]) -> str:
    return fmt_bytes(sum(sent.values())) if sent else "0"


def rank_spread(record: Record) -> str:
    """(largest - smallest) / smallest of the ranks' peaks: how unequal the ranks' memory is."""
    peaks = record.peak_bytes_per_rank
    return f"{max(peaks) / min(peaks) - 1:.1%}" if len(peaks) > 1 and min(peaks) > 0 else "-"


def print_table(records: list[Record]) -> str:
    header = (f"{'P':>2} {'L':>6} {'method':<15} {'peak/rank':>11} {'rank spread':>11} {'(analytic)':>11} {'fwd+bwd s':>10} "
              f"{'sent/rank':>11} {'(formula)':>11}  note")
    lines = [header, "-" * len(header)]
    for r in sorted(records, key=lambda r: (r.world_size, r.length, list(METHODS).index(r.method))):
        time_s = "-" if r.time_s is None else f"{r.time_s:.3f}"
        counted = fmt_comm(r.comm_counted_bytes) if r.status == "ok" else "-"
        note = "" if r.status == "ok" else r.status
        if r.status == "ok" and r.comm_counted_bytes != r.comm_formula_bytes:
            note = "counted != formula"
        lines.append(
            f"{r.world_size:>2} {r.length:>6} {r.method:<15} {fmt_bytes(r.peak_bytes):>11} {rank_spread(r):>11} "
            f"{fmt_bytes(r.peak_estimate_bytes):>11} {time_s:>10} {counted:>11} {fmt_comm(r.comm_formula_bytes):>11}  {note}"
        )
    text = "\n".join(lines)
    print(text)
    return text


def print_ratios(records: list[Record]) -> str:
    """MQSP over Ulysses and over ring attention, time and per-rank peak, at every measured (L, P):
    the ratios of one run, whose timed repeats were interleaved (below 1: MQSP faster or smaller)."""
    header = (f"{'P':>2} {'L':>6} {'mqsp s':>8} {'mqsp peak per rank':>26}  {'/ulysses time':>13} {'/ulysses peak':>13}  "
              f"{'/ring time':>10} {'/ring peak':>10}")
    lines = ["MQSP / Ulysses and MQSP / ring attention (peak: the largest rank's; below 1: MQSP faster or smaller)", header,
             "-" * len(header)]

    def ratio(a: float | None, b: float | None) -> str:
        return f"{a / b:.3f}" if a and b else "-"

    for ours in sorted((r for r in records if r.method == "mqsp" and r.status == "ok"), key=lambda r: (r.world_size, r.length)):
        p, length = ours.world_size, ours.length
        ulysses, ring = find(records, "ulysses", p, length), find(records, "ring", p, length)
        per_rank = " / ".join(f"{b / MiB:.1f}" for b in ours.peak_bytes_per_rank) + " MiB"
        lines.append(
            f"{p:>2} {length:>6} {ours.time_s or float('nan'):>8.3f} {per_rank:>26}  "
            f"{ratio(ours.time_s, ulysses and ulysses.time_s):>13} {ratio(ours.peak_bytes, ulysses and ulysses.peak_bytes):>13}  "
            f"{ratio(ours.time_s, ring and ring.time_s):>10} {ratio(ours.peak_bytes, ring and ring.peak_bytes):>10}"
        )
    text = "\n".join(lines)
    print(text)
    return text


def find(records: list[Record], method: str, world_size: int, length: int) -> Record | None:
    return next((r for r in records if (r.method, r.world_size, r.length) == (method, world_size, length)), None)


def peak_or_estimate(record: Record) -> tuple[int, bool]:
    """The measured peak, or the analytic one (flagged) when the configuration was not run."""
    return (record.peak_bytes, False) if record.peak_bytes is not None else (record.peak_estimate_bytes, True)


def headline(records: list[Record], args: argparse.Namespace) -> dict[str, Any]:
    """The issue's acceptance numbers: weak scaling, memory ratios at (L, P) = (16k, 4), and
    ring-attention time over MQSP time at P=2."""
    out: dict[str, Any] = {"weak_scaling": [], "memory_ratios": {}, "ring_over_mqsp_time_p2": {}}
    for base in args.lengths:
        series = [find(records, "mqsp", p, base * p) for p in (1, 2, 4)]
        peaks = [r.peak_bytes for r in series if r is not None and r.peak_bytes is not None]
        if len(peaks) == 3:
            out["weak_scaling"].append({"l": base, "peaks_bytes": peaks, "max_over_min": max(peaks) / min(peaks)})
    ours = find(records, "mqsp", 4, args.ratio_length)
    if ours is not None and ours.peak_bytes is not None:
        for name in METHODS:
            other = find(records, name, 4, args.ratio_length)
            if name != "mqsp" and other is not None:
                peak, estimated = peak_or_estimate(other)
                out["memory_ratios"][name] = {"ratio": peak / ours.peak_bytes, "analytic": estimated}
    for length in args.lengths:
        ours, ring = find(records, "mqsp", 2, length), find(records, "ring", 2, length)
        if ours and ring and ours.time_s and ring.time_s:
            out["ring_over_mqsp_time_p2"][length] = ring.time_s / ours.time_s
    return out


def print_headline(summary: dict[str, Any], ratio_length: int) -> str:
    lines = ["", "Weak scaling of mqsp (l = L/P fixed, P = 1, 2, 4): per-rank peak"]
    for row in summary["weak_scaling"]:
        peaks = ", ".join(fmt_bytes(p) for p in row["peaks_bytes"])
        within = "within" if row["max_over_min"] <= 1.1 else "OUTSIDE"
        lines.append(f"  l={row['l']:>6}: {peaks}  max/min = {row['max_over_min']:.3f} ({within} 10%)")
    lines.append(f"Per-rank peak of each baseline / mqsp at L={ratio_length}, P=4 (analytic where not run):")
    for name, row in summary["memory_ratios"].items():
        lines.append(f"  {name:<8} {row['ratio']:8.2f}x{'  (analytic)' if row['analytic'] else ''}")
    lines.append("fwd+bwd time of ring attention / mqsp at P=2 (>1: mqsp faster):")
    for length, ratio in summary["ring_over_mqsp_time_p2"].items():
        lines.append(f"  L={length:>6}: {ratio:.2f}")
    text = "\n".join(lines)
    print(text)
    return text


def plot_scaling(records: list[Record], world_sizes: list[int], path: Path, setting: str) -> None:
    """Peak memory and time against L (log-log), one panel per P, one line per method; analytic
    peaks of configurations not run are drawn hollow on a dotted line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(world_sizes), figsize=(4.2 * len(world_sizes), 7.5), squeeze=False, sharey="row")
    for col, p in enumerate(world_sizes):
        mem_ax, time_ax = axes[0][col], axes[1][col]
        for i, name in enumerate(METHODS):
            color = f"C{i}"
            rows = sorted((r for r in records if r.method == name and r.world_size == p), key=lambda r: r.length)
            measured = [(r.length, r.peak_bytes / MiB) for r in rows if r.peak_bytes is not None]
            analytic = [(r.length, r.peak_estimate_bytes / MiB) for r in rows if r.peak_bytes is None and "would need" in r.status]
            if measured:
                mem_ax.plot(*zip(*measured), "o-", color=color, label=name)
            if analytic:
                joined = measured[-1:] + analytic
                mem_ax.plot(*zip(*joined), ":", color=color)
                mem_ax.plot(*zip(*analytic), "o", mfc="none", color=color)
            timed = [(r.length, r.time_s) for r in rows if r.time_s is not None]
            if timed:
                time_ax.plot(*zip(*timed), "o-", color=color, label=name)
        mem_ax.set_title(f"P = {p}, {setting}")
        for ax, label in ((mem_ax, "peak memory per rank (MiB)"), (time_ax, "fwd+bwd time (s)")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("sequence length L")
            ax.grid(True, which="both", alpha=0.3)
            if col == 0:
                ax.set_ylabel(label)
    axes[0][0].legend(fontsize=8, title="hollow: analytic,\nnot run", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_ratios(records: list[Record], world_sizes: list[int], path: Path, setting: str) -> None:
    """MQSP's time and per-rank peak over Ulysses' and over ring attention's against L, one line per
    (baseline, P): the ratios the table prints, where 1 is parity and below 1 MQSP is ahead."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, quantity, label in ((axes[0], "time_s", "fwd+bwd time"), (axes[1], "peak_bytes", "peak memory per rank")):
        for i, name in enumerate(("ulysses", "ring")):
            for p, style in zip(world_sizes, ("o-", "s--", "^:")):
                points = []
                for ours in sorted((r for r in records if (r.method, r.world_size) == ("mqsp", p)), key=lambda r: r.length):
                    other = find(records, name, p, ours.length)
                    if other is not None and getattr(ours, quantity) and getattr(other, quantity):
                        points.append((ours.length, getattr(ours, quantity) / getattr(other, quantity)))
                if points:
                    ax.plot(*zip(*points), style, color=f"C{i + 3}", label=f"mqsp / {name}, P={p}")
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length L")
        ax.set_ylabel(f"{label}: mqsp / baseline")
        ax.set_title(f"{label} ({setting})")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_weak_scaling(records: list[Record], lengths: list[int], path: Path) -> None:
    """Per-rank peak against P with l = L/P held fixed: flat is linear memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    styles = ["-", "--", "-.", ":"]
    for i, name in enumerate(METHODS):
        for j, base in enumerate(lengths):
            points = [(p, *peak_or_estimate(r)) for p in (1, 2, 4) if (r := find(records, name, p, base * p)) is not None]
            points = [(p, peak / MiB, est) for p, peak, est in points if peak]
            if len(points) < 2:
                continue
            ax.plot([p for p, _, _ in points], [m for _, m, _ in points], styles[j % len(styles)], color=f"C{i}",
                    label=f"{name}, l={base}")
            ax.scatter([p for p, _, e in points], [m for _, m, e in points], color=f"C{i}",
                       facecolors=["none" if e else f"C{i}" for _, _, e in points])
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks([1, 2, 4], ["1", "2", "4"])
    ax.set_xlabel("ranks P (L = l x P)")
    ax.set_ylabel("peak memory per rank (MiB)")
    ax.set_title("Weak scaling: doubling L and P together (hollow: analytic)")
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_micro_q(records: list[Record], auto: int, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(records, key=lambda r: r.micro_q_size or 0)
    sizes = [r.micro_q_size for r in rows]
    fig, mem_ax = plt.subplots(figsize=(6.5, 4.2))
    time_ax = mem_ax.twinx()
    mem_ax.plot(sizes, [r.peak_bytes / MiB for r in rows], "o-", color="C0", label="peak memory per rank")
    time_ax.plot(sizes, [r.time_s for r in rows], "s--", color="C1", label="fwd+bwd time")
    mem_ax.axvline(auto, color="grey", linestyle=":")
    mem_ax.annotate(f"auto_micro_q_size = {auto}", (auto, 0.95), xycoords=("data", "axes fraction"), ha="center", fontsize=8,
                    bbox=dict(boxstyle="round", fc="white", ec="grey"))
    mem_ax.set_xscale("log", base=2)
    mem_ax.set_xlabel("micro_q_size (local query rows per micro-step)")
    mem_ax.set_ylabel("peak memory per rank (MiB)", color="C0")
    time_ax.set_ylabel("fwd+bwd time (s)", color="C1")
    mem_ax.set_title(title)
    mem_ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Modes


def run_scaling(args: argparse.Namespace) -> None:
    info = machine()
    records: list[Record] = []
    check_errors = {}
    args.out.mkdir(parents=True, exist_ok=True)
    resumed = json.loads(args.resume.read_text()) if args.resume else {"check_errors": {}, "records": []}
    info["resumed_run_machine"] = resumed.get("machine")  # where and when the reused records were measured
    for p in args.world_sizes:
        reused = [refreshed(Record(**r), args) for r in resumed["records"] if r["world_size"] == p]
        if reused:
            print(f"P={p}: {len(reused)} records reused from {args.resume}", flush=True)
            records += reused
            check_errors[p] = resumed["check_errors"].get(str(p), {})
            continue
        tasks, skipped = planned_records(args, p)
        records += skipped
        configurations = sum(len(t.variants) for t in tasks)
        threads = threads_per_rank(p)
        print(f"P={p}: {configurations} configurations to run ({threads} thread(s) per rank), {len(skipped)} not run", flush=True)
        if tasks:
            result = run_on_ranks(p, threads_per_rank(p), check_shape_for(args, p), tasks)
            check_errors[p] = result["check_errors"]
            records += [Record(**r) for r in result["records"]]
            # Keep what is done so far: a long run cut short still leaves its finished world sizes.
            partial = {"check_errors": check_errors, "records": [asdict(r) for r in records]}
            (args.out / "attention.partial.json").write_text(json.dumps(partial))
    info["load_average_at_end"] = os.getloadavg()
    print(f"\nChecked against float64 SDPA at L={args.check_length} before timing; worst relative error per P: "
          + ", ".join(f"P={p}: {max(max(e.values()) for e in errs.values()):.1e}" for p, errs in check_errors.items() if errs))
    table = print_table(records)
    ratios = print_ratios(records)
    summary = headline(records, args)
    summary_text = print_headline(summary, args.ratio_length)
    name = "attention_causal" if args.causal else "attention"
    (args.out / f"{name}.json").write_text(json.dumps({
        "machine": info, "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "check_errors": check_errors, "records": [asdict(r) for r in records], "headline": summary,
    }, indent=1))
    (args.out / f"{name}.txt").write_text(table + "\n\n" + ratios + "\n" + summary_text + "\n")
    plot_scaling(records, sorted(args.world_sizes), args.out / f"{name}_scaling.png", "causal" if args.causal else "no mask")
    plot_ratios(records, sorted(args.world_sizes), args.out / f"{name}_ratios.png", "causal" if args.causal else "no mask")
    # The two longest complete series: more lines than that make the plot unreadable.
    plot_weak_scaling(records, [length for length in args.lengths if length * 4 in args.lengths][-2:],
                      args.out / ("weak_scaling_causal.png" if args.causal else "weak_scaling.png"))
    print(f"\nload average start {info['load_average_at_start']}, end {info['load_average_at_end']}; wrote {args.out}/")


def run_micro_q_sweep(args: argparse.Namespace) -> None:
    info = machine()
    p, length = args.sweep_world_size, args.sweep_length
    shape = Shape(args.batch, args.heads, length, args.head_dim, p, args.causal)
    auto = auto_micro_q_size(shape.local_length, p)
    sizes = sorted({c for c in args.micro_q_sizes if c <= shape.local_length} | {auto})
    tasks = [Task(shape, tuple(Variant("mqsp", c) for c in sizes), args.repeats)]
    print(f"micro_q_size sweep at L={length}, P={p} (auto = {auto}): {sizes}", flush=True)
    result = run_on_ranks(p, threads_per_rank(p), check_shape_for(args, p), tasks)
    records = [Record(**r) for r in result["records"]]
    info["load_average_at_end"] = os.getloadavg()
    lines = [f"{'micro_q_size':>12} {'gathered rows':>13} {'peak/rank':>11} {'fwd+bwd s':>10}"]
    for r in records:
        mark = "  <- auto" if r.micro_q_size == auto else ""
        lines.append(f"{r.micro_q_size:>12} {p * r.micro_q_size:>13} {fmt_bytes(r.peak_bytes):>11} {r.time_s:>10.3f}{mark}")
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "micro_q.json").write_text(json.dumps({
        "machine": info, "length": length, "world_size": p, "auto_micro_q_size": auto,
        "records": [asdict(r) for r in records],
    }, indent=1))
    (args.out / "micro_q.txt").write_text(table + "\n")
    plot_micro_q(records, auto, args.out / "micro_q.png", f"mqsp_attention, L={length}, P={p}, H={args.heads}, D={args.head_dim}")
    print(f"load average start {info['load_average_at_start']}, end {info['load_average_at_end']}; wrote {args.out}/")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, fewer repeats: about a minute")
    parser.add_argument("--micro-q-sweep", action="store_true", help="sweep micro_q_size at --sweep-length, --sweep-world-size instead")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--causal", action="store_true", help="causal attention (MQSP and ring attention in the zigzag layout)")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS),
                        help=f"default: {' '.join(FULL_METHODS)}; with --causal {' '.join(CAUSAL_METHODS)}")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="timed fwd+bwd runs after the MemTracker'd warm-up")
    parser.add_argument("--time-max-length", type=int, default=16384, help="longer L: memory and bytes only")
    parser.add_argument("--max-local-length", type=int, default=8192, help="larger l = L/P is not run (compute time)")
    parser.add_argument("--rank-budget-gib", type=float, default=8.0)
    parser.add_argument("--total-budget-gib", type=float, default=20.0, help="for all ranks of one run together")
    parser.add_argument("--check-length", type=int, default=1024, help="L of the check against float64 SDPA")
    parser.add_argument("--ratio-length", type=int, default=16384, help="L of the P=4 memory ratios")
    parser.add_argument("--sweep-length", type=int, default=8192)
    parser.add_argument("--sweep-world-size", type=int, default=2)
    parser.add_argument("--micro-q-sizes", type=int, nargs="+", default=[32, 64, 128, 256, 512, 1024, 2048, 4096])
    parser.add_argument("--resume", type=Path, help="attention.json or attention.partial.json of an earlier run (same "
                        "--batch, --heads, --head-dim): its world sizes are reused, not rerun; with all of them, only the report is redone")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out")
    if parser.parse_known_args(argv)[0].quick:  # smaller defaults; flags given explicitly still win
        parser.set_defaults(lengths=[1024, 2048, 4096], repeats=2, check_length=256, ratio_length=4096,
                            sweep_length=4096, micro_q_sizes=[64, 256, 1024])
    args = parser.parse_args(argv)
    if args.methods is None:
        args.methods = CAUSAL_METHODS if args.causal else FULL_METHODS
    return args


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    (run_micro_q_sweep if args.micro_q_sweep else run_scaling)(args)
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
