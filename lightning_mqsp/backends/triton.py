"""Triton backend: the fused kernels of ``lightning_mqsp.kernels``.

Score tiles stay in registers (nothing M x N is allocated), the whole visibility model is applied
inside the kernels (windows, key padding, documents, soft-capping, counter-based dropout identical
to the reference's), each program visits only the blocks its rows or keys may see, GQA indexes the
shared key/value head instead of copying it, and the backward is bitwise deterministic and adds
dK and dV into the caller's accumulators inside the kernel. Inputs may be float16, bfloat16 or
float32; results are float32. No call reads a tensor value on the host.

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
from torch._subclasses.fake_tensor import FakeTensor

from lightning_mqsp.merge import Partial
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


def _int64(values: Tensor, device: torch.device) -> Tensor:
    return values.to(device=device, dtype=torch.int64).contiguous()


def _op_visibility(visibility: Visibility, device: torch.device) -> tuple[object, ...]:
    """The custom ops' visibility arguments (see ``kernels.ops``): -1 for an unbounded window side, 0.0 for no softcap."""
    padding = visibility.key_padding_mask
    documents = [None if ids is None else _int64(ids, device) for ids in (visibility.query_documents, visibility.key_documents)]
    window = visibility.window
    return (
        _int64(visibility.query_positions, device), _int64(visibility.key_positions, device),
        None if padding is None else padding.to(device=device, dtype=torch.bool),
        *documents, visibility.dropout_seed if visibility.dropout_p > 0.0 else None, visibility.query_segments,
        -1 if window.left is None else window.left, -1 if window.right is None else window.right,
        0.0 if visibility.softcap is None else float(visibility.softcap), float(visibility.dropout_p),
    )


def triton_input_error(x: Tensor) -> str | None:
    """Why Triton kernels cannot run on ``x`` here (not installed, a device or interpreter mismatch, a dtype other
    than float16, bfloat16 or float32), or None. Shared by this backend and the fused loss (``lightning_mqsp.loss``)."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    # Under FakeTensorMode (memory estimates) the custom ops' fake implementations give the shapes; nothing runs.
    fake = isinstance(x, FakeTensor)
    if x.device.type == "cpu" and not fake:
        if not _interpreting():
            if os.environ.get("TRITON_INTERPRET") == "1":
                return "TRITON_INTERPRET=1 was set after triton was imported: set it before Python starts"
            return "set TRITON_INTERPRET=1 to run the Triton kernels on CPU through the interpreter"
    elif x.device.type not in ("cuda", "cpu"):
        return f"it runs on CUDA tensors (or CPU tensors through the Triton interpreter), got {x.device.type}"
    elif x.device.type == "cuda" and _interpreting():
        return "TRITON_INTERPRET=1 is set: the kernels run in the interpreter, which takes CPU tensors only"
    if x.dtype not in _SUPPORTED_DTYPES:
        return f"it supports float16, bfloat16 and float32 inputs, got {x.dtype}"
    return None


class TritonBackend:
    name = "triton"
    reads_rows_in_place = True

    def supports(self, q: Tensor, visibility: Visibility) -> str | None:
        error = triton_input_error(q)
        if error is not None:
            return error
        if q.size(-1) > _MAX_HEAD_DIM:
            return f"head dimension {q.size(-1)} exceeds {_MAX_HEAD_DIM}"
        if not 0.0 <= visibility.dropout_p < 1.0:
            return f"dropout_p must lie in [0, 1), got {visibility.dropout_p}"
        return None

    def forward(self, q: Tensor, k: Tensor, v: Tensor, visibility: Visibility, scale: float, into: Partial | None = None) -> Partial:
        from lightning_mqsp.kernels import ops  # imports triton: only now that the kernels are needed

        if into is None:
            statistics = q.new_empty(q.shape[:-1], dtype=torch.float32)
            into = Partial(q.new_empty(q.shape, dtype=torch.float32), statistics, torch.empty_like(statistics))
        ops.partial_attention_forward(
            _segments(q, q), k.to(q.dtype), v.to(q.dtype), *(_segments(t, q) for t in into), *_op_visibility(visibility, q.device),
            float(scale),
        )
        return into

    def backward(
        self, q: Tensor, k: Tensor, v: Tensor, dout: Tensor, row_max: Tensor, row_log_sum: Tensor, delta: Tensor,
        visibility: Visibility, scale: float, grad_key: Tensor, grad_value: Tensor, grad_query: Tensor | None = None,
    ) -> Tensor:
        from lightning_mqsp.kernels import ops

        if grad_query is None:  # segments: sequence-major ([n, B, c, H, D] in memory), the layout dQ travels in
            grad_query = q.new_empty(q.shape, dtype=torch.float32) if q.dim() == 4 else \
                q.new_empty((*q.shape[:2], q.size(3), q.size(2), q.size(4)), dtype=torch.float32).transpose(2, 3)
        ops.partial_attention_backward(
            _segments(q, q), k.to(q.dtype), v.to(q.dtype), _segments(dout.to(q.dtype), q),
            *_same_strides(*(_segments(t, q) for t in (row_max, row_log_sum, delta))), _segments(grad_query, q), grad_key, grad_value,
            *_op_visibility(visibility, q.device), float(scale),
        )
        return grad_query

    def merge(self, parts: Tensor, out: Tensor, row_max: Tensor, row_log_sum: Tensor, rows_may_be_empty: bool = True) -> None:
        from lightning_mqsp.kernels import ops

        ops.merge_partials(parts, out, *_same_strides(row_max, row_log_sum))


def _segments(x: Tensor, q: Tensor) -> Tensor:
    """The kernels' view of rows or row statistics: segments as they are, those of a 4-D q [B, H, M, D] as one segment."""
    return x.unsqueeze(0) if q.dim() == 4 else x


def _same_strides(*statistics: Tensor) -> tuple[Tensor, ...]:
    """Row statistics with one set of strides, as the kernels read them (contiguous copies when the caller's differ)."""
    from lightning_mqsp.kernels.arguments import same_strides

    return statistics if same_strides(*statistics) else tuple(t.contiguous() for t in statistics)
