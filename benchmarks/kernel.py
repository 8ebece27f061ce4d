"""Benchmark of the Triton micro-Q kernels against torch's flash SDPA, on one CUDA GPU.

First checks correctness against float64 attention (masks, GQA, dropout, ragged sizes, bf16);
then times forward and forward+backward at full-sequence attention (M = N = S, as one rank of a
P = 1 group) for S in {4k, 16k, 64k}, D in {64, 128}, bf16, non-causal and causal, and prints
TFLOP/s next to ``scaled_dot_product_attention`` with the flash backend.

    python benchmarks/kernel.py [--out benchmarks/out/kernel.json]

Without a CUDA device it prints why and exits 0 (the kernels' CPU tests run through the Triton
interpreter instead: ``pytest tests/test_backends_triton.py``).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_mqsp.backends import AttentionMask, get_backend
from lightning_mqsp.dropout import keep_mask

CORRECTNESS_TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


@dataclass(frozen=True)
class CorrectnessCase:
    rows: int
    keys: int
    heads: int
    kv_heads: int
    head_dim: int
    causal: bool
    padding: bool
    dropout_p: float


CORRECTNESS_CASES = [
    CorrectnessCase(1000, 1000, 8, 8, 64, causal=False, padding=False, dropout_p=0.0),
    CorrectnessCase(1000, 1000, 8, 2, 128, causal=True, padding=False, dropout_p=0.0),
    CorrectnessCase(777, 1531, 8, 4, 64, causal=True, padding=True, dropout_p=0.0),
    CorrectnessCase(513, 1100, 4, 4, 128, causal=False, padding=True, dropout_p=0.1),
    CorrectnessCase(600, 600, 4, 1, 32, causal=True, padding=False, dropout_p=0.1),
]


def float64_attention(q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask, scale: float) -> Tensor:
    """Dense float64 attention with the same masks and the same dropout keep mask."""
    q, k, v = q.double(), k.double(), v.double()
    groups = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    allowed = torch.ones(q.size(0), 1, q.size(2), k.size(2), dtype=torch.bool, device=q.device)
    if mask.causal:
        allowed &= mask.key_positions.view(1, 1, 1, -1) <= mask.query_positions.view(1, 1, -1, 1)
    if mask.key_padding_mask is not None:
        allowed &= mask.key_padding_mask.view(q.size(0), 1, 1, -1)
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows without a visible key: 0
    if mask.dropout_p > 0:
        keep = keep_mask(mask.dropout_seed, q.size(1), q.size(0), mask.query_positions, mask.key_positions, mask.dropout_p)
        probs = probs * keep / (1.0 - mask.dropout_p)
    return probs @ v


def relative_error(actual: Tensor, expected: Tensor) -> float:
    return ((actual.double() - expected).abs().max() / expected.abs().max()).item()


def check_correctness(device: torch.device, dtype: torch.dtype, cases: list[CorrectnessCase]) -> list[dict]:
    """Forward and dQ, dK, dV of the triton backend against float64; raises on an error above tolerance."""
    backend = get_backend("triton")
    g = torch.Generator(device="cpu").manual_seed(0)
    report = []
    for case in cases:
        b, scale = 2, case.head_dim**-0.5

        def randn(*shape: int) -> Tensor:
            return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

        q, dout = randn(b, case.heads, case.rows, case.head_dim), randn(b, case.heads, case.rows, case.head_dim)
        k, v = randn(b, case.kv_heads, case.keys, case.head_dim), randn(b, case.kv_heads, case.keys, case.head_dim)
        # Rows are the last `rows` positions of a sequence spread over twice the keys' span (gaps, as MQSP's gathered rows).
        keys = (torch.randperm(2 * case.keys, generator=g)[: case.keys]).sort().values
        rows = torch.randperm(2 * case.keys, generator=g)[: case.rows]
        padding = (torch.rand(b, case.keys, generator=g) > 0.2).to(device) if case.padding else None
        mask = AttentionMask(rows.to(device), keys.to(device), case.causal, padding, case.dropout_p, dropout_seed=17)

        expected_q, expected_k, expected_v = (t.double().requires_grad_() for t in (q, k, v))
        expected_out = float64_attention(expected_q, expected_k, expected_v, mask, scale)
        expected_out.backward(dout.double())

        out, lse = backend.forward(q, k, v, mask, scale)
        delta = (dout.float() * out).sum(dim=-1)
        dq, dk, dv = backend.backward(q, k, v, dout, lse, delta, mask, scale)
        errors = {
            name: relative_error(actual, expected)
            for name, actual, expected in [
                ("out", out, expected_out.detach()), ("dq", dq, expected_q.grad), ("dk", dk, expected_k.grad), ("dv", dv, expected_v.grad)
            ]
        }
        report.append({**asdict(case), "errors": errors})
        worst = max(errors.values())
        print(f"  {case}: max relative error {worst:.2e}")
        if not worst <= CORRECTNESS_TOLERANCE[dtype]:
            raise AssertionError(f"triton kernels disagree with float64 on {case}: {errors}")
    return report


def attention_flops(batch: int, heads: int, seq: int, head_dim: int, causal: bool) -> float:
    """Forward matmul FLOPs (QK^T and PV: 2 * 2 * S^2 * D per head), halved under a causal mask."""
    return 4.0 * batch * heads * seq * seq * head_dim * (0.5 if causal else 1.0)


def time_ms(fn) -> float:
    import triton.testing

    fn()  # compile and autotune outside the timed region
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=25, rep=100)


def benchmark_one(seq: int, head_dim: int, causal: bool, batch: int, heads: int) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from lightning_mqsp.kernels import ops

    device, dtype, scale = torch.device("cuda"), torch.bfloat16, head_dim**-0.5
    q, k, v, dout = (torch.randn(batch, heads, seq, head_dim, device=device, dtype=dtype) for _ in range(4))
    positions = torch.arange(seq, device=device)

    def triton_forward() -> tuple[Tensor, Tensor]:
        return ops.micro_q_attention_forward(q, k, v, positions, positions, None, causal, scale, 0.0, 0)

    def triton_forward_backward() -> None:
        out, lse = triton_forward()
        delta = (dout.float() * out).sum(dim=-1)
        ops.micro_q_attention_backward(q, k, v, dout, lse, delta, positions, positions, None, causal, scale, 0.0, 0)

    q_sdpa, k_sdpa, v_sdpa = (t.clone().requires_grad_() for t in (q, k, v))

    def sdpa_forward() -> Tensor:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q_sdpa, k_sdpa, v_sdpa, is_causal=causal, scale=scale)

    def sdpa_forward_backward() -> None:
        sdpa_forward().backward(dout)

    flops = attention_flops(batch, heads, seq, head_dim, causal)
    row = {"seq": seq, "head_dim": head_dim, "causal": causal, "batch": batch, "heads": heads, "dtype": "bfloat16"}
    # Backward matmuls are 2.5x the forward's (dV, dP, dQ, dK plus the recomputed QK^T).
    for name, fn, work in [
        ("triton_fwd", triton_forward, flops), ("triton_fwd_bwd", triton_forward_backward, 3.5 * flops),
        ("sdpa_flash_fwd", sdpa_forward, flops), ("sdpa_flash_fwd_bwd", sdpa_forward_backward, 3.5 * flops),
    ]:
        ms = time_ms(fn)
        row[f"{name}_ms"] = ms
        row[f"{name}_tflops"] = work / (ms * 1e-3) / 1e12
    del q, k, v, dout, q_sdpa, k_sdpa, v_sdpa
    torch.cuda.empty_cache()
    return row


def print_table(rows: list[dict]) -> None:
    header = f"{'S':>6} {'D':>4} {'causal':>6} | {'triton fwd':>10} {'sdpa fwd':>9} | {'triton f+b':>10} {'sdpa f+b':>9}   (TFLOP/s)"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['seq']:>6} {r['head_dim']:>4} {str(r['causal']):>6} | {r['triton_fwd_tflops']:>10.1f} {r['sdpa_flash_fwd_tflops']:>9.1f} | "
            f"{r['triton_fwd_bwd_tflops']:>10.1f} {r['sdpa_flash_fwd_bwd_tflops']:>9.1f}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/kernel.json"), help="where to write the JSON results")
    parser.add_argument("--seq", type=int, nargs="+", default=[4096, 16384, 65536], help="sequence lengths S (M = N = S)")
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--tokens-heads", type=int, default=2048, help="heads x head_dim (heads = this / D), like a 2048-wide model")
    args = parser.parse_args()

    if not torch.cuda.is_available():
        print("No CUDA device: the kernel benchmark needs a GPU; skipping. (CPU correctness: pytest tests/test_backends_triton.py)")
        return 0
    reason = get_backend("triton").supports(torch.empty(1, 1, 1, 64, device="cuda"), AttentionMask(torch.arange(1), torch.arange(1)))
    if reason is not None:
        print(f"The triton backend cannot run here: {reason}; skipping.")
        return 0

    device = torch.device("cuda")
    print(f"Correctness against float64 on {torch.cuda.get_device_name(device)} (bfloat16):")
    correctness = check_correctness(device, torch.bfloat16, CORRECTNESS_CASES)

    print("\nThroughput, bfloat16, M = N = S:")
    rows = []
    for seq in args.seq:
        for head_dim in args.head_dims:
            for causal in (False, True):
                rows.append(benchmark_one(seq, head_dim, causal, args.batch, args.tokens_heads // head_dim))
    print_table(rows)

    import triton

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "device": torch.cuda.get_device_name(device), "torch": torch.__version__, "triton": triton.__version__,
        "python": platform.python_version(), "correctness": correctness, "throughput": rows,
    }, indent=2))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
