"""Peak memory per rank of one training step of a Hugging Face model, estimated without running it.

One step = forward, backward and an AdamW step (optimizer state already allocated, as in every
step after the first), at full sequence length L split over P sequence-parallel ranks (batch 1
by default). Every attention layer of the model runs one of the methods of
:mod:`benchmarks.baselines` (registered with ``transformers.AttentionInterface``), everything
else runs on this rank's l = L / P tokens. The step runs under ``FakeTensorMode`` (no storage is
allocated, no arithmetic done) on a fake process group of P ranks, and ``MemTracker`` records
the peak of live tensor bytes, by category. The same code measures a real step on a real process
group: that is how the estimate is validated (``tests/test_estimate.py``); the step itself is :mod:`lightning_mqsp.estimate`, which this
script extends with the baseline methods and the tables.

    python benchmarks/estimate_memory.py                # max-length table for BERT-large (~15 min)
    python benchmarks/estimate_memory.py --quick        # P in {1, 8}, 40 GB only
    python benchmarks/estimate_memory.py --micro-q-sweep

writes ``benchmarks/out/estimate_memory.json``, the tables between the generated markers of
``docs/scaling.md`` and ``docs/img/max_length.png``.

What a fake CPU run cannot see, and what is assumed about it:
- Memory inside kernels (flash-attention tiles, GEMM workspaces), the CUDA context and allocator
  fragmentation: neither a fake nor a real MemTracker run counts them. The budgets are read as
  bytes of live tensors, in decimal GB (40e9 leaves ~2.7 GiB of a 40 GiB card for those).
- Attention kernels: a fused flash kernel on a GPU returns the same tensors (out and a float32
  log-sum-exp) as aten's CPU flash kernel that the baselines and MQSP's ``cpu_flash`` backend
  run here, so its footprint is taken to be the CPU kernel's.
- Mixed precision is CPU autocast. Its cast policy keeps softmax and layer_norm in bf16, where
  CUDA autocast runs them in float32: the materialised score maps of dense, RSA and Megatron-style
  attention would be up to twice as large on a GPU, so their estimates here are optimistic.
- Causal models (GPT-2, Llama) are estimated with non-causal attention: the baselines are
  non-causal, and a fused kernel allocates no mask.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

sys.path.append(str(Path(__file__).resolve().parents[1]))  # `benchmarks` from anywhere, after the installed packages

import lightning_mqsp.attention
from benchmarks.baselines import METHODS
from benchmarks.baselines.common import Shape
from lightning_mqsp import count_communication
from lightning_mqsp.estimate import (
    _FULL_RECIPES,
    ATTENTION_METHODS,
    ESTIMATE_GATHERED_ROWS,
    GB,
    LOSS_CHUNK,
    MLP_TILE,
    PRECISIONS,
    PROBE_LAYERS,
    RECIPE_CHECK_LAYERS,
    RECIPE_LABELS,
    RECIPE_PROBE_LAYERS,
    RECIPES,
    GiB,
    Setup,
    StepMemory,
    _at_depth,
    _probes,
    attention_heads,
    build_model,
    estimate_training_step,
    extrapolated_memory,
    extrapolated_peak,
    fake_world,
    quiet,
)
from lightning_mqsp.models import MODELS

# The baselines run in the same fake step as MQSP (the package's estimator runs MQSP itself).
ATTENTION_METHODS.update({name: method.attention for name, method in METHODS.items() if name != "mqsp"})

ROOT = Path(__file__).resolve().parents[1]
#: Paper's headline (abstract): BERT-large at 78,848 tokens on 32 A100s, 4.5x RSA and 4.3x Megatron-LM 3.
PAPER_MAX_LENGTH = 78_848
PAPER_RATIOS = {"rsa": 4.5, "megatron_sp": 4.3}
#: Every searched length is a multiple of this (and so of every P up to 512).
LENGTH_GRANULARITY = 512


def method_applies(method: str, model: str, world_size: int) -> bool:
    """Ulysses and head-split tensor parallelism need the heads to divide by P."""
    heads, _ = attention_heads(MODELS[model](LENGTH_GRANULARITY))
    return method not in ("ulysses", "megatron_sp") or heads % world_size == 0


#: Lengths (in granules) every search evaluates first, to fit the peak's quadratic in L.
PROBE_GRANULES = (8, 32, 128)


def max_length(
    model: str, method: str, world_size: int, budget_bytes: int, precision: str, peak: Callable[[Setup], int],
    cache: dict[int, int],
) -> int:
    """The longest L (a multiple of LENGTH_GRANULARITY) whose peak fits the budget: a binary search
    on the estimate, bracketed around the length where the quadratic fitted to the probe peaks
    meets the budget (so it needs a handful of estimates, not twenty). ``cache`` maps L -> peak for
    this (model, method, P, precision) and is shared between budgets. 0 if one granule does not fit."""

    def fits(granules: int) -> bool:
        if granules == 0:
            return True
        length = granules * LENGTH_GRANULARITY
        if length not in cache:
            cache[length] = peak(Setup(model, method, length, world_size, precision))
        return cache[length] <= budget_bytes

    for granules in PROBE_GRANULES:
        fits(granules)
    good = bad = _fit_guess(cache, budget_bytes)
    step = 1
    while not fits(good):  # walk down, doubling the stride, to a length that fits
        bad, good, step = good, max(good - step, 0), step * 2
    step = 1
    while bad == good or fits(bad):  # walk up to one that does not
        good, bad, step = bad, bad + step, step * 2
    while bad - good > 1:
        middle = (good + bad) // 2
        good, bad = (middle, bad) if fits(middle) else (good, middle)
    return good * LENGTH_GRANULARITY


def analytic_communication(setup: Setup, itemsize: int) -> dict[str, int]:
    """Bytes per attention layer per rank (forward + backward) from the method's formula."""
    heads, head_dim = attention_heads(setup.config())
    if setup.method == "mqsp":
        dtype = torch.bfloat16 if itemsize == 2 else torch.float32
        return lightning_mqsp.attention.communication_bytes(
            batch=setup.batch, heads=heads, kv_heads=heads, local_length=setup.local_length, head_dim=head_dim,
            world_size=setup.world_size, dtype=dtype, include_check=True,  # each estimate runs on a new fake group
            aligned_rows=False,  # the CPU backends' rows: the estimate runs them
        )
    shape = Shape(setup.batch, heads, setup.length, head_dim, setup.world_size, itemsize=itemsize)
    return METHODS[setup.method].communication_bytes(shape)


