"""Compile every kernel and autotune config for an sm_90 GPU (H100/H200) without a GPU: registers,
spills, shared memory and software pipelining of each.

Each record is one kernel x config x head size x causal or not x GQA or not x mask kind (none,
padding, window, documents, softcap, dropout) x dtype, compiled down to a cubin through ptxas.
The signature is the one a real launch would give the JIT: inner strides of 1 as constants,
pointers and 16-divisible integers marked ``tt.divisibility=16``, a GQA group or a segment count of
1 as a constant; without that, registers and pipelining differ from a real launch. Configs are the
ones the autotuner may pick for that head size (``tuning.prune_configs``).

    python benchmarks/kernel_compile_report.py [--kernels forward dq] [--head-dims 128] [--masks none dropout]
        [--limit N] [--jobs N] [--json FILE]

Prints a table; ``--json`` writes the records (kernel, config, head_dim, causal, gqa, dtype, mask,
registers, spill_bytes, shared_memory, pipelined). Goal: spill_bytes == 0 and pipelined everywhere.
``pipelined``: the TTGIR has asynchronous copies into shared memory
(``ttg.async_copy_global_to_local``) or asynchronous Hopper dots (``ttng.warp_group_dot`` with
``isAsync = true``), i.e. the software pipeliner overlapped the loads or the MMAs with compute.
Exits 1 when a record spills or is not pipelined (so it can gate a check), 0 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import os
import re
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("kernel_compile_report.py compiles for a GPU: run it without TRITON_INTERPRET=1")

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from lightning_mqsp.kernels.arguments import block_head_dim
from lightning_mqsp.kernels.backward import _backward_dkdv_kernel, _backward_dq_kernel
from lightning_mqsp.kernels.forward import _forward_kernel
from lightning_mqsp.kernels.tuning import describe, prune_configs

TARGET = GPUTarget("cuda", 90, 32)
KERNELS = {"forward": _forward_kernel, "dkdv": _backward_dkdv_kernel, "dq": _backward_dq_kernel}
MASKS = ("none", "padding", "window", "documents", "softcap", "dropout")
DTYPES = {"bf16": "bf16", "fp16": "fp16"}
# A realistic launch: 16 query heads, 8 query segments (rows of 8 ranks), a window of 256 keys.
NUM_HEADS, QUERY_SEGMENTS, WINDOW = 16, 8, 256

_ELEMENT_POINTERS = ("Q", "K", "V", "DOut")
_FLOAT_POINTERS = ("Out", "RowMax", "RowLogSum", "Delta", "DQ", "GradKey", "GradValue")
_INT64_POINTERS = ("QueryPos", "KeyPos", "QueryDoc", "KeyDoc", "DropoutSeed")
_FLOAT_SCALARS = ("cap_scale", "unit", "dropout_rescale", "scale")


@dataclass(frozen=True)
class Variant:
    kernel: str
    config_index: int
    head_dim: int
    causal: bool
    gqa: bool
    mask: str
    dtype: str


def launch_values(variant: Variant) -> tuple[dict[str, object], dict[str, str]]:
    """(constexpr values, other arguments' types) as the JIT would specialise a launch of ``variant``."""
    kernel = KERNELS[variant.kernel]
    window = variant.mask == "window"
    constexprs: dict[str, object] = {
        "HEAD_DIM": variant.head_dim, "BLOCK_D": block_head_dim(variant.head_dim),
        "HAS_LEFT": window, "HAS_RIGHT": window or variant.causal, "HAS_PADDING": variant.mask == "padding",
        "HAS_DOCUMENTS": variant.mask == "documents", "SOFTCAP": variant.mask == "softcap",
        "DROPOUT": variant.mask == "dropout", "DOT_PRECISION": "tf32",
    }
    config = kernel.configs[variant.config_index]
    constexprs.update(config.kwargs)
    types: dict[str, str] = {}
    for name in kernel.fn.arg_names:
        if name in constexprs:
            continue
        if (name.startswith("stride_") and name.endswith("d")) or (name == "stride_pad_n" and variant.mask == "padding"):
            constexprs[name] = 1  # the innermost stride of every tensor (head_dim, or keys for the padding mask)
        elif name == "group_size":
            if variant.gqa:
                types[name] = "i32"  # a group of 2: not divisible by 16
            else:
                constexprs[name] = 1
        elif name == "query_segments":
            types[name] = "i32D"
        elif name in _ELEMENT_POINTERS:
            types[name] = f"*{DTYPES[variant.dtype]}D"
        elif name in _FLOAT_POINTERS:
            types[name] = "*fp32D"
        elif name in _INT64_POINTERS:
            types[name] = "*i64D"
        elif name == "KeyPadding":
            types[name] = "*u8D" if variant.mask == "padding" else "*i64D"  # else the key positions stand in
        elif name in _FLOAT_SCALARS:
            types[name] = "fp32"
        elif name in ("M", "N", "segment_rows", "stored_rows", "ROWS_BUCKET", "KEYS_BUCKET", "dropout_threshold"):
            types[name] = "i32"  # do_not_specialize
        elif name == "stride_om" or name.startswith("stride_s"):
            types[name] = "i32"  # rows of the returned partials (D + 2 floats) and the statistics in a gathered row
        else:
            types[name] = "i32D"  # strides of contiguous tensors, head counts, window sides: multiples of 16
    return constexprs, types


def compile_variant(variant: Variant) -> dict[str, object]:
    """Compile one variant: (registers, spill bytes, shared memory, pipelined)."""
    kernel = KERNELS[variant.kernel]
    constexprs, types = launch_values(variant)
    arg_names = kernel.fn.arg_names
    signature = {name: "constexpr" if name in constexprs else types[name].rstrip("D") for name in arg_names}
    attrs = {(arg_names.index(name),): [["tt.divisibility", 16]] for name, kind in types.items() if kind.endswith("D")}
    config = kernel.configs[variant.config_index]
    source = ASTSource(fn=kernel.fn, signature=signature, constexprs=constexprs, attrs=attrs)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(source, target=TARGET, options={"num_warps": config.num_warps, "num_stages": config.num_stages})
    ptxas = log.getvalue()
    registers = re.search(r"Used (\d+) registers", ptxas)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", ptxas)
    if registers is None or spills is None:
        raise RuntimeError(f"no ptxas report for {variant}: {ptxas!r}")
    ttgir = compiled.asm["ttgir"]
    pipelined = "ttg.async_copy_global_to_local" in ttgir or re.search(r"ttng\.warp_group_dot[^\n]*isAsync = true", ttgir) is not None
    return {"registers": int(registers.group(1)), "spill_bytes": int(spills.group(1)) + int(spills.group(2)),
            "shared_memory": compiled.metadata.shared, "pipelined": pipelined}


def specialisation(variant: Variant) -> tuple[object, ...]:
    """What the compiler sees of a variant: variants alike here (a sliding and a symmetric window) compile once."""
    constexprs, types = launch_values(variant)
    return variant.kernel, variant.config_index, tuple(sorted(constexprs.items())), tuple(sorted(types.items()))


def record(variant: Variant, compiled: dict[str, object]) -> dict[str, object]:
    config = KERNELS[variant.kernel].configs[variant.config_index]
    return {"kernel": variant.kernel, "config": describe(config), "head_dim": variant.head_dim, "causal": variant.causal,
            "gqa": variant.gqa, "dtype": variant.dtype, "mask": variant.mask, **compiled}


def variants(kernels: list[str], head_dims: list[int], masks: list[str], dtypes: list[str], causal: list[bool],
             gqa: list[bool]) -> list[Variant]:
    chosen = []
    for kernel, head_dim, is_causal, is_gqa, mask, dtype in itertools.product(kernels, head_dims, causal, gqa, masks, dtypes):
        configs = KERNELS[kernel].configs
        for config in prune_configs(configs, {}, BLOCK_D=block_head_dim(head_dim)):
            chosen.append(Variant(kernel, configs.index(config), head_dim, is_causal, is_gqa, mask, dtype))
    return chosen


def _init_worker() -> None:
    # Compile even what the cache holds: ptxas's log is the register and spill report.
    triton.knobs.compilation.always_compile = True
    triton.knobs.nvidia.dump_ptxas_log = True


def print_table(records: list[dict[str, object]]) -> None:
    header = (f"{'kernel':<8} {'config':<16} {'D':>4} {'causal':>6} {'gqa':>5} {'dtype':>5} {'mask':<10} {'regs':>5} "
              f"{'spill':>6} {'smem':>7} {'pipelined':>9}")
    print(header)
    print("-" * len(header))
    for r in records:
        print(f"{r['kernel']:<8} {r['config']:<16} {r['head_dim']:>4} {r['causal']!s:>6} {r['gqa']!s:>5} {r['dtype']:>5} "
              f"{r['mask']:<10} {r['registers']:>5} {r['spill_bytes']:>6} {r['shared_memory']:>7} {r['pipelined']!s:>9}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kernels", nargs="+", choices=list(KERNELS), default=list(KERNELS))
    parser.add_argument("--head-dims", nargs="+", type=int, default=[64, 128])
    parser.add_argument("--masks", nargs="+", choices=MASKS, default=list(MASKS))
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=["bf16"])
    parser.add_argument("--causal", nargs="+", choices=["yes", "no"], default=["no", "yes"])
    parser.add_argument("--gqa", nargs="+", choices=["yes", "no"], default=["no", "yes"])
    parser.add_argument("--limit", type=int, default=None, help="compile only the first N variants")
    parser.add_argument("--jobs", type=int, default=os.cpu_count(), help="compiles in parallel")
    parser.add_argument("--json", type=Path, default=None, help="write the records here")
    args = parser.parse_args(argv)

    chosen = variants(args.kernels, args.head_dims, args.masks, args.dtypes,
                      [c == "yes" for c in args.causal], [g == "yes" for g in args.gqa])[: args.limit]
    distinct = list({specialisation(variant): variant for variant in chosen}.values())
    print(f"compiling {len(distinct)} kernels ({len(chosen)} variants) for sm_90 with triton {triton.__version__}, "
          f"{args.jobs} at a time", flush=True)
    with ProcessPoolExecutor(args.jobs, initializer=_init_worker) as pool:
        compiled = dict(zip(map(specialisation, distinct), pool.map(compile_variant, distinct)))
    records = [record(variant, compiled[specialisation(variant)]) for variant in chosen]
    print_table(records)
    failing = [r for r in records if r["spill_bytes"] or not r["pipelined"]]
    print(f"\n{len(records)} variants: {len(records) - len(failing)} without spills and pipelined, {len(failing)} not")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(records, indent=1))
        print(f"wrote {args.json}")
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main())
