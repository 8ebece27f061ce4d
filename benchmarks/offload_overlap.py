"""How much of the offload's copy time hides behind compute (``lightning_mqsp/offload.py``), on one GPU.

    python benchmarks/offload_overlap.py --out benchmarks/out/offload_overlap.json
    python benchmarks/offload_overlap.py --dry-run      # CPU, tiny sizes: the plumbing only (the suite runs it)

A stand-in for a checkpointed model's step: each of ``layers`` layers is a chain of [n, n] matmuls on the compute
stream. Forward copies each layer's output (rows x hidden, bfloat16: a layer's saved hidden states) to host memory
with ``offload.to_host`` as soon as the layer has made it; backward brings the outputs back last to first with
``offload.to_device``, asking for the next one before this layer's compute, as MQSP's backward and
``offloaded_saved_tensors`` do. Timed three ways, each the median of ``repeats`` after a warm-up: the copies alone,
the compute alone, and both as a step runs them. Hidden = (copies + compute - both) / copies: 1 when every copy
hides behind compute, 0 when the copies add their whole time (as they did on the compute stream). The values that
came back are checked against what was sent: a read ordered before its copy would see other bytes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))  # an uninstalled checkout imports lightning_mqsp from the root, after site-packages

from lightning_mqsp import offload  # noqa: E402


@dataclass(frozen=True)
class Sizes:
    layers: int
    rows: int  # tokens of a layer's saved hidden states
    hidden: int
    matmul: int  # n of each [n, n] matmul of a layer
    matmuls: int  # per layer, forward and again in backward
    device: str

    @staticmethod
    def of(dry_run: bool) -> Sizes:
        if dry_run:
            return Sizes(layers=3, rows=64, hidden=32, matmul=32, matmuls=2, device="cpu")
        # 256 MiB a layer each way (about 10 ms at PCIe 5's 25 GB/s), and about as long in matmuls (8 of 1.1 TFLOP).
        return Sizes(layers=16, rows=32768, hidden=4096, matmul=8192, matmuls=8, device="cuda")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Step:
    """The stand-in's tensors, and one forward and backward of it with the copies, the compute, or both."""

    def __init__(self, sizes: Sizes) -> None:
        self.sizes, self.device = sizes, torch.device(sizes.device)
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        generator = torch.Generator().manual_seed(0)
        self.outputs = [torch.randn(sizes.rows, sizes.hidden, generator=generator).to(self.device, dtype) for _ in range(sizes.layers)]
        self.weight = torch.randn(sizes.matmul, sizes.matmul, generator=generator).to(self.device, dtype) / sizes.matmul**0.5

    def layer(self) -> None:
        x = self.weight
        for _ in range(self.sizes.matmuls):
            x = x @ self.weight

    def run(self, copies: bool, compute: bool) -> list[Tensor]:
        """The outputs that came back, last layer's first (none without copies)."""
        hosts = []
        for output in self.outputs:
            if compute:
                self.layer()
            if copies:  # made by a kernel queued after the layer's: the copy must wait for it
                hosts.append(offload.to_host(output * 1))
        back: list[Tensor] = []
        coming = offload.to_device(hosts[-1], self.device) if copies else None
        for index in reversed(range(self.sizes.layers)):
            if copies and coming is not None:
                back.append(coming)
                coming = offload.to_device(hosts[index - 1], self.device) if index > 0 else None  # the prefetch
            if compute:
                self.layer()
        return back

    def seconds(self, copies: bool, compute: bool, repeats: int) -> float:
        def once() -> float:
            _synchronize(self.device)
            start = time.perf_counter()
            self.run(copies, compute)
            _synchronize(self.device)
            return time.perf_counter() - start

        once()  # warm-up: kernels chosen, pinned buffers cached
        return statistics.median(once() for _ in range(repeats))


@dataclass
class Report:
    device: str
    torch: str
    date: str
    sizes: dict[str, Any]
    copies_s: float
    compute_s: float
    both_s: float
    hidden_fraction: float  # of the copy time
    copy_gb_per_s: float  # both directions
    values_ok: bool


def measure(sizes: Sizes, repeats: int) -> Report:
    step = _Step(sizes)
    back = step.run(copies=True, compute=True)
    values_ok = all(torch.equal(came, sent) for came, sent in zip(back, reversed(step.outputs), strict=True))
    timings: dict[str, Callable[[], float]] = {
        "copies": lambda: step.seconds(copies=True, compute=False, repeats=repeats),
        "compute": lambda: step.seconds(copies=False, compute=True, repeats=repeats),
        "both": lambda: step.seconds(copies=True, compute=True, repeats=repeats),
    }
    copies, compute, both = (timings[name]() for name in ("copies", "compute", "both"))
    moved = 2 * sum(output.numel() * output.element_size() for output in step.outputs)
    device = torch.cuda.get_device_name(step.device) if step.device.type == "cuda" else "cpu (dry run: no copies)"
    return Report(device=device, torch=torch.__version__, date=datetime.date.today().isoformat(), sizes=asdict(sizes),
                  copies_s=copies, compute_s=compute, both_s=both, hidden_fraction=(copies + compute - both) / copies,
                  copy_gb_per_s=moved / copies / 1e9, values_ok=values_ok)


def main(argv: list[str] | None = None) -> Report:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "offload_overlap.json")
    parser.add_argument("--dry-run", action="store_true", help="CPU tensors, tiny sizes")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --dry-run on a CPU")
    report = measure(Sizes.of(args.dry_run), args.repeats)
    print(f"{report.device}: copies alone {report.copies_s * 1e3:.1f} ms ({report.copy_gb_per_s:.1f} GB/s), compute alone "
          f"{report.compute_s * 1e3:.1f} ms, both {report.both_s * 1e3:.1f} ms: {report.hidden_fraction:.0%} of the copy time "
          f"hidden; values {'ok' if report.values_ok else 'WRONG'}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(asdict(report), indent=2))
    return report


if __name__ == "__main__":
    sys.exit(0 if main().values_ok else 1)