def counted_communication(setup: Setup) -> dict[str, int]:
    """Bytes per attention layer per rank counted at the collectives' call sites in a fake
    one-layer training step (the counter works under the fake process group: it counts shapes)."""
    with count_communication() as counter:
        estimate_training_step(replace(setup, num_layers=1))
    return dict(counter.bytes_sent)


def _attention_itemsize(precision: str) -> int:
    return 4 if precision == "32-true" else 2


#: Upper clamp of the fitted guess (in granules): 33.5M tokens, far beyond any budget here.
MAX_GUESS_GRANULES = 2**16


def _fit_guess(cache: dict[int, int], budget_bytes: int) -> int:
    """Length (in granules) where the peaks' fit meets the budget: peak(L) is a quadratic in L for
    the methods with a score map, affine for the others (whose fitted curvature is noise, so they
    get the line through the two longest probes). The binary search then starts next to it."""
    lengths = sorted(cache)
    xs, ys = [x / LENGTH_GRANULARITY for x in lengths], [cache[x] for x in lengths]
    c2, c1, c0 = _quadratic(xs, ys)
    if c2 * xs[-1] <= 0.01 * max(c1, 1.0):  # curvature negligible (or negative) over the probed range
        c1, c0 = _line(xs[-2:], ys[-2:])
        guess = (budget_bytes - c0) / c1 if c1 > 0 else MAX_GUESS_GRANULES
    else:
        guess = (-c1 + math.sqrt(max(c1 * c1 - 4 * c2 * (c0 - budget_bytes), 0.0))) / (2 * c2)
    return int(min(max(guess, 1), MAX_GUESS_GRANULES))


def _line(xs: list[float], ys: list[int]) -> tuple[float, float]:
    slope = (ys[-1] - ys[0]) / (xs[-1] - xs[0])
    return slope, ys[0] - slope * xs[0]


def _quadratic(xs: list[float], ys: list[int]) -> tuple[float, float, float]:
    """Coefficients (c2, c1, c0) of the least-squares quadratic through the points."""
    import numpy as np

    c2, c1, c0 = np.polyfit(np.array(xs), np.array(ys, dtype=np.float64), 2)
    return float(c2), float(c1), float(c0)


