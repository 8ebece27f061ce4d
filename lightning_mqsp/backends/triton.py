"""Triton backend: the fused micro-Q kernels of ``lightning_mqsp.kernels``.

Score tiles stay in registers (nothing M x N is allocated), every mask MQSP needs is applied
inside the kernels (global-position causal, key padding, counter-based dropout identical to the
reference's), GQA indexes the shared key/value head instead of copying it, and the backward is
bitwise deterministic. Inputs may be float16, bfloat16 or float32; results are float32.

It runs CUDA tensors, and CPU tensors through the Triton interpreter when ``TRITON_INTERPRET=1``
was set before the kernels were first imported (slow: for tests). triton is imported only when
the kernels are first used, so this module imports fine without it.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import torch
from torch import Tensor

from lightning_mqsp.backends import AttentionMask

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# A [BLOCK, D] tile per operand must fit in registers/shared memory; the kernels are written for D <= 256.
_MAX_HEAD_DIM = 256


def _interpreting() -> bool:
    """Whether the kernels run in the Triton interpreter. Once they are imported, their own flag
    decides (triton.jit read the variable at that moment); before, the environment does."""
    tuning = sys.modules.get("lightning_mqsp.kernels.tuning")
    if tuning is not None:
        return tuning.INTERPRET
    return os.environ.get("TRITON_INTERPRET") == "1"


def _positions(positions: Tensor, device: torch.device) -> Tensor:
    return positions.to(device=device, dtype=torch.int64).contiguous()


def _padding(mask: AttentionMask, device: torch.device) -> Tensor | None:
    if mask.key_padding_mask is None:
        return None
    return mask.key_padding_mask.to(device=device, dtype=torch.bool).contiguous()


class TritonBackend:
    name = "triton"

    def supports(self, q: Tensor, mask: AttentionMask) -> str | None:
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed"
        if q.device.type == "cpu":
            if not _interpreting():
                return "set TRITON_INTERPRET=1 to run the Triton kernels on CPU through the interpreter"
        elif q.device.type != "cuda":
            return f"it runs on CUDA tensors (or CPU tensors through the Triton interpreter), got {q.device.type}"
        elif _interpreting():
            return "TRITON_INTERPRET=1 is set: the kernels run in the interpreter, which takes CPU tensors only"
        if q.dtype not in _SUPPORTED_DTYPES:
            return f"it supports float16, bfloat16 and float32 inputs, got {q.dtype}"
        if q.size(-1) > _MAX_HEAD_DIM:
            return f"head dimension {q.size(-1)} exceeds {_MAX_HEAD_DIM}"
        if not 0.0 <= mask.dropout_p < 1.0:
            return f"dropout_p must lie in [0, 1), got {mask.dropout_p}"
        return None

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask, scale: float) -> tuple[Tensor, Tensor]:
        from lightning_mqsp.kernels import ops  # imports triton: only now that the kernels are needed

        return ops.micro_q_attention_forward(
            q, k.to(q.dtype), v.to(q.dtype),
            _positions(mask.query_positions, q.device), _positions(mask.key_positions, q.device),
            _padding(mask, q.device), mask.causal, float(scale), float(mask.dropout_p), int(mask.dropout_seed),
        )

    def backward(
        self, q: Tensor, k: Tensor, v: Tensor, dout: Tensor, lse: Tensor, delta: Tensor, mask: AttentionMask, scale: float,
    ) -> tuple[Tensor, Tensor, Tensor]:
        from lightning_mqsp.kernels import ops

        return ops.micro_q_attention_backward(
            q, k.to(q.dtype), v.to(q.dtype), dout.to(q.dtype), lse, delta,
            _positions(mask.query_positions, q.device), _positions(mask.key_positions, q.device),
            _padding(mask, q.device), mask.causal, float(scale), float(mask.dropout_p), int(mask.dropout_seed),
        )
