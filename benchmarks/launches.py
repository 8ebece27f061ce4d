"""Device launches and dispatcher ops per micro-step of ``mqsp_attention``, forward and backward.

    python benchmarks/launches.py --out benchmarks/out/launches.json      # cpu_flash at P = 2 (seconds)
    TRITON_INTERPRET=1 python benchmarks/launches.py --backend triton      # the Triton path, interpreted

Each micro-step has a fixed cost on the host, one dispatcher call per aten op and one launch per kernel, whatever
its size: at L = 32k over P = 8 a step's GPU work is about 0.2 ms, so a step of 30 launches is bound by the host.
What is counted, under a ``TorchDispatchMode`` on every rank: every aten op that is not a view or an allocation
(an allocation launches nothing), a Triton custom op as the kernels it launches (forward 1, backward 2), and each
collective. Per micro-step: the difference between a call of 2n and a call of n steps, over n, so that what a call
does once (checks, the first step's setup, dK and dV narrowed at the end) is not counted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.append(str(Path(__file__).resolve().parents[1]))  # after site-packages: an installed package wins

#: Kernels each of the package's custom ops launches (``kernels/ops.py``).
KERNELS_PER_OP = {"partial_attention_forward": 1, "partial_attention_backward": 2, "merge_partials": 1}
#: Ops that allocate (or only describe) memory: no kernel runs.
_NOT_LAUNCHES = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "lift_fresh", "detach", "alias",
                 "_unsafe_view", "set_", "resize_", "record_stream"}


class LaunchCounter(TorchDispatchMode):
    """Counts what each dispatched op would launch on a device: ``ops`` (aten ops and custom-op kernels, by name) and
    ``collectives`` (by name)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.collectives: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        namespace, name = func.namespace, func._schema.name.split("::")[-1]
        if namespace == "c10d":
            self.collectives[name] += 1
        elif namespace == "lightning_mqsp":
            self.ops[name] += KERNELS_PER_OP[name]
        elif not (func.is_view or name in _NOT_LAUNCHES):
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))

    @property
    def launches(self) -> int:
        return sum(self.ops.values()) + sum(self.collectives.values())


@dataclass(frozen=True)
class Case:
    backend: str
    causal: bool
    layout: str = "zigzag"
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 32
    rows_per_step: int = 16
    steps: int = 4  # per call; the call of twice as many gives the difference

    @property
    def name(self) -> str:
        return f"{self.backend}, {'causal' if self.causal else 'unmasked'}, {self.layout}"


@dataclass(frozen=True)
class StepCounts:
    """Per micro-step: launches (ops + collectives), the aten ops among them, the collectives, forward and backward."""

    forward_launches: float
    backward_launches: float
    forward_ops: float
    backward_ops: float
    forward_collectives: float
    backward_collectives: float
    forward_by_op: dict[str, float]
    backward_by_op: dict[str, float]


def _count_call(case: Case, steps: int, group: dist.ProcessGroup | None) -> tuple[LaunchCounter, LaunchCounter]:
    from lightning_mqsp import mqsp_attention

    length = case.rows_per_step * steps
    device = "cpu"
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, case.heads, length, case.head_dim, generator=g).to(device).requires_grad_()
    k = torch.randn(1, case.kv_heads, length, case.head_dim, generator=g).to(device).requires_grad_()
    v = torch.randn(1, case.kv_heads, length, case.head_dim, generator=g).to(device).requires_grad_()
    kwargs = dict(group=group, causal=case.causal, layout=case.layout, micro_q_size=case.rows_per_step, backend=case.backend)
    mqsp_attention(q, k, v, **kwargs).sum().backward()  # a signature's first call checks it across ranks: not counted
    with LaunchCounter() as forward:
        out = mqsp_attention(q, k, v, **kwargs)
    grad = torch.ones_like(out)
    with LaunchCounter() as backward:
        out.backward(grad)
    return forward, backward


def count_per_step(case: Case, group: dist.ProcessGroup | None = None) -> StepCounts:
    """This rank's counts per micro-step (run on every rank of ``group`` together)."""
    short, long = _count_call(case, case.steps, group), _count_call(case, 2 * case.steps, group)

    def per_step(attribute: str, direction: int) -> float:
        return (getattr(long[direction], attribute) - getattr(short[direction], attribute)) / case.steps

    def by_op(direction: int) -> dict[str, float]:
        difference = long[direction].ops.copy()
        difference.subtract(short[direction].ops)
        return {name: n / case.steps for name, n in sorted(difference.items()) if n}

    def ops(direction: int) -> float:
        return sum(by_op(direction).values())

    def collectives(direction: int) -> float:
        return (sum(long[direction].collectives.values()) - sum(short[direction].collectives.values())) / case.steps

    return StepCounts(per_step("launches", 0), per_step("launches", 1), ops(0), ops(1), collectives(0), collectives(1),
                      by_op(0), by_op(1))


def _rank(rank: int, world_size: int, init: str, cases: list[Case], out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world_size)
    results = [{"case": c.name, **asdict(c), **asdict(count_per_step(c))} for c in cases]
    if rank == 0:
        Path(out).write_text(json.dumps(results, indent=1))
    dist.destroy_process_group()


def run(cases: list[Case], world_size: int = 2) -> list[dict[str, Any]]:
    """Count ``cases`` on ``world_size`` gloo processes; rank 0's results."""
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "counts.json")
        mp.spawn(_rank, args=(world_size, f"file://{folder}/rendezvous", cases, out), nprocs=world_size)
        return json.loads(Path(out).read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="cpu_flash", choices=["cpu_flash", "triton", "reference"])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    cases = [Case(args.backend, causal) for causal in (True, False)]
    results = run(cases, args.world_size)
    print(f"| case (P = {args.world_size}) | forward launches | of which aten/kernels | backward launches | of which aten/kernels |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['case']} | {r['forward_launches']:.1f} | {r['forward_ops']:.1f} | {r['backward_launches']:.1f} | "
              f"{r['backward_ops']:.1f} |")
    for r in results:
        print(f"\n{r['case']}\n  forward:  {r['forward_by_op']}\n  backward: {r['backward_by_op']}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
