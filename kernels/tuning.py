"""Launch configurations of the micro-Q kernels, on a GPU and under the Triton interpreter.

``TRITON_INTERPRET=1`` is read once, when this module is imported, because ``triton.jit``
reads it once too, when each kernel is decorated: the two must agree. On CUDA each kernel is
autotuned over a few block shapes; the interpreter cannot autotune more than one config (it
has no driver to time them with), so it gets a single small one, which also keeps it fast.
"""

import os

import triton

INTERPRET: bool = os.environ.get("TRITON_INTERPRET") == "1"

# Autotuning reruns a kernel whenever one of these arguments (or an input dtype) changes. In MQSP
# the rows per micro-step, the local key count, the head size and the mask kind are fixed for a
# run, so it tunes once per layer shape.
AUTOTUNE_KEY = ["M", "N", "HEAD_DIM", "CAUSAL"]

# The interpreter's block: small enough that tests with 50-100 rows still cover ragged edges.
_INTERPRETER_BLOCK = 32


def _configs(shapes: list[tuple[int, int, int, int]]) -> list[triton.Config]:
    """triton.Config per (BLOCK_M, BLOCK_N, num_warps, num_stages), or the interpreter's one."""
    if INTERPRET:
        return [triton.Config({"BLOCK_M": _INTERPRETER_BLOCK, "BLOCK_N": _INTERPRETER_BLOCK}, num_warps=1, num_stages=1)]
    return [
        triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)
        for block_m, block_n, warps, stages in shapes
    ]


# The forward keeps a [BLOCK_M, D] accumulator per program: wide query blocks amortise the key loads.
FORWARD_CONFIGS = _configs([(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (64, 32, 4, 4)])
# dK/dV programs hold two [BLOCK_N, D] accumulators and stream query blocks: narrow BLOCK_M.
BACKWARD_DKDV_CONFIGS = _configs([(32, 128, 4, 3), (64, 128, 8, 3), (64, 64, 4, 3), (32, 64, 4, 4)])
# dQ programs hold one [BLOCK_M, D] accumulator and stream key blocks: narrow BLOCK_N.
BACKWARD_DQ_CONFIGS = _configs([(128, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 4)])
