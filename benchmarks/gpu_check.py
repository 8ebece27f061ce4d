"""The Triton backend on one H100/H200: correctness, speed against flash SDPA, MQSP's micro-steps.

    python benchmarks/gpu_check.py --out benchmarks/out/gpu_check.json

Uses the torch and triton installed there; no install, no network; about 5 minutes (a time
budget, ``--budget-s``, skips what is left rather than overrun). Sections, each guarded so that a
failure in one is recorded and the others still run:

1. correctness of ``backend="triton"`` against float64 attention (the reference backend on
   float64 copies): float16 and bfloat16, causal or not, D 64 and 128, GQA, padding, sliding
   and symmetric windows, documents, soft-capping, dropout, rows of several ranks;
2. time (``triton.testing.do_bench``, median) of forward and forward+backward against
   ``F.scaled_dot_product_attention`` with the flash backend, bfloat16, S in {4096, 16384},
   D in {64, 128}, causal and not, B = 1, H = 2048 / D: (a) the backend's kernels (M = N = S),
   (b) ``mqsp_attention`` at P = 1 (no process group);
3. one simulated rank of P at (L, P) = (16k, 8), (128k, 8), (1M, 8), (1M, 32), zigzag layout, 32 query and 8
   key/value heads of 128, bf16, causal and not: its micro-steps as mqsp_attention runs them on this device
   (gathered rows read where they arrive, partials written into the returned buffer, the merge kernel, the
   backward's row copy and dQ store; collectives left out), against flash SDPA's L^2 / P share (flash measured up
   to L = 128k and scaled by L^2 above), and the same steps replayed from a CUDA graph (whether capturing a
   signature's micro-step loop would pay). Goals: at least 0.85x at (128k, 8) and (1M, *), 0.5x at (16k, 8);
4. the autotune configs the kernels picked, the device, torch and triton versions, the date;
5. ``offload_queries`` with ``head_groups=2`` against the plain call at P = 1 (S = 16384, D = 128, 8
   query and 2 key/value heads): the same values, and each backward's time and peak of allocated device memory;
6. the loss kernels: ``chunked_cross_entropy`` with ``kernel="liger"`` (liger-kernel's fused linear cross
   entropy) against ``kernel="torch"`` on Llama-8B's output head (vocabulary 128256, hidden 4096, 16384 tokens,
   bf16): loss and gradient differences, forward+backward time and peak. liger-kernel is not installed on the GPU
   machine, which has no network: carry its wheel (``pip download --no-deps "liger-kernel>=0.8.5,<0.9" -d
   benchmarks/out/wheels`` here, ``pip install --no-deps benchmarks/out/wheels/*.whl`` there before this script);
   without it the section records why it was skipped;
7. P = 2 and 4 ranks sharing this GPU (``gpu_ranks.py``, which runs alone too): ``mqsp_attention``'s multi-rank
   paths on CUDA tensors (zigzag causal, unmasked, padding, documents, GQA, bf16, head groups, batch 2, offloaded
   queries, checkpointed) against float64, what NCCL allows with two ranks on one device, and the full recipe's
   Trainer step against one process (every gradient within twice what bf16 alone moves it).

FLOPs: forward 4 B H S^2 D (halved when causal), forward+backward 3.5 times that. Goals:
Triton forward+backward >= 0.8x flash at S = 16k (D 64 and 128, causal and not), mqsp_attention
at P = 1 >= 0.7x. Prints a compact ratio table at the end (flash time / our time: above 1 is faster).

``--dry-run`` runs every code path on tiny shapes on CPU through the Triton interpreter (set
``TRITON_INTERPRET=1`` before Python starts; float16 stands in for bfloat16, whose tl.dot the
interpreter gets wrong): what the test suite does, so that this script cannot fail on the GPU
for a silly reason.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import platform
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import gpu_ranks
import torch
import torch.nn.functional as F
from baselines.common import relative_error
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

# A checkout that is not installed (the GPU machine) imports lightning_mqsp from the repository root, put after
# site-packages so that the root never shadows an installed package.
sys.path.append(str(Path(__file__).resolve().parents[1]))

from lightning_mqsp import chunked_cross_entropy, mqsp_attention
from lightning_mqsp.attention import auto_micro_q_size, backward_row_width, step_bytes_per_gathered_row
from lightning_mqsp.backends import get_backend
from lightning_mqsp.layout import position_runs, run_positions, slice_runs
from lightning_mqsp.merge import Partial
from lightning_mqsp.visibility import Visibility, Window

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
GOALS = {"triton_fwd_bwd_vs_flash_at_16k": 0.8, "mqsp_fwd_bwd_vs_flash_at_16k": 0.7}


def log(message: str) -> None:
    print(message, flush=True)


@dataclass(frozen=True)
class Sizes:
    """Everything that differs between a GPU run and a dry run."""

    device: str
    timed_dtype: torch.dtype  # bfloat16; float16 under the interpreter
    correctness_batch: int  # 2 on the GPU (batch strides); 1 in a dry run, whose kernels the test suite checks anyway
    correctness_length: int
    seq_lengths: tuple[int, ...]
    head_dims: tuple[int, ...]
    width: int  # heads x head_dim of the timed shapes
    rank_shapes: tuple[tuple[int, int], ...]  # (L, P) of the simulated ranks
    rank_heads: tuple[int, int, int]  # query heads, key/value heads, head_dim of the simulated ranks
    timed_steps: int  # micro-steps timed per shape (evenly spread; the rest extrapolated)
    flash_max_length: int  # flash's full-sequence time is measured up to this L and scaled by L^2 above it
    micro_q_size: int | None  # None: mqsp_attention's own choice on that device


GPU = Sizes("cuda", torch.bfloat16, 2, 1000, (4096, 16384), (64, 128), 2048,
            ((16384, 8), (131072, 8), (1048576, 8), (1048576, 32)), (32, 8, 128), 8, 131072, None)
DRY_RUN = Sizes("cpu", torch.float16, 1, 40, (64,), (64,), 128, ((128, 4), (256, 4)), (4, 2, 64), 2, 128, 4)


@dataclass(frozen=True)
class CorrectnessCase:
    dtype: str
    head_dim: int
    window: tuple[int | None, int | None] = (None, None)  # (left, right); causal: (None, 0)
    kv_heads: int = 8
    padding: bool = False
    documents: bool = False
    softcap: float | None = None
    dropout_p: float = 0.0
    segments: int = 1  # rows of several ranks, each run ascending (zigzag-like positions)

    def __str__(self) -> str:
        features = [f"window{self.window}", f"kv_heads {self.kv_heads}", "padding" * self.padding, "documents" * self.documents,
                    f"softcap {self.softcap}" * (self.softcap is not None), f"dropout {self.dropout_p}" * (self.dropout_p > 0),
                    f"{self.segments} segments" * (self.segments > 1)]
        return f"{self.dtype} D={self.head_dim} " + ", ".join(f for f in features if f)


# Few cases, each covering several features: every new kind of call compiles (and autotunes) the kernels again.
CORRECTNESS_CASES = [
    CorrectnessCase("bfloat16", 128, (None, 0), kv_heads=2, padding=True),
    CorrectnessCase("float16", 64, padding=True, documents=True),
    CorrectnessCase("bfloat16", 64, (255, 0), documents=True, softcap=30.0),
    CorrectnessCase("float16", 128, (100, 100), dropout_p=0.1),
    CorrectnessCase("bfloat16", 128, (None, 0), kv_heads=2, segments=4),
    CorrectnessCase("bfloat16", 64),
]


def correctness_inputs(case: CorrectnessCase, sizes: Sizes, dtype: torch.dtype) -> tuple[dict[str, Tensor], Visibility]:
    g = torch.Generator().manual_seed(0)
    batch, heads, length, d = sizes.correctness_batch, 8, sizes.correctness_length, case.head_dim

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g).to(device=sizes.device, dtype=dtype)

    keys = torch.arange(length)
    if case.segments == 1:
        rows = keys
    else:  # segment s: a run of rows from each half of the sequence, like a zigzag rank's micro-step
        per_segment = length // case.segments
        rows = torch.cat([torch.arange(s * length // case.segments, s * length // case.segments + per_segment)
                          for s in range(case.segments)])
    tensors = {"q": randn(batch, heads, rows.numel(), d), "k": randn(batch, case.kv_heads, length, d),
               "v": randn(batch, case.kv_heads, length, d), "dout": randn(batch, heads, rows.numel(), d)}
    padding = (torch.rand(batch, length, generator=g) > 0.2).to(sizes.device) if case.padding else None
    documents = None
    if case.documents:  # packed documents of random lengths: ids step up along the positions
        documents = (torch.rand(batch, length, generator=g) < 8 / length).long().cumsum(dim=1).to(sizes.device)
    seed = torch.tensor([1234], dtype=torch.int64, device=sizes.device)
    visibility = Visibility.for_positions(
        rows.to(sizes.device), keys.to(sizes.device), query_segments=case.segments, window=Window(*case.window),
        key_padding_mask=padding, query_documents=None if documents is None else documents[:, rows.to(sizes.device)],
        key_documents=documents, softcap=case.softcap, dropout_p=case.dropout_p, dropout_seed=seed,
    )
    return tensors, visibility


def forward_backward(backend_name: str, t: dict[str, Tensor], visibility: Visibility, scale: float) -> dict[str, Tensor]:
    """out, log-sum-exp and dq, dk, dv of one backend on one (here: the only) rank."""
    backend = get_backend(backend_name)
    part = backend.forward(t["q"], t["k"], t["v"], visibility, scale)
    delta = (t["dout"].to(part.out.dtype) * part.out).sum(dim=-1)
    grad_key = torch.zeros(t["k"].shape, dtype=part.out.dtype, device=part.out.device)
    grad_value = torch.zeros_like(grad_key)
    dq = backend.backward(t["q"], t["k"], t["v"], t["dout"], part.row_max, part.row_log_sum, delta, visibility, scale,
                          grad_key, grad_value)
    finite = torch.where(torch.isneginf(part.row_max), torch.zeros_like(part.row_max), part.row_max + part.row_log_sum)
    return {"out": part.out, "log_sum_exp": finite, "dq": dq, "dk": grad_key, "dv": grad_value}


def check_correctness(sizes: Sizes) -> list[dict[str, object]]:
    rows = []
    for case in CORRECTNESS_CASES:
        dtype = getattr(torch, case.dtype)
        if sizes.device == "cpu" and dtype == torch.bfloat16:
            dtype = torch.float16  # the interpreter's bfloat16 tl.dot is wrong
        t, visibility = correctness_inputs(case, sizes, dtype)
        scale = case.head_dim**-0.5
        actual = forward_backward("triton", t, visibility, scale)
        expected = forward_backward("reference", {name: x.double() for name, x in t.items()}, visibility, scale)
        errors = {name: relative_error(actual[name], expected[name]) for name in actual}
        passed = max(errors.values()) <= TOLERANCE[dtype]
        rows.append({**asdict(case), "dtype": str(dtype).split(".")[-1], "errors": errors, "passed": passed})
        log(f"  {case}: worst relative error {max(errors.values()):.1e} {'ok' if passed else 'FAILED'}")
    return rows


def check_offload(sizes: Sizes) -> dict[str, object]:
    """One rank of mqsp_attention with the queries in host memory and the backward over 2 groups of key/value heads,
    against the plain call on the same inputs (Llama-8B's head shape, 8 of its query heads): the largest difference
    of out, dq, dk, dv, and on a GPU each call's peak of allocated device memory from the forward's end to backward's."""
    length = max(sizes.seq_lengths)
    g = torch.Generator().manual_seed(0)

    def randn(heads: int) -> Tensor:  # sequence-major, as a model's projections hand them over
        return torch.randn(1, length, heads, 128, generator=g).to(sizes.timed_dtype).to(sizes.device).transpose(1, 2)

    q, dout, k, v = randn(8), randn(8), randn(2), randn(2)
    results: dict[str, dict[str, Tensor]] = {}
    peaks: dict[str, int] = {}
    seconds: dict[str, float] = {}
    for name, options in (("plain", {}), ("offloaded", {"offload_queries": True, "head_groups": 2})) * 2:  # the first: warm-up
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        query = leaves[0] * 1  # not a leaf, as a model's RoPE output: only attention keeps it
        out = mqsp_attention(query, leaves[1], leaves[2], causal=True, backend="triton", **options)
        del query
        if sizes.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        out.backward(dout)
        if sizes.device == "cuda":
            torch.cuda.synchronize()
            peaks[name] = torch.cuda.max_memory_allocated()
        seconds[name] = time.perf_counter() - started
        results[name] = {"out": out.detach(), **{f"d{n}": t.grad for n, t in zip("qkv", leaves)}}
    differences = {n: (results["plain"][n].float() - results["offloaded"][n].float()).abs().max().item() for n in results["plain"]}
    log(f"  offloaded queries, 2 head groups, L={length}: largest difference {max(differences.values()):.1e}, "
        f"backward peaks {peaks or 'not measured (CPU)'}, backward seconds {seconds}")
    return {"length": length, "differences": differences, "backward_peak_bytes": peaks, "backward_seconds": seconds}


def check_loss_kernels(sizes: Sizes) -> dict[str, object]:
    """Section 6: the fused liger loss against the chunked torch loss on one output head (Llama-8B's on a GPU)."""
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        log("  liger-kernel is not installed: skipped (see the module docstring to carry its wheel)")
        return {"skipped": "liger-kernel not installed"}
    vocabulary, width, tokens = (128256, 4096, 16384) if sizes.device == "cuda" else (64, 16, 40)
    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(width, vocabulary, bias=False).to(sizes.device, sizes.timed_dtype)
    hidden = (torch.randn(1, tokens, width, generator=g) / 4).to(sizes.device, sizes.timed_dtype)
    labels = torch.randint(0, vocabulary, (1, tokens), generator=g).to(sizes.device)
    results: dict[str, dict[str, object]] = {}
    for kernel in ("torch", "liger", "torch", "liger"):  # the first two: warm-up (compiles and autotunes)
        leaf = hidden.detach().clone().requires_grad_()
        head.weight.grad = None
        if sizes.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        loss = chunked_cross_entropy(leaf, head, labels, kernel=kernel)
        loss.backward()
        if sizes.device == "cuda":
            torch.cuda.synchronize()
        results[kernel] = {"seconds": time.perf_counter() - started, "loss": loss.item(), "dhidden": leaf.grad,
                           "dweight": head.weight.grad.clone(),
                           "peak_bytes": torch.cuda.max_memory_allocated() if sizes.device == "cuda" else None}
    torch_run, liger_run = results["torch"], results["liger"]
    report = {
        "vocabulary": vocabulary, "hidden": width, "tokens": tokens,
        "loss_difference": abs(torch_run["loss"] - liger_run["loss"]),  # type: ignore[operator]
        "dhidden_error": relative_error(liger_run["dhidden"], torch_run["dhidden"]),  # type: ignore[arg-type]
        "dweight_error": relative_error(liger_run["dweight"], torch_run["dweight"]),  # type: ignore[arg-type]
        **{f"{k}_{name}": run[name] for k, run in results.items() for name in ("seconds", "peak_bytes")},
    }
    log(f"  loss kernels, V={vocabulary} hidden={width} tokens={tokens}: liger {report['liger_seconds']:.3f} s, "
        f"torch {report['torch_seconds']:.3f} s; peaks {report['liger_peak_bytes']} / {report['torch_peak_bytes']}; "
        f"loss difference {report['loss_difference']:.1e}, dhidden {report['dhidden_error']:.1e}, dweight {report['dweight_error']:.1e}")
    return report


def check_ranks() -> dict[str, object]:
    """Section 7: P = 2 and 4 processes on this GPU (``gpu_ranks.py``): mqsp_attention's cases against float64, what
    NCCL allows, and the full recipe's Trainer step against one process; its table printed, its rows kept."""
    report = gpu_ranks.run(dry_run=False)
    log("\n".join(gpu_ranks.table(report)))
    if not report.ok:
        raise RuntimeError("a multi-rank case or the recipe step is off: see the table above and report['ranks']")
    return asdict(report)


def time_ms(fn: Callable[[], object], device: str) -> float:
    """Median time of ``fn`` in ms: do_bench on a GPU (after one warm-up call, which compiles and
    autotunes), one timed call on CPU (a dry run checks the code path, not the speed)."""
    fn()
    if device == "cpu":
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    import triton.testing

    torch.cuda.synchronize()
    return float(triton.testing.do_bench(fn, return_mode="median"))


def attention_flops(batch: int, heads: int, seq: int, head_dim: int, causal: bool) -> float:
    """Forward matmul FLOPs (QK^T and PV: 2 * 2 * S^2 * D per head), halved under a causal mask."""
    return 4.0 * batch * heads * seq * seq * head_dim * (0.5 if causal else 1.0)


def flash_sdpa(q: Tensor, k: Tensor, v: Tensor, dout: Tensor, causal: bool) -> tuple[Callable[[], object], Callable[[], object]]:
    """(forward, forward+backward) of flash SDPA on these inputs."""
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]

    def forward() -> Tensor:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(*leaves, is_causal=causal)

    return forward, lambda: forward().backward(dout)