#: Methods in table order, MQSP first.
METHOD_ORDER = ("mqsp", "dense", "rsa", "megatron_sp", "ring", "ulysses")
METHOD_LABELS = {
    "mqsp": "MQSP (ours)", "dense": "dense (all-gather K/V, l x L map)", "rsa": "Ring Self-Attention (ColossalAI)",
    "megatron_sp": "Megatron-LM 3 style TP+SP (H/P heads, L x L map)", "ring": "ring attention (online softmax)",
    "ulysses": "Ulysses",
}
DOC_PATH = ROOT / "docs" / "scaling.md"
PLOT_PATH = ROOT / "docs" / "img" / "max_length.png"
GENERATED_START, GENERATED_END = "<!-- generated by benchmarks/estimate_memory.py: start -->", "<!-- generated: end -->"


def max_length_table(
    model: str, world_sizes: list[int], budgets_gb: list[int], precision: str, log: Callable[[str], None],
) -> dict[str, dict[str, dict[str, int | None]]]:
    """{method: {P: {budget GB: max L or None where the method cannot run on P ranks}}}."""
    table: dict[str, dict[str, dict[str, int | None]]] = {}
    for method in METHOD_ORDER:
        table[method] = {}
        for world_size in world_sizes:
            cache: dict[int, int] = {}
            row: dict[str, int | None] = {}
            for budget in budgets_gb:
                started = time.time()
                applies = method_applies(method, model, world_size)
                row[str(budget)] = (
                    max_length(model, method, world_size, budget * GB, precision, extrapolated_peak, cache) if applies else None
                )
                elapsed = time.time() - started
                log(f"{method:12s} P={world_size:2d} {budget} GB: L_max={row[str(budget)]} ({len(cache)} estimates, {elapsed:.0f} s)")
            table[method][str(world_size)] = row
    return table


#: Arctic Long Sequence Training (ALST, arXiv 2506.13996): Llama-8B's longest trained sequence on 1, 8 and 32
#: H100s of 80 GB (Ulysses, ZeRO-3, tiled MLP and loss, offloaded activation checkpoints), as published.
ALST_PUBLISHED = {1: 500_000, 8: 3_700_000, 32: 15_000_000}
RECIPE_WORLD_SIZES = (1, 8, 32)
#: Lengths the recipe search returns are multiples of this many tokens per rank.
RECIPE_LOCAL_GRANULARITY = 1024


def recipe_max_length(model: str, recipe: str, world_size: int, budget_bytes: int, precision: str) -> dict[str, Any]:
    """The longest L whose full-depth device peak fits ``budget_bytes`` (to 2%), with the host memory the offload
    then needs and the share of the peak that is attention."""
    def setup(length: int, method: str = "mqsp") -> Setup:
        return Setup(model, method, length, world_size, precision, recipe=recipe, attention_backend="triton", optimizer_foreach=False)

    memory: dict[int, tuple[int, int]] = {}
    probes: dict[int, tuple[StepMemory, StepMemory]] = {}
    depth = MODELS[model](RECIPE_LOCAL_GRANULARITY).num_hidden_layers

    def peak(length: int) -> int:
        started = time.time()
        probes[length] = _probes(setup(length), RECIPE_PROBE_LAYERS)
        memory[length] = _at_depth(probes[length], RECIPE_PROBE_LAYERS, depth)
        print(f"  {recipe} P={world_size}: L={length:,} peaks at {memory[length][0] / GB:.1f} GB "
              f"({time.time() - started:.0f} s)", flush=True)  # a P=32 search takes most of an hour: show its progress
        return memory[length][0]

    step = RECIPE_LOCAL_GRANULARITY * world_size
    length = longest_fitting_length(peak, budget_bytes, step)
    if not length:
        return {"length": 0, "peak_bytes": memory[step][0], "note": f"does not fit at L={step:,}"}
    device, host = memory[length]
    without_attention, _ = extrapolated_memory(setup(length, method="none"), RECIPE_PROBE_LAYERS)
    checked = estimate_training_step(replace(setup(length), num_layers=RECIPE_CHECK_LAYERS)).peak_bytes
    depth_check = checked / _at_depth(probes[length], RECIPE_PROBE_LAYERS, RECIPE_CHECK_LAYERS)[0] - 1
    if abs(depth_check) > 0.01:
        print(f"  {recipe} P={world_size}: at L={length:,} a {RECIPE_CHECK_LAYERS}-layer run is {100 * depth_check:+.1f}% off "
              f"the line through {RECIPE_PROBE_LAYERS} layers: the full-depth peak is not affine from there", flush=True)
    return {"length": length, "peak_bytes": device, "host_bytes": host, "attention_share": 1 - without_attention / device,
            "estimates": len(memory), "depth_check": depth_check}


