"""Launch configurations of the kernels, on a GPU and under the Triton interpreter.

``TRITON_INTERPRET=1`` is read once, when this module is imported, because ``triton.jit``
reads it once too, when each kernel is decorated: the two must agree. On CUDA each kernel is
autotuned over a few block shapes, each kept to the head sizes it compiles for without register
spills (``benchmarks/kernel_compile_report.py`` checks that); the interpreter cannot autotune
(it has no driver to time configs with), so it gets one small config, which also keeps it fast.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import triton

INTERPRET: bool = os.environ.get("TRITON_INTERPRET") == "1"

# Autotuning reruns a kernel whenever one of these arguments (or an input dtype) changes. The rows
# of a segment (a micro-step's rows per rank, the same on every rank of a group) and the local keys
# enter as powers of two (``tuning_buckets``): a run tunes once per layer shape and length class,
# not at every new length, and every rank of a group tunes at the same calls, so none waits on
# another's tuning (the gathered rows would differ between ranks on the steps of a sparse exchange).
AUTOTUNE_KEY = ["ROWS_BUCKET", "KEYS_BUCKET", "HEAD_DIM", "HAS_LEFT", "HAS_RIGHT"]


def tuning_buckets(segment_rows: int, keys: int) -> tuple[int, int]:
    """The autotuning key's row and key counts: each rounded up to a power of two."""
    return triton.next_power_of_2(segment_rows), triton.next_power_of_2(keys)


# The interpreter's block: small enough that tests with 50-100 rows still cover ragged edges.
_INTERPRETER_BLOCK = 32


@dataclass(frozen=True)
class Shape:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    max_head_dim: int  # the largest (power-of-two) head size it runs without spilling registers


def _configs(shapes: list[Shape]) -> list[triton.Config]:
    if INTERPRET:
        return [triton.Config({"BLOCK_M": _INTERPRETER_BLOCK, "BLOCK_N": _INTERPRETER_BLOCK}, num_warps=1, num_stages=1)]
    configs = []
    for shape in shapes:
        config = triton.Config({"BLOCK_M": shape.block_m, "BLOCK_N": shape.block_n}, num_warps=shape.num_warps,
                               num_stages=shape.num_stages)
        _MAX_HEAD_DIM[id(config)] = shape.max_head_dim
        configs.append(config)
    return configs


# By identity: two kernels' configs with equal block shapes compare equal, but may suit other head sizes.
_MAX_HEAD_DIM: dict[int, int] = {}


def describe(config: triton.Config) -> str:
    """BLOCK_MxBLOCK_N, warps, pipeline stages: e.g. "128x64 w8 s3"."""
    return f"{config.kwargs['BLOCK_M']}x{config.kwargs['BLOCK_N']} w{config.num_warps} s{config.num_stages}"


def prune_configs(configs: list[triton.Config], named_args: dict, **kwargs: object) -> list[triton.Config]:
    """The configs meant for this head size (BLOCK_D); the last, smallest one for larger heads."""
    block_d = int(kwargs["BLOCK_D"])  # type: ignore[call-overload]
    fitting = [config for config in configs if block_d <= _MAX_HEAD_DIM[id(config)]]
    return fitting or configs[-1:]


# Each config runs the head sizes up to its max_head_dim; the compile report (benchmarks/kernel_compile_report.py)
# shows which ones each config holds in registers on sm_90.
# The forward keeps a [BLOCK_M, D] accumulator per program: wide query blocks amortise the key loads.
FORWARD_CONFIGS = _configs([Shape(128, 128, 8, 3, 64), Shape(128, 64, 8, 3, 128), Shape(64, 64, 4, 3, 128)])
# dQ programs hold one [BLOCK_M, D] accumulator and stream key blocks.
BACKWARD_DQ_CONFIGS = _configs([Shape(128, 32, 4, 3, 64), Shape(64, 64, 4, 3, 64), Shape(128, 64, 8, 3, 128)])
# dK/dV programs hold two [BLOCK_N, D] accumulators (half the register file at D = 128) and stream
# query blocks: narrow BLOCK_M; a warp group (4 warps) per 64 keys, as Hopper's MMA wants.
BACKWARD_DKDV_CONFIGS = _configs([Shape(32, 128, 8, 3, 64), Shape(32, 64, 4, 3, 64), Shape(16, 128, 8, 3, 128)])
# The merge streams each partial once (memory-bound, no dot products): one config, not tuned.
MERGE_CONFIG = _configs([Shape(64, 64, 4, 1, 256)])[0]
