"""`make demo`: train the BERT MLM example with sequence parallelism (SP=2) and on one process,
and show that the two loss curves agree step by step.

    python examples/demo.py [--steps 60] [--seq-len 1024] [--out runs/demo]

Both runs start from the same seed and see the same batches; dropout is off, so the only
difference is that one splits every sequence over two ranks and computes attention with MQSP.
Prints both curves side by side with their largest difference, writes a PNG plot, and ends with
one line saying whether they agree (|difference| <= 1e-3 at every step, fp32). Uses GPUs when
there are at least two.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import time
from pathlib import Path

import torch

EXAMPLES = Path(__file__).parent
TOLERANCE = 1e-3


def train(name: str, devices: int, strategy: list[str], args: argparse.Namespace) -> list[float]:
    accelerator = "gpu" if torch.cuda.device_count() >= 2 else "cpu"
    command = [
        sys.executable, str(EXAMPLES / "bert_mlm.py"), "fit",
        "--config", str(EXAMPLES / "configs" / "bert_mlm.yaml"), "--config", str(EXAMPLES / "configs" / "demo.yaml"),
        f"--trainer.accelerator={accelerator}", f"--trainer.devices={devices}", *strategy,
        f"--trainer.max_steps={args.steps}", f"--trainer.logger.init_args.save_dir={args.out}",
        f"--trainer.logger.init_args.version={name}", f"--data.seq_len={args.seq_len}",
        f"--model.max_position_embeddings={args.seq_len}",
    ]
    print(f"\n=== {name}: {' '.join(command[1:])}", flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True)
    print(f"=== {name} finished in {time.perf_counter() - start:.0f} s", flush=True)
    with open(Path(args.out) / "bert_mlm" / name / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train_loss")]
    return [float(r["train_loss"]) for r in sorted(rows, key=lambda r: int(r["step"]))]


def plot(sp: list[float], single: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    steps = range(1, len(sp) + 1)
    top.plot(steps, single, label="1 process, full sequence", linewidth=3, alpha=0.5)
    top.plot(steps, sp, label="MQSP, 2 ranks x half the sequence", linestyle="--")
    top.set_ylabel("training loss (MLM)")
    top.legend()
    top.set_title("BERT MLM: MQSP (SP=2) against one process")
    bottom.plot(steps, [abs(a - b) for a, b in zip(sp, single)], color="black")
    bottom.axhline(TOLERANCE, color="red", linestyle=":", label=f"tolerance {TOLERANCE:g}")
    bottom.set_yscale("symlog", linthresh=1e-7)
    bottom.set_ylabel("|difference|")
    bottom.set_xlabel("step")
    bottom.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--out", default="runs/demo")
    args = parser.parse_args()

    sp = train("sp2", 2, [], args)
    single = train("single", 1, ["--trainer.strategy=auto"], args)
    if len(sp) != len(single) or not sp:
        raise SystemExit(f"The runs logged different numbers of steps ({len(sp)} and {len(single)}).")
    print(f"\n{'step':>5} {'1 process':>12} {'MQSP SP=2':>12} {'|difference|':>14}")
    for step, (a, b) in enumerate(zip(single, sp), start=1):
        print(f"{step:5d} {a:12.6f} {b:12.6f} {abs(a - b):14.2e}")
    worst = max(abs(a - b) for a, b in zip(sp, single))
    figure = Path(args.out) / "demo_loss_curves.png"
    plot(sp, single, figure)
    print(f"\nplot: {figure}")
    verdict = "AGREE" if worst <= TOLERANCE else "DISAGREE"
    print(f"{verdict}: over {len(sp)} steps the MQSP (SP=2) and single-process losses differ by at most {worst:.2e} (tolerance {TOLERANCE:g})")
    raise SystemExit(0 if worst <= TOLERANCE else 1)


if __name__ == "__main__":
    main()
