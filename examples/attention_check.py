"""Two processes on gloo run ``mqsp_attention`` over one long sequence and compare it with
single-process attention on the whole sequence: outputs, gradients, and per-rank peak memory.

    python examples/attention_check.py --length 8192 --world-size 2
"""

from __future__ import annotations

import argparse
import datetime
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.distributed._tools.mem_tracker import MemTracker

from lightning_mqsp import mqsp_attention, shard_sequence


def _inputs(args: argparse.Namespace) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    shape = (1, args.heads, args.length, args.head_dim)
    return tuple(torch.randn(shape, generator=g) for _ in range(4))  # q, k, v, dout


def _peak_bytes(fn, *tensors: torch.Tensor) -> tuple[int, tuple[torch.Tensor, ...]]:
    tracker = MemTracker()
    tracker.track_external(*tensors)
    with tracker:
        result = fn()
    return tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"], result


def _rank_main(rank: int, args: argparse.Namespace, init_file: str, results: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=args.world_size,
                            timeout=datetime.timedelta(seconds=120))
    q, k, v, dout = (shard_sequence(t, 2, rank, args.world_size, args.layout) for t in _inputs(args))
    q, k, v = (t.requires_grad_() for t in (q, k, v))

    def step():
        out = mqsp_attention(q, k, v, causal=args.causal, layout=args.layout)
        out.backward(dout)
        return out.detach(), q.grad, k.grad, v.grad

    peak, local = _peak_bytes(step, q, k, v, dout)
    results[rank] = (peak, [t.clone() for t in local])
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--layout", choices=["contiguous", "zigzag"], default="zigzag")
    parser.add_argument("--no-causal", dest="causal", action="store_false")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp, mp.Manager() as manager:
        results = manager.dict()
        mp.start_processes(_rank_main, args=(args, os.path.join(tmp, "pg"), results), nprocs=args.world_size, start_method="spawn")
        results = dict(results)

    q, k, v, dout = (t.double().requires_grad_() if i < 3 else t.double() for i, t in enumerate(_inputs(args)))
    qf, kf, vf = (t.float().detach().requires_grad_() for t in (q, k, v))

    def dense_step():
        out = F.scaled_dot_product_attention(qf, kf, vf, is_causal=args.causal)
        out.backward(dout.float())
        return out

    dense_peak, _ = _peak_bytes(dense_step, qf, kf, vf)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=args.causal)
    expected.backward(dout)
    names = ["output", "dQ", "dK", "dV"]
    print(f"L={args.length} H={args.heads} D={args.head_dim} P={args.world_size} layout={args.layout} causal={args.causal}")
    print(f"{'tensor':8} {'max rel. error vs float64 SDPA':>32}")
    worst = 0.0
    for i, (name, ref) in enumerate(zip(names, (expected, q.grad, k.grad, v.grad))):
        ours = torch.cat([results[r][1][i] for r in range(args.world_size)], dim=2)
        ref_sharded = torch.cat([shard_sequence(ref, 2, r, args.world_size, args.layout) for r in range(args.world_size)], dim=2)
        error = ((ours.double() - ref_sharded).abs().max() / ref_sharded.abs().max()).item()
        worst = max(worst, error)
        print(f"{name:8} {error:32.2e}")
    for r in range(args.world_size):
        print(f"rank {r} peak memory (fwd+bwd, MemTracker): {results[r][0] / 2**20:8.1f} MiB")
    print(f"one process, torch SDPA on the whole sequence: {dense_peak / 2**20:8.1f} MiB")
    verdict = "AGREE" if worst <= 1e-5 else "DISAGREE"
    print(f"{verdict}: MQSP over {args.world_size} ranks matches single-process attention to {worst:.1e} (fp32, bound 1e-5)")
    raise SystemExit(0 if worst <= 1e-5 else 1)


if __name__ == "__main__":
    main()