#: The recipe searches' precision: the length found fits, and one longer by this fraction is known not to.
RECIPE_TOLERANCE = 0.02


def longest_fitting_length(peak: Callable[[int], int], budget: int, step: int, tolerance: float = RECIPE_TOLERANCE) -> int:
    """The longest multiple of ``step`` whose ``peak`` fits ``budget``, to ``tolerance``; 0 if ``step`` does not fit.

    Each estimate is a long fake run (up to twenty minutes at P=32), so the search aims: the line through the two
    estimates nearest the budget predicts where the peak meets it, and the search estimates just below and just above
    that point (a third of the tolerance either side), which closes the bracket at once where the peak is affine in L
    near the budget (it is, but its slope changes where the place of the peak moves). After two aimed estimates that
    did not halve the bracket it bisects once, so the search ends however the peak bends."""
    peaks: dict[int, int] = {}

    def fits(length: int) -> bool:
        if length not in peaks:
            peaks[length] = peak(length)
        return peaks[length] <= budget

    def rounded(length: float) -> int:
        return max(step, int(length) // step * step)

    if not fits(step):
        return 0
    good, bad = step, None
    for probe in (16 * step, 64 * step):  # the first line
        if not fits(probe):
            bad = probe
            break
        good = probe
    stalled, margin = 0, 1 + tolerance / 3
    while bad is None or (bad - good > step and bad / good > 1 + tolerance):
        target = _budget_crossing(peaks, budget)
        aimed = [c for c in ((rounded(target / margin), rounded(target * margin)) if target else ())
                 if good < c and (bad is None or c < bad)]
        if bad is None:
            candidate = aimed[0] if aimed else rounded(good * 1.25)
        else:
            candidate = aimed[0] if aimed and stalled < 2 else rounded((good + bad) / 2)
        width = None if bad is None else bad - good
        good, bad = (candidate, bad) if fits(candidate) else (good, candidate)
        stalled = 0 if width is None or bad is None or bad - good <= width / 2 else stalled + 1
    return good


def _budget_crossing(peaks: dict[int, int], budget: int) -> float | None:
    """Where the line through the two estimates whose peaks lie nearest the budget meets it; None if it does not
    rise."""
    (near, near_peak), (other, other_peak) = sorted(peaks.items(), key=lambda item: abs(item[1] - budget))[:2]
    slope = (near_peak - other_peak) / (near - other)
    return near + (budget - near_peak) / slope if slope > 0 else None


def _timed_recipe_max_length(model: str, recipe: str, world_size: int, budget_bytes: int, precision: str) -> tuple[dict[str, Any], float]:
    quiet()  # in a pool's process too
    started = time.time()
    return recipe_max_length(model, recipe, world_size, budget_bytes, precision), time.time() - started


def recipe_table(
    model: str, budget_gb: int, precision: str, log: Callable[[str], None], jobs: int = 1,
    recipes: tuple[str, ...] = RECIPES, world_sizes: tuple[int, ...] = RECIPE_WORLD_SIZES,
    earlier: dict[str, dict[str, dict[str, Any]]] | None = None,
) -> dict[str, dict[str, dict[str, Any]]]:
    """{recipe: {P: recipe_max_length(...)}} for the given recipes and P, ``jobs`` searches at a time (each in a process
    of its own; the longest, the full recipes at large P, first). Each cell records the commit that computed it; the
    cells not searched are taken from ``earlier`` (an earlier run's table) or left out (a P=32 search of a full
    recipe takes over an hour on two cores)."""
    cells = sorted(((recipe, p) for recipe in recipes for p in world_sizes),
                   key=lambda cell: (cell[0] not in _FULL_RECIPES, -cell[1]))
    table: dict[str, dict[str, dict[str, Any]]] = {r: dict((earlier or {}).get(r, {})) for r in RECIPES}
    commit = _commit()
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(_timed_recipe_max_length, model, recipe, p, budget_gb * GB, precision): (recipe, p)
                   for recipe, p in cells}
        for done, future in enumerate(as_completed(futures), 1):
            (recipe, p), (row, seconds) = futures[future], future.result()
            table[recipe][str(p)] = row | {"commit": commit}
            log(f"[{done}/{len(cells)}] {recipe:15s} P={p:2d}: {row} ({seconds:.0f} s)")
    return table


