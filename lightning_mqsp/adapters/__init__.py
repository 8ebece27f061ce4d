"""Routing a model's attention through ``mqsp_attention`` while a sequence-parallel step runs.

:class:`~lightning_mqsp.MQSPStrategy` activates one :class:`SequenceParallelContext` per process
for the life of a fit/validate/test/predict call. Every adapter reads it:

- Hugging Face models (:mod:`lightning_mqsp.adapters.huggingface`) dispatch to the ``"mqsp"``
  attention implementation, which calls :meth:`SequenceParallelContext.attention`.
- Plain PyTorch models that call ``torch.nn.functional.scaled_dot_product_attention`` are
  routed by :class:`lightning_mqsp.adapters.sdpa.RouteScaledDotProductAttention`.
- Your own attention module: call :func:`sequence_parallel_attention` in its ``forward``
  (it has the signature of ``mqsp_attention`` minus the group and the strategy's settings).

Every routed call is counted, so a step in which an attention module ran without routing any
call (a hand-written softmax, ``nn.MultiheadAttention``, a custom kernel) is caught on the
first step by :class:`AttentionAudit` instead of silently training on local attention.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_mqsp.attention import mqsp_attention
from lightning_mqsp.comm import ProcessGroup
from lightning_mqsp.layout import Layout, global_positions


@dataclass
class SequenceParallelContext:
    """The sequence-parallel settings and state that travel from the strategy to every attention call.

    The strategy builds it from its arguments (``layout``, ``micro_q_size``, ``backend``, ``head_groups``,
    ``offload_queries``) and fills in the group at setup; adapters read it, and nothing else carries these settings.
    """

    layout: Layout = "zigzag"
    micro_q_size: int | None = None
    backend: str = "auto"
    head_groups: int = 1
    offload_queries: bool = False
    group: ProcessGroup | None = None
    rank: int = 0
    world_size: int = 1
    #: Whether the strategy shifted causal-LM labels before sharding (read by ``causal_lm_cross_entropy``).
    labels_shifted: bool = False
    #: The current batch: its full length before padding, and this rank's shard [B, l] of its packed
    #: documents' ids (None: one document per sequence). Set by the strategy for every batch.
    full_length: int | None = None
    document_ids: Tensor | None = None
    #: Attention calls routed through MQSP since activation; read by :class:`AttentionAudit`.
    attention_calls: int = 0

    def attention(
        self, query: Tensor, key: Tensor, value: Tensor, *, key_padding_mask: Tensor | None = None,
        causal: bool = False, window: tuple[int | None, int | None] | None = None, document_ids: Tensor | None = None,
        softcap: float | None = None, scale: float | None = None, dropout_p: float = 0.0,
    ) -> Tensor:
        """``mqsp_attention`` over this context's group, [B, H, S_local, D] in and out."""
        self.attention_calls += 1
        return mqsp_attention(
            query, key, value, group=self.group, key_padding_mask=key_padding_mask, causal=causal, window=window,
            document_ids=document_ids, softcap=softcap, layout=self.layout, scale=scale, dropout_p=dropout_p,
            micro_q_size=self.micro_q_size, backend=self.backend, head_groups=self.head_groups, offload_queries=self.offload_queries,
        )

    def positions(self, local_length: int, device: torch.device | str = "cpu") -> Tensor:
        """Global positions (int64 [local_length]) of the tokens this rank holds."""
        return global_positions(local_length, self.rank, self.world_size, self.layout, device)


_active: SequenceParallelContext | None = None


def active_context() -> SequenceParallelContext | None:
    """The context of the running MQSP strategy in this process, or None outside one."""
    return _active


def require_context() -> SequenceParallelContext:
    if _active is None:
        raise RuntimeError(
            "No sequence-parallel context is active: MQSP attention only runs under "
            "`Trainer(strategy='mqsp')` (or inside `lightning_mqsp.adapters.activate(...)`). To run the model "
            "on its own, switch it back first, e.g. `model.set_attn_implementation('sdpa')` for a Hugging Face model."
        )
    return _active


@contextmanager
def activate(context: SequenceParallelContext) -> Iterator[SequenceParallelContext]:
    """Make ``context`` the active one inside the ``with`` block."""
    global _active
    previous, _active = _active, context
    try:
        yield context
    finally:
        _active = previous