def full_visibility(seq: int, causal: bool, device: str) -> Visibility:
    positions = torch.arange(seq, device=device)
    runs = ((0, seq, 0),)
    return Visibility(positions, positions, runs, runs, window=Window.of(causal, None))


def kernel_forward_backward(
    t: dict[str, Tensor], visibility: Visibility, scale: float,
) -> tuple[Callable[[], object], Callable[[], object]]:
    """(forward, forward+backward) of the triton backend, fed like mqsp_attention feeds it."""
    backend = get_backend("triton")
    grad_key = torch.zeros(t["k"].shape, dtype=torch.float32, device=t["k"].device)
    grad_value = torch.zeros_like(grad_key)

    def forward() -> Partial:
        return backend.forward(t["q"], t["k"], t["v"], visibility, scale)

    def forward_backward_once() -> Tensor:
        part = forward()
        delta = (t["dout"].float() * part.out).sum(dim=-1)
        return backend.backward(t["q"], t["k"], t["v"], t["dout"], part.row_max, part.row_log_sum, delta, visibility,
                                scale, grad_key, grad_value)

    return forward, forward_backward_once


def mqsp_forward_backward(t: dict[str, Tensor], causal: bool) -> tuple[Callable[[], object], Callable[[], object]]:
    """(forward, forward+backward) of mqsp_attention at P = 1 (no process group)."""
    q, k, v = (t[name].detach().clone().requires_grad_() for name in "qkv")

    def forward() -> Tensor:
        return mqsp_attention(q, k, v, causal=causal, backend="triton")

    return forward, lambda: forward().backward(t["dout"])


