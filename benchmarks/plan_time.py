"""The planner's step time (``lightning_mqsp.plan.step_time``) against training steps measured on this CPU.

    python benchmarks/plan_time.py --out benchmarks/out/plan_time.json      # P = 1, 2, 4 (a few minutes)
    python benchmarks/plan_time.py --dry-run                                 # tiny sizes: the plumbing (the suite runs it)

The planner's time model takes a GPU's rates as given (peak FLOP/s and an efficiency, the attention kernels' rate,
link bandwidths). Here it gets this CPU's: the linear layers' matmul rate (bf16, as under bf16-mixed) and
``mqsp_attention``'s forward+backward rate, measured in one process on one thread, each rank's share of them when P
ranks share fewer cores (cores / P: a rank a thread, as a GPU a rank), and gloo's bytes a second a rank sends in an
all-gather, measured on the P ranks. Then P gloo ranks time training steps of a small Llama-architecture model (the
sharded recipe: FSDP2, bf16-mixed, MQSP attention, unmasked, as ``lightning_mqsp.estimate`` builds it), and the table
gives the measured step beside the model's prediction, part by part. What the model leaves out (norms, rotary
embeddings and other elementwise work, the loss's softmax, the optimizer step, the host's cost per op) is the
difference.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from transformers import LlamaConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))  # an uninstalled checkout imports lightning_mqsp from the root, after site-packages

from lightning_mqsp import mqsp_attention  # noqa: E402
from lightning_mqsp.estimate import Setup, _shard, build_model  # noqa: E402
from lightning_mqsp.plan import Hardware, ModelShape, Point, step_time  # noqa: E402


@dataclass(frozen=True)
class Sizes:
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    layers: int
    vocab: int
    length: int
    world_sizes: tuple[int, ...]
    steps: int  # timed, after one warm-up step
    repeats: int  # of each rate measurement (the median is taken)


FULL = Sizes(hidden=512, intermediate=1376, heads=8, kv_heads=4, layers=4, vocab=4096, length=4096, world_sizes=(1, 2, 4),
             steps=3, repeats=5)
DRY_RUN = Sizes(hidden=64, intermediate=128, heads=2, kv_heads=1, layers=1, vocab=128, length=64, world_sizes=(1, 2),
                steps=1, repeats=1)


def config_of(sizes: Sizes) -> LlamaConfig:
    return LlamaConfig(hidden_size=sizes.hidden, intermediate_size=sizes.intermediate, num_attention_heads=sizes.heads,
                       num_key_value_heads=sizes.kv_heads, num_hidden_layers=sizes.layers, vocab_size=sizes.vocab,
                       max_position_embeddings=sizes.length, tie_word_embeddings=False)


def median_seconds(run: Callable[[], object], repeats: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_rates(sizes: Sizes, world_size: int) -> dict[str, float]:
    """This rank's rates: on one rank, matmul FLOP/s (bf16, a layer's MLP projection over the tokens) and
    mqsp_attention forward+backward FLOP/s (unmasked, the full length); on P ranks, the gloo bytes a second this rank
    sends in an all-gather of its rows."""
    if world_size > 1:
        rows = torch.randn(sizes.length // world_size, sizes.hidden, dtype=torch.bfloat16)
        gathered = torch.empty(sizes.length, sizes.hidden, dtype=torch.bfloat16)
        with warnings.catch_warnings():  # torch 2.13 renames it all_gather_single; the floor, 2.11, has only this name
            warnings.simplefilter("ignore", FutureWarning)
            gather_s = median_seconds(lambda: dist.all_gather_into_tensor(gathered, rows), sizes.repeats)
        return {"link_bytes": rows.numel() * rows.element_size() * (world_size - 1) / gather_s}
    x = torch.randn(sizes.length, sizes.hidden, dtype=torch.bfloat16)
    w = torch.randn(sizes.intermediate, sizes.hidden, dtype=torch.bfloat16)
    matmul_s = median_seconds(lambda: F.linear(x, w), sizes.repeats)
    head_dim = sizes.hidden // sizes.heads
    q = torch.randn(1, sizes.heads, sizes.length, head_dim, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, sizes.kv_heads, sizes.length, head_dim, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn_like(k, requires_grad=True)
    attention_s = median_seconds(lambda: mqsp_attention(q, k, v).sum().backward(), sizes.repeats)
    attention_flops = 4 * sizes.heads * sizes.length * sizes.length * head_dim * 3.5
    return {"matmul_flops": 2 * sizes.length * sizes.hidden * sizes.intermediate / matmul_s,
            "attention_flops": attention_flops / attention_s}


def time_steps(sizes: Sizes, world_size: int, rank: int) -> float:
    """Median seconds of a training step (forward, backward, AdamW step) on this rank, the sharded recipe."""
    setup = Setup(config_of(sizes), "mqsp", sizes.length, world_size, precision="bf16-mixed", recipe="sharded")
    model = build_model(setup, dist.group.WORLD if world_size > 1 else None)
    model.train()
    _shard(model, setup)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, sizes.vocab, (1, setup.local_length), generator=torch.Generator().manual_seed(rank))
    positions = torch.arange(rank * setup.local_length, (rank + 1) * setup.local_length).unsqueeze(0)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, position_ids=positions, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if world_size > 1:
            dist.barrier()

    return median_seconds(step, sizes.steps)


def _rank(rank: int, world_size: int, init_method: str, sizes: Sizes, out: str) -> None:
    torch.set_num_threads(1)  # a core a rank, as the suite's and the attention benchmark's ranks
    torch.manual_seed(0)
    # A group at P = 1 too: FSDP2 shards over a mesh of one (the same recipe, nothing to communicate).
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=300))
    try:
        result = {"rates": measure_rates(sizes, world_size), "step_s": time_steps(sizes, world_size, rank)}
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def run_ranks(sizes: Sizes, world_size: int) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as folder:
        init_method = f"file://{folder}/rendezvous"
        mp.start_processes(_rank, args=(world_size, init_method, sizes, folder), nprocs=world_size, join=True,
                           start_method="spawn")
        return [json.loads(Path(folder, f"rank{r}.json").read_text()) for r in range(world_size)]


def predicted(sizes: Sizes, world_size: int, compute: dict[str, float], link: dict[str, float]) -> dict[str, Any]:
    """The planner's step time with this host as the hardware: the one-thread compute rates (``compute``) shared when
    P ranks outnumber the cores, and the slowest rank's link rate (the step waits for it)."""
    share = min(1.0, (os.cpu_count() or 1) / world_size)
    rates = {key: value * share for key, value in compute.items()}
    if link:
        rates["link_bytes"] = min(link.values())
    head_dim = sizes.hidden // sizes.heads
    hardware = Hardware(gpus=world_size, gpus_per_node=world_size, peak_tflops=rates["matmul_flops"] / 1e12,
                        matmul_efficiency=1.0, attention_tflops={f"{head_dim}/False": rates["attention_flops"] / 1e12},
                        intra_node_gbps=rates.get("link_bytes", 1e12) / 1e9)
    shape = ModelShape.of("plan_time", config_of(sizes))
    return {"rates": rates, **step_time(shape, Point("sharded", sizes.length, world_size), hardware, causal=False)}


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes, P = 1 and 2: the plumbing only")
    parser.add_argument("--world-sizes", type=int, nargs="+", default=None)
    args = parser.parse_args(argv)
    sizes = DRY_RUN if args.dry_run else FULL
    if args.world_sizes:
        sizes = replace(sizes, world_sizes=tuple(args.world_sizes))
    for world_size in sizes.world_sizes:
        if world_size < 1 or sizes.length % world_size:
            parser.error(f"--world-sizes: {world_size} ranks cannot split L = {sizes.length}; give divisors of it")
    one_rank = run_ranks(sizes, 1)  # the compute rates, and the step at P = 1
    rows = []
    for world_size in sizes.world_sizes:
        ranks = one_rank if world_size == 1 else run_ranks(sizes, world_size)
        link = {str(rank): r["rates"]["link_bytes"] for rank, r in enumerate(ranks) if "link_bytes" in r["rates"]}
        model = predicted(sizes, world_size, one_rank[0]["rates"], link)
        measured = max(r["step_s"] for r in ranks)
        rows.append({"world_size": world_size, "length": sizes.length, "measured_s": measured, "predicted_s": model["seconds"],
                     "measured_over_predicted": measured / model["seconds"], "parts": model["parts"], "rates": model["rates"]})
        print(f"P={world_size}: measured {measured:.3f} s, predicted {model['seconds']:.3f} s", file=sys.stderr)
    print("\n| P | L | measured s | predicted s | measured / predicted | matmuls s | attention s | exposed communication s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        parts = row["parts"]
        communication = parts["attention communication (exposed)"] + parts["parameter communication (exposed)"]
        print(f"| {row['world_size']} | {row['length']} | {row['measured_s']:.3f} | {row['predicted_s']:.3f} | "
              f"{row['measured_over_predicted']:.2f} | {parts['matmuls']:.3f} | {parts['attention']:.3f} | {communication:.3f} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        report = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "torch": torch.__version__,
                  "sizes": asdict(sizes), "rows": rows}
        args.out.write_text(json.dumps(report, indent=1))
    return rows


if __name__ == "__main__":
    main()
