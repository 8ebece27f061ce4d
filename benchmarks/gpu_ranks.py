"""P ranks on one GPU: the multi-rank CUDA paths that the CPU tests (gloo on CPU tensors) cannot see.

    python benchmarks/gpu_ranks.py --out benchmarks/out/gpu_ranks.json      # also section 7 of gpu_check.py

P = 2 and 4 processes share the one GPU. NCCL refuses two ranks on one device in a communicator (the ``nccl``
probe below records what it says), so the ranks talk over gloo with CUDA tensors; ``lightning_mqsp.comm`` stages
every collective of a device tensor over gloo through host memory. What runs on the GPU is everything else:
the Triton kernels at P > 1 (micro-steps, routes, the merge), streams and copies, the offloaded queries'
copies and their ordering (``lightning_mqsp/offload.py``).

1. ``mqsp_attention`` with ``backend="triton"`` at P = 2 and 4 against float64 attention of the full sequence
   (``tests/reference.py``), output and dQ, dK, dV, each case one row of the table: zigzag causal, unmasked,
   key padding, packed documents, GQA, bfloat16, head groups 2, batch 2, offloaded queries (with head groups 2
   and under activation checkpointing, where backward reads host rows a recompute has just copied).
2. the ``nccl`` probe: two processes, one device, one all-reduce; what NCCL allows.
3. a full-recipe Trainer step on a tiny Llama (``tests/scripts/train_fsdp.py --accelerator cuda``:
   ``mqsp_fsdp``, checkpointing, ``offload_activations``, ``mlp_tile_size``, head groups, chunked loss,
   bf16-mixed) at P = 2 against the same model in one process without any of it, in float32: loss and every
   gradient. Tolerance: bf16 itself moves the single-process step by some relative error e (the same step with
   bfloat16 weights, as FSDP2's mixed precision computes, against float32, measured in the same run); a correct
   distributed run rounds as differently again, so the recipe must stay within 2 e + 1e-3 of float32.

``--dry-run`` runs the same code on CPU tensors with the CPU kernels at tiny sizes (the test suite does).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor
from torch.utils.checkpoint import checkpoint

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))  # an uninstalled checkout imports lightning_mqsp from the root, after site-packages
sys.path.append(str(ROOT / "tests"))  # the independent float64 references

from reference import allowed_pairs, dense_attention, relative_error  # noqa: E402

from lightning_mqsp import mqsp_attention, shard_sequence  # noqa: E402

TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 2e-2, torch.float32: 1e-4}  # as gpu_check.py's section 1


@dataclass(frozen=True)
class RankCase:
    name: str
    causal: bool = True
    layout: str = "zigzag"
    batch: int = 1
    heads: int = 4
    kv_heads: int = 4
    dtype: str = "float16"
    padding: bool = False
    documents: bool = False
    head_groups: int = 1
    offload_queries: bool = False
    checkpointed: bool = False


CASES = [
    RankCase("zigzag causal"),
    RankCase("unmasked", causal=False, layout="contiguous"),
    RankCase("key padding", causal=False, padding=True),
    RankCase("packed documents", documents=True),
    RankCase("GQA 8/2", heads=8, kv_heads=2),
    RankCase("bfloat16", dtype="bfloat16"),
    RankCase("head groups 2", heads=8, kv_heads=2, head_groups=2),
    RankCase("batch 2", batch=2, padding=True),
    RankCase("offloaded queries", heads=8, kv_heads=2, head_groups=2, offload_queries=True),
    RankCase("offloaded queries, checkpointed", heads=8, kv_heads=2, offload_queries=True, checkpointed=True),
]


@dataclass
class Sizes:
    length: int
    head_dim: int
    micro_q_size: int
    device: str
    backend: str

    @staticmethod
    def of(dry_run: bool) -> Sizes:
        if dry_run:
            return Sizes(length=48, head_dim=16, micro_q_size=4, device="cpu", backend="auto")
        return Sizes(length=4096, head_dim=128, micro_q_size=256, device="cuda", backend="triton")


def _dtype(case: RankCase, sizes: Sizes) -> torch.dtype:
    # CPU kernels run float32 in the dry run: the point there is the plumbing, not the precision.
    return torch.float32 if sizes.device == "cpu" else getattr(torch, case.dtype)


def full_inputs(case: RankCase, sizes: Sizes) -> dict[str, Tensor]:
    """The whole sequence's inputs, the same on every rank (seeded), on the CPU."""
    generator = torch.Generator().manual_seed(0)
    shape = (case.batch, case.heads, sizes.length, sizes.head_dim)
    kv_shape = (case.batch, case.kv_heads, sizes.length, sizes.head_dim)
    t = {
        "q": torch.randn(shape, generator=generator), "k": torch.randn(kv_shape, generator=generator),
        "v": torch.randn(kv_shape, generator=generator), "dout": torch.randn(shape, generator=generator),
    }
    if case.padding:  # the last eighth of each row's keys (a different count per row) masked out
        mask = torch.ones(case.batch, sizes.length, dtype=torch.bool)
        for row in range(case.batch):
            mask[row, sizes.length - sizes.length // (8 + row):] = False
        t["mask"] = mask
    if case.documents:  # three documents of unequal lengths
        ids = torch.zeros(case.batch, sizes.length, dtype=torch.long)
        ids[:, sizes.length // 5:] = 1
        ids[:, sizes.length // 2:] = 2
        t["documents"] = ids
    return t


def reference(case: RankCase, t: dict[str, Tensor]) -> dict[str, Tensor]:
    """Float64 attention of the full sequence, and its gradients."""
    q, k, v = (t[name].double().requires_grad_() for name in ("q", "k", "v"))
    positions = torch.arange(q.size(2))
    allowed = allowed_pairs(positions, positions, causal=case.causal, key_padding_mask=t.get("mask"),
                            query_documents=t.get("documents"), key_documents=t.get("documents"))
    out = dense_attention(q, k, v, allowed)
    out.backward(t["dout"].double())
    return {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}


def rank_step(case: RankCase, sizes: Sizes, t: dict[str, Tensor], rank: int, world_size: int) -> dict[str, Tensor]:
    """This rank's shard of output and gradients from ``mqsp_attention`` on the device."""
    dtype = _dtype(case, sizes)

    def shard(x: Tensor) -> Tensor:
        return shard_sequence(x, dim=2 if x.dim() == 4 else 1, rank=rank, world_size=world_size, layout=case.layout)  # type: ignore[arg-type]

    q, k, v = (shard(t[name]).to(sizes.device, dtype).requires_grad_() for name in ("q", "k", "v"))
    mask = shard(t["mask"]).to(sizes.device) if "mask" in t else None
    documents = shard(t["documents"]).to(sizes.device) if "documents" in t else None

    def attend(query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        return mqsp_attention(query * 1, key, value, causal=case.causal, layout=case.layout, key_padding_mask=mask,  # type: ignore[arg-type]
                              document_ids=documents, micro_q_size=sizes.micro_q_size, backend=sizes.backend,
                              head_groups=case.head_groups, offload_queries=case.offload_queries)

    out = checkpoint(attend, q, k, v, use_reentrant=False) if case.checkpointed else attend(q, k, v)
    out.backward(shard(t["dout"]).to(sizes.device, dtype))
    return {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}


def _rank_main(rank: int, world_size: int, init_file: str, sizes: Sizes, results: Any) -> None:
    """One of the P processes: every case, its errors against the reference (computed here, on the CPU)."""
    if sizes.device == "cuda":
        torch.cuda.set_device(0)  # every rank on the one GPU
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=120))
    rows = []
    for case in CASES:
        row: dict[str, Any] = {"case": case.name, "world_size": world_size, "rank": rank}
        try:
            t = full_inputs(case, sizes)
            actual = rank_step(case, sizes, t, rank, world_size)
            expected = reference(case, t)
            shard_dims = {"out": 2, "dq": 2, "dk": 2, "dv": 2}
            row["errors"] = {
                name: relative_error(actual[name].cpu(), shard_sequence(expected[name], dim=shard_dims[name], rank=rank,
                                                                         world_size=world_size, layout=case.layout))  # type: ignore[arg-type]
                for name in actual
            }
            row["ok"] = all(error <= TOLERANCE[_dtype(case, sizes)] for error in row["errors"].values())
        except Exception:  # noqa: BLE001 - recorded; the other cases still run
            row["error"] = traceback.format_exc(limit=6)
            row["ok"] = False
        rows.append(row)
    results.put(rows)
    dist.destroy_process_group()


def run_attention_cases(world_size: int, sizes: Sizes, timeout_s: float = 600) -> list[dict[str, Any]]:
    """Every case at ``world_size`` processes sharing the device; one row per case and rank."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as folder:
        init_file = os.path.join(folder, "pg")
        processes = [ctx.Process(target=_rank_main, args=(rank, world_size, init_file, sizes, results)) for rank in range(world_size)]
        for process in processes:
            process.start()
        rows: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout_s
        try:
            for _ in processes:
                rows += results.get(timeout=max(1.0, deadline - time.monotonic()))
        except Exception:  # noqa: BLE001 - a rank died or hung: say so, end the others
            rows.append({"case": "all", "world_size": world_size, "ok": False, "error": "a rank died or did not finish in time"})
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
    return rows


def _nccl_probe_main(rank: int, init_file: str, results: Any) -> None:
    try:
        torch.cuda.set_device(0)
        dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank, world_size=2,
                                timeout=datetime.timedelta(seconds=30))
        x = torch.ones(4, device="cuda")
        dist.all_reduce(x)
        torch.cuda.synchronize()
        results.put((rank, f"all-reduce returned {x.tolist()}"))
        dist.destroy_process_group()
    except Exception as error:  # noqa: BLE001 - what NCCL says is the probe's result
        results.put((rank, f"{type(error).__name__}: {str(error)[:400]}"))


def nccl_probe(timeout_s: float = 90) -> dict[str, Any]:
    """Two processes on the one GPU in one NCCL communicator: what NCCL says."""
    if not (torch.cuda.is_available() and dist.is_nccl_available()):
        return {"skipped": "no CUDA device or no NCCL"}
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as folder:
        init_file = os.path.join(folder, "pg")
        processes = [ctx.Process(target=_nccl_probe_main, args=(rank, init_file, results)) for rank in range(2)]
        for process in processes:
            process.start()
        said: dict[str, Any] = {}
        try:
            for _ in processes:
                rank, message = results.get(timeout=timeout_s)
                said[f"rank {rank}"] = message
        except Exception:  # noqa: BLE001
            said["hang"] = f"no answer within {timeout_s} s"
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
    return said


def recipe_step(world_size: int, dry_run: bool, timeout_s: float = 600) -> dict[str, Any]:
    """The full recipe's Trainer run at ``world_size`` processes on one device against one process (float32, and
    with bfloat16 weights for the tolerance): the errors of the loss and of every gradient of the first step."""
    accelerator = "cpu" if dry_run else "cuda"
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder)
        command = [sys.executable, str(ROOT / "tests" / "scripts" / "train_fsdp.py"), str(out), "--devices", str(world_size),
                   "--sp", str(world_size), "--epochs", "1", "--mixed-precision", "--reference", "--reference-bf16",
                   "--accelerator", accelerator]
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, cwd=ROOT,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        if proc.returncode != 0:
            return {"world_size": world_size, "ok": False, "error": proc.stderr[-3000:]}
        result = torch.load(out / "result.pt", weights_only=False)
    reference, bf16 = result["reference"], result["reference_bf16"]
    grads = {name: relative_error(grad, reference["first_grads"][name]) for name, grad in result["first_grads"].items()}
    noise = {name: relative_error(grad, reference["first_grads"][name]) for name, grad in bf16["first_grads"].items()}
    loss_error = abs(result["losses"][0] - reference["losses"][0]) / abs(reference["losses"][0])
    loss_noise = abs(bf16["losses"][0] - reference["losses"][0]) / abs(reference["losses"][0])
    worst = max(grads, key=lambda name: grads[name] - 2 * noise[name])
    ok = loss_error <= 2 * loss_noise + 1e-3 and all(grads[n] <= 2 * noise[n] + 1e-3 for n in grads)
    return {"world_size": world_size, "ok": ok, "loss_error": loss_error, "loss_bf16_noise": loss_noise,
            "worst_gradient": worst, "worst_gradient_error": grads[worst], "its_bf16_noise": noise[worst],
            "gradients_checked": len(grads)}


@dataclass
class Report:
    device: str
    torch: str
    date: str
    attention: list[dict[str, Any]] = field(default_factory=list)
    nccl: dict[str, Any] = field(default_factory=dict)
    recipe: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(row["ok"] for row in self.attention + self.recipe)


def run(dry_run: bool, world_sizes: tuple[int, ...] = (2, 4), recipe_world_sizes: tuple[int, ...] = (2,)) -> Report:
    sizes = Sizes.of(dry_run)
    device = torch.cuda.get_device_name(0) if sizes.device == "cuda" else "cpu (dry run)"
    report = Report(device=device, torch=torch.__version__, date=datetime.date.today().isoformat())
    for world_size in world_sizes:
        print(f"[gpu_ranks] attention cases at P = {world_size}", flush=True)
        report.attention += run_attention_cases(world_size, sizes)
    print("[gpu_ranks] nccl probe", flush=True)
    report.nccl = nccl_probe()
    for world_size in recipe_world_sizes:
        print(f"[gpu_ranks] full-recipe Trainer step at P = {world_size}", flush=True)
        report.recipe.append(recipe_step(world_size, dry_run))
    return report


def table(report: Report) -> list[str]:
    lines = [f"{'case':<34} {'P':>2} {'worst error (out, dq, dk, dv over ranks)':>44}  ok"]
    by_case: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for row in report.attention:
        by_case.setdefault((row["case"], row["world_size"]), []).append(row)
    for (case, world_size), rows in by_case.items():
        if any("errors" not in row for row in rows):
            said = next(r["error"] for r in rows if "error" in r).splitlines()[-1][:60]
            lines.append(f"{case:<34} {world_size:>2} {'failed: ' + said:>44}  no")
            continue
        worst = {name: max(row["errors"][name] for row in rows) for name in ("out", "dq", "dk", "dv")}
        text = ", ".join(f"{value:.1e}" for value in worst.values())
        lines.append(f"{case:<34} {world_size:>2} {text:>44}  {'yes' if all(r['ok'] for r in rows) else 'NO'}")
    lines.append(f"nccl, two ranks on one device: {report.nccl}")
    for row in report.recipe:
        lines.append(f"full recipe at P = {row['world_size']}: " + ("ok" if row["ok"] else "NOT ok") + f" {row}")
    return lines


def main(argv: list[str] | None = None) -> Report:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "gpu_ranks.json")
    parser.add_argument("--dry-run", action="store_true", help="CPU tensors and kernels, tiny sizes")
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4])
    args = parser.parse_args(argv)
    report = run(args.dry_run, tuple(args.world_sizes))
    print("\n".join(table(report)), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(asdict(report), indent=2, default=str))
    return report


if __name__ == "__main__":
    sys.exit(0 if main().ok else 1)