def timed_shapes(sizes: Sizes) -> list[tuple[int, int, bool]]:
    return [(seq, d, causal) for seq in sizes.seq_lengths for d in sizes.head_dims for causal in (False, True)]


def time_full_attention(sizes: Sizes, which: str, deadline: float) -> list[dict[str, object]]:
    """Section 2: (a) ``which="kernels"``, the backend's kernels at M = N = S, or (b) ``"mqsp"``, mqsp_attention at P = 1."""
    rows = []
    for seq, d, causal in timed_shapes(sizes):
        if time.monotonic() > deadline:
            rows.append({"seq": seq, "head_dim": d, "causal": causal, "skipped": "time budget"})
            continue
        heads = sizes.width // d
        g = torch.Generator(device=sizes.device).manual_seed(0)
        t = {name: torch.randn(1, heads, seq, d, generator=g, device=sizes.device, dtype=sizes.timed_dtype)
             for name in ("q", "k", "v", "dout")}
        if which == "kernels":
            ours = kernel_forward_backward(t, full_visibility(seq, causal, sizes.device), d**-0.5)
        else:
            ours = mqsp_forward_backward(t, causal)
        flash = flash_sdpa(t["q"], t["k"], t["v"], t["dout"], causal)
        flops = attention_flops(1, heads, seq, d, causal)
        row: dict[str, object] = {"seq": seq, "head_dim": d, "causal": causal, "heads": heads}
        for name, fn, work in [("fwd", ours[0], flops), ("fwd_bwd", ours[1], 3.5 * flops),
                               ("flash_fwd", flash[0], flops), ("flash_fwd_bwd", flash[1], 3.5 * flops)]:
            ms = time_ms(fn, sizes.device)
            row[f"{name}_ms"], row[f"{name}_tflops"] = ms, work / (ms * 1e-3) / 1e12
        row["fwd_ratio"] = row["flash_fwd_ms"] / row["fwd_ms"]
        row["fwd_bwd_ratio"] = row["flash_fwd_bwd_ms"] / row["fwd_bwd_ms"]
        rows.append(row)
        log(f"  {which} S={seq} D={d} causal={causal}: fwd {row['fwd_tflops']:.0f} TFLOP/s ({row['fwd_ratio']:.2f}x flash), "
            f"fwd+bwd {row['fwd_bwd_tflops']:.0f} TFLOP/s ({row['fwd_bwd_ratio']:.2f}x flash)")
        del t, ours, flash
        if sizes.device == "cuda":
            torch.cuda.empty_cache()
    return rows


