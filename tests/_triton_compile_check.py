"""Compiles the three kernels for an sm_90 GPU (down to a cubin, through ptxas) without a GPU.

The interpreter runs the kernels' Python, not Triton's compiler: type promotion, scalar
specialisation and control flow inside loops are only checked by a real compile. Run by
``tests/test_backends_triton.py`` in a process without ``TRITON_INTERPRET``; prints one line per
kernel and raises on the first failure.
"""

from __future__ import annotations

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from lightning_mqsp.kernels.backward import _backward_dkdv_kernel, _backward_dq_kernel
from lightning_mqsp.kernels.forward import _forward_kernel

TARGET = GPUTarget("cuda", 90, 32)
ELEMENT = "bf16"
HEAD_DIM = 128
# Every optional path on: causal block skipping, padding loads, the dropout hash; GQA groups of 2.
FLAGS = {"CAUSAL": True, "HAS_PADDING": True, "DROPOUT": True, "DOT_PRECISION": "tf32", "GROUP_SIZE": 2,
         "HEAD_DIM": HEAD_DIM, "BLOCK_D": HEAD_DIM}
POINTERS = {
    "Q": f"*{ELEMENT}", "K": f"*{ELEMENT}", "V": f"*{ELEMENT}", "DOut": f"*{ELEMENT}", "QueryPos": "*i64", "KeyPos": "*i64",
    "KeyPadding": "*u8", "Out": "*fp32", "Lse": "*fp32", "Delta": "*fp32", "DQ": "*fp32", "DK": "*fp32", "DV": "*fp32",
}
SCALARS = {"scale": "fp32", "scale_log2": "fp32", "dropout_rescale": "fp32", "dropout_threshold": "i64"}  # others: i32


def compile_kernel(kernel: triton.runtime.Autotuner, block_m: int, block_n: int, num_warps: int, num_stages: int) -> int:
    """Compiles one kernel; returns the shared memory it needs (bytes)."""
    fn = kernel.fn
    constexprs = {**FLAGS, "BLOCK_M": block_m, "BLOCK_N": block_n}
    signature = {
        name: "constexpr" if name in constexprs else POINTERS.get(name, SCALARS.get(name, "i32")) for name in fn.arg_names
    }
    source = ASTSource(fn=fn, signature=signature, constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    compiled = triton.compile(source, target=TARGET, options={"num_warps": num_warps, "num_stages": num_stages})
    return compiled.metadata.shared


if __name__ == "__main__":
    for kernel, launch in [(_forward_kernel, (128, 64, 8, 3)), (_backward_dkdv_kernel, (32, 128, 4, 3)), (_backward_dq_kernel, (128, 32, 4, 3))]:
        shared = compile_kernel(kernel, *launch)
        print(f"{kernel.fn.__name__}: compiled for sm_90 ({ELEMENT}, D={HEAD_DIM}, all masks), {shared} bytes of shared memory")