def sequence_parallel_attention(
    query: Tensor, key: Tensor, value: Tensor, *, key_padding_mask: Tensor | None = None, causal: bool = False,
    window: tuple[int | None, int | None] | None = None, document_ids: Tensor | None = None, softcap: float | None = None,
    scale: float | None = None, dropout_p: float = 0.0,
) -> Tensor:
    """Exact attention over the whole sequence from this rank's shard, for your own attention module.

    Call it in place of your softmax attention; query [B, H, S_local, D], key/value
    [B, H_kv, S_local, D], ``key_padding_mask`` [B, S_local] bool (True = attend), ``window``,
    ``document_ids`` and ``softcap`` as in :func:`~lightning_mqsp.mqsp_attention`. Group, layout,
    micro-Q size and backend come from the strategy. Pass ``dropout_p`` only in training mode.
    """
    return require_context().attention(
        query, key, value, key_padding_mask=key_padding_mask, causal=causal, window=window, document_ids=document_ids,
        softcap=softcap, scale=scale, dropout_p=dropout_p,
    )


_ATTENTION_NAME = re.compile("attention", re.IGNORECASE)


def _is_attention_module(module: nn.Module) -> bool:
    return bool(_ATTENTION_NAME.search(type(module).__name__))


class AttentionAudit:
    """Checks, on the first step of a stage, that every attention module routed its attention.

    An *attention module* is one whose class name contains "Attention" and none of whose children's
    does (so ``BertSelfAttention``, not the ``BertAttention`` around it). Each must issue at least
    one routed call during its forward, and a step must route at least one call overall.
    """

    def __init__(self, model: nn.Module) -> None:
        self._modules = {
            name: module for name, module in model.named_modules()
            if _is_attention_module(module) and not any(_is_attention_module(child) for child in module.modules() if child is not module)
        }
        self._unrouted: set[str] = set()

    @contextmanager
    def audit(self, context: SequenceParallelContext, step_name: str) -> Iterator[None]:
        calls_before_step = context.attention_calls
        handles = []
        for name, module in self._modules.items():
            calls_at_entry: list[int] = []
            handles.append(module.register_forward_pre_hook(lambda *_, box=calls_at_entry: box.append(context.attention_calls)))
            handles.append(module.register_forward_hook(
                lambda *_, name=name, box=calls_at_entry: self._unrouted.add(name) if context.attention_calls == box.pop() else None
            ))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
        unrouted, self._unrouted = sorted(self._unrouted), set()
        if unrouted:
            raise RuntimeError(
                f"MQSPStrategy: during the first {step_name} these attention modules ran on sequence shards without "
                f"routing their attention through MQSP, so they would attend only to local tokens: {unrouted}. "
                "Make them call `torch.nn.functional.scaled_dot_product_attention` (routed automatically) or "
                "`lightning_mqsp.adapters.sequence_parallel_attention(...)`, or use a Hugging Face model that "
                "supports `set_attn_implementation`."
            )
        if context.attention_calls == calls_before_step:
            raise RuntimeError(
                f"MQSPStrategy: the first {step_name} ran on sequence shards but no attention call went through MQSP, "
                "so the model saw only local tokens. Compute attention with "
                "`torch.nn.functional.scaled_dot_product_attention` or `lightning_mqsp.adapters.sequence_parallel_attention`, "
                "or do not use sequence parallelism for a model that mixes no tokens."
            )


def reject_unroutable_modules(model: nn.Module) -> None:
    """Fail at setup on modules whose attention can never be routed (they bypass the functional SDPA)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            raise ValueError(
                f"MQSPStrategy cannot make `{name}` ({type(module).__name__}) sequence-parallel: torch's "
                "nn.MultiheadAttention and nn.Transformer* layers compute attention internally. Replace it with a module "
                "that calls `torch.nn.functional.scaled_dot_product_attention` on [B, H, S, D] tensors, or with one that "
                "calls `lightning_mqsp.adapters.sequence_parallel_attention`."
            )


__all__ = [
    "AttentionAudit",
    "SequenceParallelContext",
    "activate",
    "active_context",
    "reject_unroutable_modules",
    "require_context",
    "sequence_parallel_attention",
]