def simulated_rank_steps(length: int, ranks: int, c: int, rank: int, causal: bool, device: str) -> list[Visibility]:
    """The visibility of each micro-step of ``rank`` in a zigzag group of ``ranks`` at full length ``length``, in the
    order mqsp_attention runs them: every rank's rows [start, stop) gathered rank after rank (one ascending segment
    each) against this rank's keys."""
    local = length // ranks
    runs = [position_runs(local, r, ranks, "zigzag") for r in range(ranks)]
    key_positions = run_positions(runs[rank], device)
    steps = []
    for start in range(0, local, c):
        stop = min(start + c, local)
        gathered_runs = tuple(run for r in range(ranks) for run in slice_runs(runs[r], start, stop, r * (stop - start)))
        steps.append(Visibility(run_positions(gathered_runs, device), key_positions, gathered_runs, runs[rank],
                                query_segments=ranks, window=Window.of(causal, None)))
    return [steps[i // 2] if i % 2 == 0 else steps[-1 - i // 2] for i in range(len(steps))]


def rank_step(
    step: Visibility, k: Tensor, v: Tensor, ranks: int, heads: int, scale: float,
) -> tuple[Callable[[], object], Callable[[], object]]:
    """(forward, backward) of one micro-step as mqsp_attention runs it on a rank, collectives left out: the kernel
    reads the gathered queries where they arrived ([P, B, H, c, D]) and writes its partials into the buffer that
    returns them, the merge kernel merges the P partials into the layer's sequence-major output; the backward joins
    its rows (queries, output gradients, statistics: one copy), runs both kernels on them where they arrived, dQ
    written in the layout it returns in, and stores the summed dQ rows."""
    backend = get_backend("triton")
    d = k.size(-1)
    c = step.query_positions.numel() // ranks
    g = torch.Generator(device=k.device).manual_seed(1)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g, device=k.device, dtype=k.dtype)

    gathered_query = randn(ranks, 1, heads, c, d)
    packed = torch.empty(ranks, 1, heads, c, d + 2, device=k.device)
    out = torch.empty(1, c, heads, d, device=k.device, dtype=k.dtype).transpose(1, 2)
    row_max, row_log_sum = torch.empty(2, 1, heads, c, device=k.device).unbind(0)
    width = backward_row_width(d, k.dtype)
    own = {"q": randn(1, heads, c, d), "dout": randn(1, heads, c, d), "stats": torch.rand(3, 1, heads, c, 1, device=k.device)}
    gathered_rows = torch.zeros(ranks, 1, heads, c, width, device=k.device, dtype=k.dtype)
    gathered_rows[..., :2 * d] = randn(ranks, 1, heads, c, 2 * d)
    statistics = gathered_rows[..., 2 * d :].view(torch.float32)
    statistics[..., 1] = torch.log(torch.tensor(float(step.key_positions.numel()), device=k.device))  # row_log_sum
    parts = torch.empty(ranks, 1, c, heads, d, device=k.device)
    grad_query = torch.empty(1, heads, c, d, device=k.device, dtype=k.dtype)
    grad_key, grad_value = (torch.zeros(k.shape, device=k.device) for _ in range(2))
    row_buffer = torch.empty(1, heads, c, width, device=k.device, dtype=k.dtype)

    def forward() -> None:
        backend.forward(gathered_query, k, v, step, scale, into=Partial(packed[..., :d], packed[..., d], packed[..., d + 1]))
        backend.merge(packed, out, row_max, row_log_sum)

    def backward() -> None:
        stats = [t.view(k.dtype) for t in own["stats"].unbind(0)]
        torch.cat([own["q"], own["dout"], *stats], dim=-1, out=row_buffer[..., : 2 * d + sum(t.size(-1) for t in stats)])
        backend.backward(gathered_rows[..., :d], k, v, gathered_rows[..., d : 2 * d], statistics[..., 0], statistics[..., 1],
                         statistics[..., 2], step, scale, grad_key, grad_value, grad_query=parts.transpose(2, 3))
        grad_query.copy_(parts[0].transpose(1, 2))

    return forward, backward


def time_one_rank_of_many(sizes: Sizes, deadline: float) -> list[dict[str, object]]:
    """Section 3: rank 0 of P zigzag ranks at (L, P), micro-step by micro-step with the steps mqsp_attention would
    size on this device, against flash SDPA's L^2 / P share of the full sequence (measured up to
    ``sizes.flash_max_length``, scaled by L^2 above it: flash's time is quadratic at these lengths). Collectives
    are left out (one GPU); what is timed is each step's kernels, merge and copies, launched as mqsp_attention
    launches them. A few steps are timed, spread over the rank's steps (cheap and dear ones alike under a causal
    mask), and the rest extrapolated."""
    rows = []
    heads, heads_kv, d = sizes.rank_heads
    for seq, ranks in sizes.rank_shapes:
        for causal in (False, True):
            if time.monotonic() > deadline:
                rows.append({"seq": seq, "ranks": ranks, "head_dim": d, "causal": causal, "skipped": "time budget"})
                continue
            local = seq // ranks
            c = sizes.micro_q_size or auto_micro_q_size(local, ranks, step_bytes_per_gathered_row(heads, d, sizes.timed_dtype))
            steps = simulated_rank_steps(seq, ranks, c, 0, causal, sizes.device)
            timed = steps[:: max(1, len(steps) // sizes.timed_steps)][: sizes.timed_steps]
            g = torch.Generator(device=sizes.device).manual_seed(0)
            k, v = (torch.randn(1, heads_kv, local, d, generator=g, device=sizes.device, dtype=sizes.timed_dtype) for _ in range(2))
            passes = [rank_step(step, k, v, ranks, heads, d**-0.5) for step in timed]
            scale_up = len(steps) / len(timed)
            row: dict[str, object] = {"seq": seq, "ranks": ranks, "head_dim": d, "causal": causal, "heads": heads,
                                      "kv_heads": heads_kv, "micro_steps": len(steps), "timed_steps": len(timed),
                                      "gathered_rows": ranks * c, "local_keys": local}
            forward, backward = (functools.partial(run_micro_steps, passes, which) for which in (0, 1))
            forward_ms = time_ms(forward, sizes.device) * scale_up
            backward_ms = time_ms(backward, sizes.device) * scale_up
            row["fwd_ms"], row["fwd_bwd_ms"] = forward_ms, forward_ms + backward_ms
            if sizes.device == "cuda":  # the same steps replayed from a CUDA graph: what capture would save
                row.update(graph_timings(forward, backward, scale_up))
            reference = min(seq, sizes.flash_max_length)
            full = {name: torch.randn(1, heads, reference, d, generator=g, device=sizes.device, dtype=sizes.timed_dtype)
                    for name in ("q", "k", "v", "dout")}
            flash = flash_sdpa(full["q"], full["k"], full["v"], full["dout"], causal)
            quadratic = (seq / reference) ** 2
            row["flash_length"] = reference
            row["flash_share_fwd_ms"] = time_ms(flash[0], sizes.device) * quadratic / ranks
            row["flash_share_fwd_bwd_ms"] = time_ms(flash[1], sizes.device) * quadratic / ranks
            row["fwd_ratio"] = row["flash_share_fwd_ms"] / row["fwd_ms"]
            row["fwd_bwd_ratio"] = row["flash_share_fwd_bwd_ms"] / row["fwd_bwd_ms"]
            rows.append(row)
            log(f"  one rank of {ranks}, L={seq} causal={causal}: {len(steps)} micro-steps of {ranks * c} gathered rows, "
                f"fwd {row['fwd_ratio']:.2f}x and fwd+bwd {row['fwd_bwd_ratio']:.2f}x flash's share")
            del full, flash, passes, k, v
            if sizes.device == "cuda":
                torch.cuda.empty_cache()
    return rows


def graph_timings(forward: Callable[[], object], backward: Callable[[], object], scale_up: float) -> dict[str, object]:
    """The timed steps captured in one CUDA graph each way and replayed (the kernels are tuned by then): the time a
    step's host work costs, to decide whether ``mqsp_attention`` should capture a signature's micro-step loop (only
    if it is faster). A capture that fails is recorded, not raised."""
    try:
        graphs = []
        for fn in (forward, backward):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                fn()  # warm-up off the capturing stream, as torch.cuda.graphs asks
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
            graphs.append(graph)
        forward_ms, backward_ms = (time_ms(graph.replay, "cuda") * scale_up for graph in graphs)
    except Exception as error:  # noqa: BLE001 - a failed capture is a result of the check
        return {"graph_error": f"{type(error).__name__}: {error}"}
    return {"graph_fwd_ms": forward_ms, "graph_fwd_bwd_ms": forward_ms + backward_ms}


def run_micro_steps(passes: list[tuple[Callable[[], object], Callable[[], object]]], which: int) -> None:
    """Every micro-step's forward (which = 0) or backward (which = 1), one after the other."""
    for fns in passes:
        fns[which]()


def best_configs() -> dict[str, dict[str, str]]:
    """Section 4: the config each kernel's autotuner picked, per tuning key (shape, window, input dtype)."""
    from lightning_mqsp.kernels.backward import _backward_dkdv_kernel, _backward_dq_kernel
    from lightning_mqsp.kernels.forward import _forward_kernel
    from lightning_mqsp.kernels.tuning import AUTOTUNE_KEY, describe

    kernels = {"forward": _forward_kernel, "dkdv": _backward_dkdv_kernel, "dq": _backward_dq_kernel}
    return {name: {" ".join([*(f"{k}={v}" for k, v in zip(AUTOTUNE_KEY, key)), key[len(AUTOTUNE_KEY)]]): describe(config)
                   for key, config in kernel.cache.items()} for name, kernel in kernels.items()}


def ratio_table(report: dict[str, object]) -> list[str]:
    lines = [f"{'section':<14} {'S':>6} {'D':>4} {'causal':>6} | {'fwd':>6} {'fwd+bwd':>8}   (flash time / ours)"]
    for section, rows in report["timings"].items():  # type: ignore[union-attr]
        for row in rows:
            if "fwd_ratio" in row:
                lines.append(f"{section:<14} {row['seq']:>6} {row['head_dim']:>4} {row['causal']!s:>6} | "
                             f"{row['fwd_ratio']:>6.2f} {row['fwd_bwd_ratio']:>8.2f}")
    return lines


def goals(report: dict[str, object], sizes: Sizes) -> dict[str, object]:
    """Whether the speed goals hold at the largest S (worst ratio over D and causal)."""
    longest = max(sizes.seq_lengths)
    found = {}
    for goal, section in (("triton_fwd_bwd_vs_flash_at_16k", "kernels"), ("mqsp_fwd_bwd_vs_flash_at_16k", "mqsp")):
        rows = report["timings"].get(section, [])  # type: ignore[union-attr]
        ratios = [row["fwd_bwd_ratio"] for row in rows if row.get("seq") == longest and "fwd_bwd_ratio" in row]
        found[goal] = {"target": GOALS[goal], "worst": min(ratios) if ratios else None,
                       "met": bool(ratios) and min(ratios) >= GOALS[goal]}
    return found


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/gpu_check.json"))
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU through the Triton interpreter")
    parser.add_argument("--budget-s", type=float, default=300.0, help="skip timings still to come after this many seconds")
    args = parser.parse_args(argv)
    sizes = DRY_RUN if args.dry_run else GPU
    start = time.monotonic()
    deadline = start + args.budget_s
    import triton

    report: dict[str, object] = {
        "device": torch.cuda.get_device_name() if sizes.device == "cuda" else f"cpu (dry run, {platform.processor()})",
        "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "dry_run": args.dry_run,
        "correctness": [], "timings": {}, "best_configs": {}, "errors": {},
    }
    log(f"{report['device']}, torch {torch.__version__}, triton {triton.__version__}")
    sections: list[tuple[str, Callable[[], object], Callable[[object], None]]] = [
        ("correctness", lambda: check_correctness(sizes), lambda rows: report.update(correctness=rows)),
        ("kernels", lambda: time_full_attention(sizes, "kernels", deadline), lambda rows: report["timings"].update(kernels=rows)),  # type: ignore[union-attr]
        ("mqsp", lambda: time_full_attention(sizes, "mqsp", deadline), lambda rows: report["timings"].update(mqsp=rows)),  # type: ignore[union-attr]
        ("one_rank_of_p", lambda: time_one_rank_of_many(sizes, deadline),
         lambda rows: report["timings"].update(one_rank_of_p=rows)),  # type: ignore[union-attr]
        ("best_configs", best_configs, lambda configs: report.update(best_configs=configs)),
        ("offload", lambda: check_offload(sizes), lambda result: report.update(offload=result)),
        ("loss_kernels", lambda: check_loss_kernels(sizes), lambda result: report.update(loss_kernels=result)),
    ]
    if not args.dry_run:  # its own dry run is tests/test_gpu_ranks.py (the interpreter would take minutes here)
        sections.append(("ranks", check_ranks, lambda result: report.update(ranks=result)))
    for name, run, store in sections:
        log(f"[{time.monotonic() - start:6.1f} s] {name}")
        try:
            store(run())
        except Exception:  # noqa: BLE001 - recorded; the other sections still run
            report["errors"][name] = traceback.format_exc()  # type: ignore[index]
            log(f"  {name} failed:\n{report['errors'][name]}")  # type: ignore[index]
    report["goals"] = goals(report, sizes)
    report["seconds"] = time.monotonic() - start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1, default=str))
    log("\n".join(["", *ratio_table(report), "", f"goals: {json.dumps(report['goals'])}",
                   f"errors in: {sorted(report['errors']) or 'none'}", f"wrote {args.out} after {report['seconds']:.0f} s"]))  # type: ignore[arg-type]
    return report


if __name__ == "__main__":
    sys.exit(1 if main()["errors"] else 0)