def _commit() -> str:
    """This tree's short commit, with "+" when it has uncommitted changes."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    return (git("rev-parse", "--short", "HEAD") or "unknown") + ("+" if git("status", "--porcelain", "--untracked-files=no") else "")


def recipe_markdown(results: dict[str, Any]) -> str:
    """The generated 8B part of docs/scaling.md: the longest L per recipe and P, host memory, attention's share."""
    settings, table = results["settings"], results["recipes"]
    header = "| recipe | " + " | ".join(f"P={p}" for p in RECIPE_WORLD_SIZES) + " |"
    rule = "|---|" + "---:|" * len(RECIPE_WORLD_SIZES)

    def cell(row: dict[str, Any] | None) -> str:
        if row is None:
            return "not estimated"
        return "does not fit" if not row["length"] else f"{row['length']:,}"

    lines = [
        f"Llama-3.1-8B's shape ({settings['model']}), batch 1, {settings['precision']}, AdamW one parameter at a time (the fused "
        f"kernel's footprint), MQSP attention "
        f"(the Triton kernels' footprint, non-causal), budget = live tensor bytes per device (decimal GB). "
        f"Regenerate: `{settings['command']}`", "",
        f"**Llama-3.1-8B: longest trainable L at {settings['budget_gb']} GB per device**", "", header, rule,
    ]
    for recipe in RECIPES:
        lines.append(f"| {RECIPE_LABELS[recipe]} | " + " | ".join(cell(table[recipe].get(str(p))) for p in RECIPE_WORLD_SIZES) + " |")
    lines.append("| ALST, published (Ulysses + ZeRO-3 + tiled MLP and loss + offloaded checkpoints) | "
                 + " | ".join(f"{ALST_PUBLISHED[p]:,}" for p in RECIPE_WORLD_SIZES) + " |")
    for recipe, title in (("full", "The full recipe"), ("host_parameters", "The full recipe with parameters in host memory")):
        rows = [table[recipe].get(str(p)) or {"length": 0} for p in RECIPE_WORLD_SIZES]

        def fitted(text: Callable[[dict[str, Any]], str], rows: list[dict[str, Any]] = rows) -> str:
            return " | ".join(text(row) if row["length"] else "-" for row in rows)

        lines += ["", f"**{title} at those lengths**", "", "| | " + " | ".join(f"P={p}" for p in RECIPE_WORLD_SIZES) + " |", rule,
                  "| device peak (GB) | " + fitted(lambda row: f"{row['peak_bytes'] / GB:.1f}") + " |",
                  "| host memory per rank (GB) | " + fitted(lambda row: f"{row['host_bytes'] / GB:.1f}") + " |",
                  "| attention's share of the device peak | " + fitted(lambda row: f"{100 * row['attention_share']:.1f}%") + " |",
                  f"| fake run of {RECIPE_CHECK_LAYERS} layers against the line through {RECIPE_PROBE_LAYERS[0]} and "
                  f"{RECIPE_PROBE_LAYERS[1]} layers | "
                  + fitted(lambda row: f"{100 * row['depth_check']:+.2f}%" if "depth_check" in row else "not checked") + " |",
                  "| length / ALST's | " + " | ".join(f"{row['length'] / ALST_PUBLISHED[p]:.2f}x" if row["length"] else "-"
                                                     for p, row in zip(RECIPE_WORLD_SIZES, rows)) + " |"]
    commits = sorted({row.get("commit", "unrecorded") for by_p in table.values() for row in by_p.values()})
    if len(commits) > 1:
        lines += ["", "Cells by the commit that computed them (the run updates only the cells it searches): " + "; ".join(
            f"{c}: " + ", ".join(f"{r} P={p}" for r in RECIPES for p in RECIPE_WORLD_SIZES
                               if table[r].get(str(p), {}).get("commit", "unrecorded" if str(p) in table[r] else None) == c)
            for c in commits) + "."]
    return "\n".join(lines)


RECIPE_GENERATED_START = "<!-- generated by benchmarks/estimate_memory.py --model llama-8b: start -->"


#: One method without and one with a score map: a 24-layer fake run takes minutes on a loaded CPU.
LINEARITY_METHODS = ("mqsp", "dense")


def check_layer_linearity(model: str, world_size: int, length: int, precision: str) -> list[dict[str, Any]]:
    """Full-depth fake runs against the two-layer extrapolation, per method."""
    rows = []
    for method in LINEARITY_METHODS:
        setup = Setup(model, method, length, world_size, precision)
        full = estimate_training_step(setup).peak_bytes
        extrapolated = extrapolated_peak(setup)
        rows.append({"method": method, "length": length, "world_size": world_size, "full_depth_bytes": full,
                     "extrapolated_bytes": extrapolated, "relative_difference": extrapolated / full - 1})
    return rows


