"""Triton backend: the fused micro-Q kernels of ``lightning_mqsp.kernels``.

Score tiles stay in registers (nothing M x N is allocated), every mask MQSP needs is applied
inside the kernels (global-position causal, key padding, counter-based dropout identical to the
reference's), GQA indexes the shared key/value head instead of copying it, and the backward is
bitwise deterministic. Inputs may be float16, bfloat16 or float32; results are float32.

It runs CUDA tensors, and CPU tensors through the Triton interpreter when ``TRITON_INTERPRET=1``
was set before triton was first imported (slow: for tests). triton is imported only when
the kernels are first used, so this module imports fine without it.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import torch
from torch import Tensor

from lightning_mqsp.merge import Partial, log_sum_exp
from lightning_mqsp.visibility import Visibility

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Each program keeps [BLOCK, D] tiles on chip, so D is bounded; the tests cover D in {32, 48, 64, 128}.
_MAX_HEAD_DIM = 256


def _interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter. triton.jit reads TRITON_INTERPRET when it
    decorates a function, triton's own library included, so once triton is imported (importing
    lightning imports it, through torch._dynamo) the decision is made: ask it, not the environment."""
    triton = sys.modules.get("triton")
    if triton is None:
        return os.environ.get("TRITON_INTERPRET") == "1"
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(triton.language.standard.max, InterpretedFunction)


def _positions(positions: Tensor, device: torch.device) -> Tensor:
    return positions.to(device=device, dtype=torch.int64).contiguous()


def _padding(mask: Visibility, device: torch.device) -> Tensor | None:
    if mask.key_padding_mask is None:
        return None
    return mask.key_padding_mask.to(device=device, dtype=torch.bool).contiguous()


class TritonBackend:
    name = "triton"

    def supports(self, q: Tensor, mask: Visibility) -> str | None:
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed"
        if q.device.type == "cpu":
            if not _interpreting():
                if os.environ.get("TRITON_INTERPRET") == "1":
                    return "TRITON_INTERPRET=1 was set after triton was imported: set it before Python starts"
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
        if not (mask.window.is_full or mask.window.is_causal) or mask.has_documents or mask.softcap is not None:
            return "sliding windows, documents and soft-capping are not in the Triton kernels yet"
        return None

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Visibility, scale: float) -> Partial:
        from lightning_mqsp.kernels import ops  # imports triton: only now that the kernels are needed

        out, lse = ops.micro_q_attention_forward(
            q, k.to(q.dtype), v.to(q.dtype),
            _positions(mask.query_positions, q.device), _positions(mask.key_positions, q.device),
            _padding(mask, q.device), mask.window.is_causal, float(scale), float(mask.dropout_p), _seed(mask),
        )
        return Partial(out, lse, torch.zeros_like(lse))

    def backward(
        self, q: Tensor, k: Tensor, v: Tensor, dout: Tensor, row_max: Tensor, row_log_sum: Tensor, delta: Tensor,
        mask: Visibility, scale: float, grad_key: Tensor, grad_value: Tensor,
    ) -> Tensor:
        from lightning_mqsp.kernels import ops

        dq, dk, dv = ops.micro_q_attention_backward(
            q, k.to(q.dtype), v.to(q.dtype), dout.to(q.dtype), log_sum_exp(row_max, row_log_sum), delta,
            _positions(mask.query_positions, q.device), _positions(mask.key_positions, q.device),
            _padding(mask, q.device), mask.window.is_causal, float(scale), float(mask.dropout_p), _seed(mask),
        )
        grad_key.add_(dk)
        grad_value.add_(dv)
        return dq


def _seed(mask: Visibility) -> int:
    return 0 if mask.dropout_seed is None else int(mask.dropout_seed.item())
