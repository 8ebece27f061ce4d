"""Run by tests/test_backends_triton.py as a script: ``mqsp_attention(backend="triton")`` on two
gloo ranks, each rank's output and gradients compared with single-process float64 attention.

Usage: ``python tests/_triton_mqsp_worker.py OUT_DIR``; each rank writes ``OUT_DIR/rank{r}.json``
with the relative errors ({run: {"out"|"dq"|"dk"|"dv": error}}), which the test asserts on.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before lightning_mqsp.kernels is imported, in every rank

import datetime
import json
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from reference import allowed_pairs, dense_attention, relative_error

from lightning_mqsp import mqsp_attention, shard_sequence
from lightning_mqsp.dropout import draw_seed, keep_mask

WORLD_SIZE = 2
LENGTH, BATCH, HEADS, KV_HEADS, HEAD_DIM = 64, 2, 4, 2, 32


def compare(
    rank: int, layout: str, causal: bool, padding: bool, dropout_p: float, micro_q_size: int,
    window: tuple[int | None, int | None] | None = None, documents: bool = False, softcap: float | None = None,
) -> dict[str, float]:
    """One mqsp_attention forward and backward on this rank's shard; relative errors of its rows/keys."""
    g = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(BATCH, h, LENGTH, HEAD_DIM, generator=g) for h in (HEADS, KV_HEADS, KV_HEADS, HEADS))
    key_padding_mask = None
    if padding:
        key_padding_mask = torch.rand(BATCH, LENGTH, generator=g) > 0.3
        key_padding_mask[0, : LENGTH // 2] = False  # batch 0: no key in the first half (under causal, rows there see none)
        key_padding_mask[1] = False  # batch 1: no key anywhere, its rows must come out as 0
    document_ids = None
    if documents:  # packed documents crossing the shard boundaries; ids ascend
        document_ids = (torch.rand(BATCH, LENGTH, generator=g) < 0.1).long().cumsum(dim=1)
    positions = torch.arange(LENGTH)
    scale = HEAD_DIM**-0.5

    torch.manual_seed(1)  # mqsp_attention draws its dropout seed from torch's generator on rank 0
    keep = keep_mask(draw_seed(), HEADS, BATCH, positions, positions, dropout_p) if dropout_p > 0 else None
    torch.manual_seed(1)

    expected_q, expected_k, expected_v = (t.double().requires_grad_() for t in (q, k, v))
    allowed = allowed_pairs(positions, positions, causal=causal, window=window, key_padding_mask=key_padding_mask,
                            query_documents=document_ids, key_documents=document_ids)
    expected_out = dense_attention(expected_q, expected_k, expected_v, allowed, scale=scale, softcap=softcap, keep=keep,
                                   dropout_p=dropout_p)
    expected_out.backward(dout.double())
    expected = {"out": expected_out.detach(), "dq": expected_q.grad, "dk": expected_k.grad, "dv": expected_v.grad}

    def shard(t: torch.Tensor, dim: int = 2) -> torch.Tensor:
        return shard_sequence(t, dim, rank, WORLD_SIZE, layout)

    local_q, local_k, local_v = (shard(t).clone().requires_grad_() for t in (q, k, v))
    out = mqsp_attention(
        local_q, local_k, local_v, key_padding_mask=None if key_padding_mask is None else shard(key_padding_mask, 1),
        causal=causal, window=window, document_ids=None if document_ids is None else shard(document_ids, 1), softcap=softcap,
        layout=layout, scale=scale, dropout_p=dropout_p, micro_q_size=micro_q_size, backend="triton",
    )
    out.backward(shard(dout))
    actual = {"out": out, "dq": local_q.grad, "dk": local_k.grad, "dv": local_v.grad}
    return {name: relative_error(actual[name], shard(expected[name])) for name in actual}


def run_rank(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE, timeout=datetime.timedelta(seconds=60)
    )
    try:
        errors = {
            # micro_q_size 12: 3 micro-steps of 24 gathered rows, the last one ragged.
            "causal-zigzag-padding-gqa": compare(rank, "zigzag", causal=True, padding=True, dropout_p=0.0, micro_q_size=12),
            "window-documents-softcap-zigzag": compare(rank, "zigzag", causal=True, padding=False, dropout_p=0.0,
                                                       micro_q_size=10, window=(9, None), documents=True, softcap=3.0),
            "dropout-contiguous": compare(rank, "contiguous", causal=False, padding=False, dropout_p=0.2, micro_q_size=16),
        }
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(errors))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    init_file = Path(tempfile.mkdtemp(prefix="mqsp-triton-pg-")) / "rendezvous"  # must not exist yet
    mp.spawn(run_rank, args=(str(init_file), sys.argv[1]), nprocs=WORLD_SIZE, join=True)