def communication_table(model: str, length: int, world_size: int, precision: str) -> list[dict[str, Any]]:
    """Counted (fake one-layer step) and analytic bytes per attention layer per rank, per method."""
    rows = []
    for method in METHOD_ORDER:
        if not method_applies(method, model, world_size):
            continue
        setup = Setup(model, method, length, world_size, precision)
        counted = counted_communication(setup)
        analytic = analytic_communication(setup, _attention_itemsize(precision))
        rows.append({"method": method, "counted": counted, "analytic": analytic,
                     "counted_total": sum(counted.values()), "analytic_total": sum(analytic.values())})
    return rows


def micro_q_sweep(model: str, length: int, world_size: int, precision: str, gathered_rows: list[int]) -> list[dict[str, Any]]:
    """MQSP's step peak (2 layers) and the fake run's time against the gathered rows per micro-step."""
    rows = []
    for rows_per_step in gathered_rows:
        setup = Setup(model, "mqsp", length, world_size, precision, num_layers=2, micro_q_size=rows_per_step // world_size)
        started = time.time()
        memory = estimate_training_step(setup)
        rows.append({"gathered_rows": rows_per_step, "micro_q_size": rows_per_step // world_size,
                     "peak_bytes": memory.peak_bytes, "seconds": time.time() - started})
    return rows


def model_comparison(models: list[str], length: int, world_size: int, precisions: list[str]) -> list[dict[str, Any]]:
    """Full-depth (extrapolated) peak of every method on several models and precisions at one L, P."""
    rows = []
    for model in models:
        for precision in precisions:
            for method in METHOD_ORDER:
                if method_applies(method, model, world_size):
                    peak = extrapolated_peak(Setup(model, method, length, world_size, precision))
                    rows.append({"model": model, "precision": precision, "method": method, "peak_bytes": peak})
    return rows


def peak_breakdown(model: str, length: int, world_size: int, precision: str) -> dict[str, Any]:
    """MQSP's full-depth peak by MemTracker category, with the sizes of the tensors that bound it."""
    setup = Setup(model, "mqsp", length, world_size, precision)
    config = setup.config()
    memory = estimate_training_step(setup)
    local_tokens = setup.batch * setup.local_length
    return {
        "length": length, "world_size": world_size, "peak_bytes": memory.peak_bytes, "by_category": memory.by_category,
        "logits_float32_bytes": local_tokens * config.vocab_size * 4,
        "position_table_bytes": config.max_position_embeddings * config.hidden_size * 4,
        "parameters": sum(p.numel() for p in _parameter_shapes(setup)),
    }


def _parameter_shapes(setup: Setup) -> list[Tensor]:
    with fake_world(setup.world_size):
        return list(build_model(replace(setup, num_layers=setup.config().num_hidden_layers), None).parameters())


def _format_length(length: int | None) -> str:
    return "n/a" if length is None else f"{length:,}"


def markdown(results: dict[str, Any]) -> str:
    """The generated part of docs/scaling.md."""
    settings = results["settings"]
    budgets = settings["budgets_gb"]
    lines = [
        f"Model {settings['model']}, batch {settings['batch']}, precision {settings['precision']}, AdamW (foreach), "
        f"budget = live tensor bytes per rank (decimal GB). Regenerate: `{settings['command']}`",
        "",
    ]
    for budget in budgets:
        header = "| method | " + " | ".join(f"P={p}" for p in settings["world_sizes"]) + " |"
        lines += [f"**Longest trainable L at {budget} GB per device**", "", header,
                  "|---|" + "---:|" * len(settings["world_sizes"])]
        for method in METHOD_ORDER:
            cells = [_format_length(results["max_length"][method][str(p)][str(budget)]) for p in settings["world_sizes"]]
            lines.append(f"| {METHOD_LABELS[method]} | " + " | ".join(cells) + " |")
        lines += ["", f"Ratio MQSP / method at {budget} GB:", "", header, "|---|" + "---:|" * len(settings["world_sizes"])]
        for method in METHOD_ORDER[1:]:
            cells = []
            for p in settings["world_sizes"]:
                ours, theirs = (results["max_length"][m][str(p)][str(budget)] for m in ("mqsp", method))
                cells.append("n/a" if not theirs or ours is None else f"{ours / theirs:.2f}x")
            lines.append(f"| {METHOD_LABELS[method]} | " + " | ".join(cells) + " |")
        lines.append("")
    comm = results["communication"]
    lines += [f"**Bytes sent per attention layer per rank (forward + backward), L={comm['length']:,}, P={comm['world_size']}**", "",
              "| method | counted (fake run) | analytic formula | by collective (counted) |", "|---|---:|---:|---|"]
    for row in comm["rows"]:
        detail = ", ".join(f"{k} {v / 2**20:,.1f} MiB" for k, v in row["counted"].items())
        lines.append(f"| {METHOD_LABELS[row['method']]} | {row['counted_total'] / 2**20:,.1f} MiB | "
                     f"{row['analytic_total'] / 2**20:,.1f} MiB | {detail} |")
    lines += ["", "**Per-layer extrapolation against full-depth fake runs**", "",
              "| method | L | P | full depth | extrapolated | difference |", "|---|---:|---:|---:|---:|---:|"]
    for row in results["layer_linearity"]:
        lines.append(f"| {row['method']} | {row['length']:,} | {row['world_size']} | {row['full_depth_bytes'] / GiB:.3f} GiB | "
                     f"{row['extrapolated_bytes'] / GiB:.3f} GiB | {100 * row['relative_difference']:+.3f}% |")
    if results.get("micro_q_sweep"):
        sweep = results["micro_q_sweep"]
        lines += ["", f"**MQSP micro-step size (2 layers, L={sweep['length']:,}, P={sweep['world_size']})**", "",
                  "| gathered rows per step | micro_q_size | peak | fake-run time |", "|---:|---:|---:|---:|"]
        for row in sweep["rows"]:
            lines.append(
                f"| {row['gathered_rows']:,} | {row['micro_q_size']:,} | {row['peak_bytes'] / GiB:.3f} GiB | {row['seconds']:.1f} s |"
            )
    if results.get("models"):
        comparison = results["models"]
        lines += ["", f"**Peak per rank at L={comparison['length']:,}, P={comparison['world_size']} (GiB)**", "",
                  "| model | precision | " + " | ".join(METHOD_ORDER) + " |", "|---|---|" + "---:|" * len(METHOD_ORDER)]
        keyed = {(r["model"], r["precision"], r["method"]): r["peak_bytes"] for r in comparison["rows"]}
        for model, precision in dict.fromkeys((r["model"], r["precision"]) for r in comparison["rows"]):
            cells = [f"{keyed[(model, precision, m)] / GiB:.1f}" if (model, precision, m) in keyed else "n/a" for m in METHOD_ORDER]
            lines.append(f"| {model} | {precision} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_doc(generated: str, path: Path = DOC_PATH, start: str = GENERATED_START) -> None:
    """Replace the text between the ``start`` marker and the next end marker of docs/scaling.md (appended if missing)."""
    text = path.read_text() if path.exists() else "# Scaling\n"
    if start not in text:
        text = f"{text.rstrip()}\n\n{start}\n{GENERATED_END}\n"
    head, rest = text.split(start)
    _, tail = rest.split(GENERATED_END, 1)
    path.write_text(f"{head}{start}\n{generated}\n{GENERATED_END}{tail}")


def plot(results: dict[str, Any], path: Path = PLOT_PATH) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = results["settings"]
    figure, axes = plt.subplots(1, len(settings["budgets_gb"]), figsize=(6 * len(settings["budgets_gb"]), 4.5), sharey=True)
    for axis, budget in zip(list(getattr(axes, "flat", [axes])), settings["budgets_gb"]):
        for method in METHOD_ORDER:
            points = [(p, results["max_length"][method][str(p)][str(budget)]) for p in settings["world_sizes"]]
            points = [(p, length) for p, length in points if length]
            axis.plot(*zip(*points), marker="o", label=METHOD_LABELS[method], linewidth=2.5 if method == "mqsp" else 1.2)
        axis.axhline(PAPER_MAX_LENGTH, color="grey", linestyle=":", label="paper: 78,848 at P=32 (A100)")
        title = f"{settings['model']}, {settings['precision']}, {budget} GB per device"
        axis.set(xscale="log", yscale="log", xlabel="ranks P", title=title)
        axis.set_xticks(settings["world_sizes"], [str(p) for p in settings["world_sizes"]])
        axis.grid(True, which="both", alpha=0.3)
    next(iter(getattr(axes, "flat", [axes]))).set_ylabel("longest trainable sequence L (tokens)")
    list(getattr(axes, "flat", [axes]))[-1].legend(fontsize=7)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bert-large", choices=list(MODELS))
    parser.add_argument("--precision", default="bf16-mixed", choices=PRECISIONS)
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 4, 8, 16, 32])
    parser.add_argument("--budgets-gb", type=int, nargs="+", default=[40, 80])
    parser.add_argument("--quick", action="store_true", help="P in {1, 8}, 40 GB, no model comparison")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "estimate_memory.json")
    parser.add_argument("--no-doc", action="store_true", help="do not touch docs/scaling.md and the plot")
    parser.add_argument("--jobs", type=int, default=1, help="--model llama-8b: length searches run at once, one process each")
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=RECIPES,
                        help="--model llama-8b: the recipes to search; the other cells come from the last run's JSON")
    parser.add_argument("--recipe-world-sizes", type=int, nargs="+", default=list(RECIPE_WORLD_SIZES),
                        choices=RECIPE_WORLD_SIZES, help="--model llama-8b: the P to search (the same)")
    args = parser.parse_args()
    if args.quick:
        args.world_sizes, args.budgets_gb = [1, 8], [40]

    def log(message: str) -> None:
        print(message, flush=True)

    if args.model in ("llama-8b", "tiny-llama"):  # the training recipes of MQSP on a Llama (docs/scaling.md)
        budget = args.budgets_gb[-1] if args.budgets_gb != [40, 80] else 80
        recipe_results = {"settings": {
            "model": args.model, "precision": args.precision, "budget_gb": budget, "torch": torch.__version__,
            "mqsp_gathered_rows_per_step": ESTIMATE_GATHERED_ROWS, "loss_chunk": LOSS_CHUNK, "mlp_tile": MLP_TILE,
            "probe_layers": RECIPE_PROBE_LAYERS,
            "command": f"python benchmarks/estimate_memory.py --model {args.model}",
        }}
        path = args.out.with_name(f"estimate_memory_{args.model}.json")
        partial = tuple(args.recipes) != RECIPES or tuple(args.recipe_world_sizes) != RECIPE_WORLD_SIZES
        earlier = json.loads(path.read_text())["recipes"] if partial and path.exists() else None
        recipe_results["recipes"] = recipe_table(args.model, budget, args.precision, log, args.jobs, tuple(args.recipes),
                                                 tuple(args.recipe_world_sizes), earlier)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(recipe_results, indent=1))
        generated = recipe_markdown(recipe_results)
        print(generated)
        if not args.no_doc and args.model == "llama-8b":
            write_doc(generated, start=RECIPE_GENERATED_START)
        return

    largest_p = max(args.world_sizes)
    comm_length = 64 * 1024
    results: dict[str, Any] = {"settings": {
        "model": args.model, "precision": args.precision, "batch": 1, "world_sizes": args.world_sizes,
        "budgets_gb": args.budgets_gb, "length_granularity": LENGTH_GRANULARITY, "probe_layers": PROBE_LAYERS,
        "mqsp_gathered_rows_per_step": ESTIMATE_GATHERED_ROWS, "torch": torch.__version__,
        "command": "python benchmarks/estimate_memory.py" + (" --quick" if args.quick else ""),
    }}
    results["micro_q_sweep"] = {"length": 131072, "world_size": 8, "rows": micro_q_sweep(
        args.model, 131072, 8, args.precision, [2048, 8192, 32768, 131072])}
    log(f"micro-q sweep: {results['micro_q_sweep']['rows']}")
    results["layer_linearity"] = check_layer_linearity(args.model, 8, 32768, args.precision)
    log(f"layer linearity: {results['layer_linearity']}")
    results["communication"] = {"length": comm_length, "world_size": largest_p, "precision": args.precision,
                                "rows": communication_table(args.model, comm_length, largest_p, args.precision)}
    results["max_length"] = max_length_table(args.model, args.world_sizes, args.budgets_gb, args.precision, log)
    breakdown_length = results["max_length"]["mqsp"][str(largest_p)][str(args.budgets_gb[0])] or comm_length
    results["mqsp_peak_breakdown"] = peak_breakdown(args.model, breakdown_length, largest_p, args.precision)
    log(f"MQSP peak breakdown: {results['mqsp_peak_breakdown']}")
    if not args.quick:
        results["models"] = {"length": 16384, "world_size": 8, "rows": model_comparison(
            ["bert-base", "bert-large", "gpt2", "llama-1b"], 16384, 8, ["32-true", "bf16-mixed"])}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    generated = markdown(results)
    print(generated)
    if not args.no_doc:
        write_doc(generated)
        plot(results)


if __name__ == "__main__":
    quiet()
    main()
