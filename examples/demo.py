"""`make demo`: train an example with sequence parallelism and on one process, and show that the loss curves
agree step by step.

    python examples/demo.py                                   # BERT MLM, SP=2 against one process, 60 steps
    python examples/demo.py --sp 2 4 --steps 300 --out runs/convergence   # the BERT convergence experiment
    python examples/demo.py --example llama --sp 2 4 --steps 300 --out runs/llama_fp32
    python examples/demo.py --example llama --sp 2 4 --steps 300 --precision bf16-mixed --noise-floor --out runs/llama_bf16

Every run starts from the same seed and sees the same batches; dropout is off, so the only
difference is that the MQSP runs split every sequence over SP ranks. ``--example llama`` runs
``llama_long.py``: a causal LM on packed documents with the full long-context recipe (FSDP2, activation
checkpointing with offload, MLP tiles, chunked loss) against the same Hugging Face model in one process with
its own attention. Prints the curves side by side with their largest difference from the single-process
curve, writes a PNG plot, and ends with one line saying whether they agree (|difference| <= 1e-3 at every
step in float32). In bf16 the single-process curve itself moves with the order of its additions:
``--noise-floor`` trains it twice, the second time with another loss chunk size (the same sums in another
order), and the MQSP runs agree when they stay within 3x that run's difference (or 1e-3). Uses GPUs when there
are enough.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

EXAMPLES = Path(__file__).parent
TOLERANCE = 1e-3


@dataclass(frozen=True)
class Example:
    script: str
    config: str
    name: str
    length_option: str  # the model's option that must hold the sequence length
    label: str


EXAMPLE_RUNS = {
    "bert": Example("bert_mlm.py", "bert_mlm.yaml", "bert_mlm", "--model.max_position_embeddings", "BERT MLM"),
    "llama": Example("llama_long.py", "llama_long.yaml", "llama_long", "--model.max_positions", "Llama, packed documents, full recipe"),
}


def train(sp: int, args: argparse.Namespace, name: str | None = None, extra: tuple[str, ...] = ()) -> list[float]:
    """Train at sequence-parallel size ``sp`` (1: one process, no MQSP); return the per-step losses."""
    example = EXAMPLE_RUNS[args.example]
    accelerator = "gpu" if torch.cuda.device_count() >= sp else "cpu"
    strategy = ["--trainer.strategy=auto"] if sp == 1 else [f"--trainer.strategy.init_args.sequence_parallel_size={sp}"]
    name = name or f"sp{sp}"
    command = [
        sys.executable, str(EXAMPLES / example.script), "fit",
        "--config", str(EXAMPLES / "configs" / example.config), "--config", str(EXAMPLES / "configs" / "demo.yaml"),
        f"--trainer.accelerator={accelerator}", f"--trainer.devices={sp}", *strategy, f"--trainer.precision={args.precision}",
        f"--trainer.max_steps={args.steps}", f"--trainer.val_check_interval={max(1, args.steps // 2)}",
        f"--trainer.logger.init_args.save_dir={args.out}", f"--trainer.logger.init_args.name={example.name}",
        f"--trainer.logger.init_args.version={name}",
        f"--data.seq_len={args.seq_len}", f"{example.length_option}={args.seq_len}", f"--model.lr={args.lr}", *extra,
    ]
    print(f"\n=== {name}: {' '.join(command[1:])}", flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True)
    print(f"=== {name} finished in {time.perf_counter() - start:.0f} s", flush=True)
    with open(Path(args.out) / example.name / name / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train_loss")]
    return [float(r["train_loss"]) for r in sorted(rows, key=lambda r: int(r["step"]))]


def plot(curves: dict[int, list[float]], path: Path, label: str, floor: list[float] | None, tolerance: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    reference = curves[1]
    steps = range(1, len(reference) + 1)
    top.plot(steps, reference, label="1 process, full sequence", linewidth=4, alpha=0.4)
    for sp, losses in curves.items():
        if sp > 1:
            top.plot(steps, losses, label=f"MQSP, {sp} ranks x 1/{sp} of the sequence", linestyle="--")
            bottom.plot(steps, [abs(a - b) for a, b in zip(losses, reference)], label=f"SP={sp}")
    if floor is not None:
        bottom.plot(steps, [abs(a - b) for a, b in zip(floor, reference)], label="1 process, other order of additions",
                    color="gray", linewidth=3, alpha=0.5)
    top.set_ylabel(f"training loss ({label})")
    top.legend()
    top.set_title("MQSP against one process: same batches, same seed")
    bottom.axhline(tolerance, color="red", linestyle=":", label=f"tolerance {tolerance:.2g}")
    bottom.set_yscale("symlog", linthresh=1e-7)
    bottom.set_ylabel("|difference|")
    bottom.set_xlabel("step")
    bottom.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--example", choices=sorted(EXAMPLE_RUNS), default="bert")
    parser.add_argument("--sp", type=int, nargs="+", default=[2], help="sequence-parallel sizes to compare with one process")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--precision", default="32-true", help="the Trainer's precision, e.g. bf16-mixed")
    parser.add_argument("--noise-floor", action="store_true",
                        help="train the single process twice, the second time with another loss chunk size: the tolerance")
    parser.add_argument("--out", default="runs/demo")
    args = parser.parse_args()

    sizes = sorted(set(args.sp) - {1})
    curves = {sp: train(sp, args) for sp in sizes}
    curves[1] = train(1, args)
    floor = train(1, args, name="sp1-reordered", extra=(f"--model.loss_chunk_size={args.seq_len // 8}",)) if args.noise_floor else None
    if any(len(c) != len(curves[1]) for c in [*curves.values(), *([floor] if floor else [])]) or not curves[1]:
        raise SystemExit(f"The runs logged different numbers of steps: { {sp: len(c) for sp, c in curves.items()} }.")
    floor_difference = max(abs(a - b) for a, b in zip(floor, curves[1])) if floor else 0.0
    tolerance = max(TOLERANCE, 3 * floor_difference)
    print(f"\n{'step':>5} {'1 process':>11}" + "".join(f" {f'SP={sp}':>11} {'|diff|':>9}" for sp in sizes)
          + (f" {'reordered':>11} {'|diff|':>9}" if floor else ""))
    for step in range(len(curves[1])):
        reference = curves[1][step]
        columns = "".join(f" {curves[sp][step]:11.6f} {abs(curves[sp][step] - reference):9.1e}" for sp in sizes)
        if floor:
            columns += f" {floor[step]:11.6f} {abs(floor[step] - reference):9.1e}"
        print(f"{step + 1:5d} {reference:11.6f}{columns}")
    worst = {sp: max(abs(a - b) for a, b in zip(curves[sp], curves[1])) for sp in sizes}
    out = Path(args.out)
    figure = out / "loss_curves.png"
    plot(curves, figure, EXAMPLE_RUNS[args.example].label, floor, tolerance)
    (out / "loss_curves.json").write_text(json.dumps({"args": vars(args), "curves": curves, "reordered": floor,
                                                      "max_difference": worst, "noise_floor": floor_difference,
                                                      "tolerance": tolerance}, indent=1))
    print(f"\nplot: {figure}")
    agree = all(w <= tolerance for w in worst.values())
    details = ", ".join(f"SP={sp}: {w:.2e}" for sp, w in worst.items())
    basis = f"3 x the single process's own {floor_difference:.2e} across orders of additions" if floor else f"{TOLERANCE:g}"
    print(f"{'AGREE' if agree else 'DISAGREE'}: over {len(curves[1])} steps the MQSP and single-process losses differ "
          f"by at most {details} (tolerance {tolerance:.2e}: {basis})")
    raise SystemExit(0 if agree else 1)


if __name__ == "__main__":
    main()
