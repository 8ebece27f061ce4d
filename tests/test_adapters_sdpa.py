"""Plain PyTorch models: SDPA calls routed to MQSP (exact on 2 gloo ranks), masks, refusals, the audit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_mqsp.adapters import (
    AttentionAudit,
    SequenceParallelContext,
    activate,
    reject_unroutable_modules,
    sequence_parallel_attention,
)
from lightning_mqsp.adapters.sdpa import RouteScaledDotProductAttention


class SelfAttention(nn.Module):
    """An ordinary attention block that knows nothing about MQSP."""

    def __init__(self, dim: int = 16, heads: int = 2, causal: bool = False) -> None:
        super().__init__()
        self.qkv, self.heads, self.causal = nn.Linear(dim, 3 * dim), heads, causal
        self.single_process = False  # the reference run on the full sequence

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn_mask = None if key_mask is None else key_mask[:, None, None, :]
        is_causal = self.causal
        if is_causal and attn_mask is not None and self.single_process:
            # torch 2.14's own SDPA refuses an attn_mask with is_causal=True (the routed call takes both): fold them.
            attn_mask, is_causal = attn_mask & torch.ones(s, s, dtype=torch.bool).tril(), False
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal).transpose(1, 2).reshape(b, s, d)


class ManualSoftmaxAttention(SelfAttention):
    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        return ((q @ k.transpose(-1, -2)).softmax(-1) @ v).transpose(1, 2).reshape(b, s, d)


class CustomAttention(SelfAttention):
    """A user's own module, made sequence-parallel by calling ``sequence_parallel_attention``."""

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        return sequence_parallel_attention(q, k, v, causal=self.causal).transpose(1, 2).reshape(b, s, d)


class CheckpointedAttention(SelfAttention):
    """The same block under torch.utils.checkpoint: its SDPA call runs again during backward."""

    reentrant = False

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        return torch.utils.checkpoint.checkpoint(super().forward, x, key_mask, use_reentrant=self.reentrant)


class ReentrantCheckpointedAttention(CheckpointedAttention):
    reentrant = True


def _routed_on_rank(causal: bool, layout: str, checkpointed: str = "") -> float:
    import torch.distributed as dist

    from lightning_mqsp import shard_sequence

    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    blocks = {"": SelfAttention, "reentrant": ReentrantCheckpointedAttention, "non-reentrant": CheckpointedAttention}
    block = blocks[checkpointed](causal=causal)
    x = torch.randn(2, 16, 16, requires_grad=True)
    key_mask = torch.rand(2, 16, generator=torch.Generator().manual_seed(1)) > 0.3
    block.single_process = True
    expected = block(x, key_mask)
    expected.square().sum().backward()  # the checkpointed blocks' recompute too
    block.single_process = False
    expected_grad = block.qkv.weight.grad.clone()
    block.zero_grad()
    context = SequenceParallelContext(group=None, rank=rank, world_size=world, layout=layout)
    with RouteScaledDotProductAttention(context):  # as MQSPStrategy routes the step and its backward
        local_x = shard_sequence(x.detach(), 1, rank, world, layout).requires_grad_()  # reentrant checkpointing needs it
        local = block(local_x, shard_sequence(key_mask, 1, rank, world, layout))
        local.square().sum().backward()
    dist.all_reduce(block.qkv.weight.grad)  # weight gradients are summed over the group, as DDP does (up to 1/world)
    error = (local - shard_sequence(expected.detach(), 1, rank, world, layout)).abs().max().item()
    routed_calls = 2 if checkpointed else 1  # the checkpointed block runs attention again in backward
    return max(error, (block.qkv.weight.grad - expected_grad).abs().max().item(), 0 if context.attention_calls == routed_calls else 1)


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("causal", "layout", "checkpointed"), [
    (False, "contiguous", ""), (True, "zigzag", ""), (True, "zigzag", "non-reentrant"), (False, "contiguous", "reentrant"),
])
def test_sdpa_routed_exactly_over_two_ranks(workers, causal: bool, layout: str, checkpointed: str) -> None:
    assert max(workers(2).run(_routed_on_rank, causal, layout, checkpointed)) < 1e-5  # fp32 (MQSP merges in fp32)


def test_square_mask_cannot_be_split() -> None:
    q = torch.randn(1, 2, 4, 8)
    with RouteScaledDotProductAttention(SequenceParallelContext(layout="zigzag")), pytest.raises(ValueError, match="key-padding mask"):
        F.scaled_dot_product_attention(q, q, q, attn_mask=torch.ones(4, 4, dtype=torch.bool))


def test_additive_key_mask_is_accepted() -> None:
    q = torch.randn(1, 2, 4, 8)
    additive = torch.tensor([0.0, 0.0, float("-inf"), 0.0]).view(1, 1, 1, 4)
    expected = F.scaled_dot_product_attention(q, q, q, attn_mask=additive)
    with RouteScaledDotProductAttention(SequenceParallelContext(layout="zigzag")):
        actual = F.scaled_dot_product_attention(q, q, q, attn_mask=additive)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def test_multihead_attention_is_refused_at_setup() -> None:
    with pytest.raises(ValueError, match=r"`layer.self_attn` \(MultiheadAttention\).*scaled_dot_product_attention"):
        reject_unroutable_modules(_wrap(nn.TransformerEncoderLayer(16, 2)))


def _wrap(layer: nn.Module) -> nn.Module:
    model = nn.Module()
    model.layer = layer
    return model


def run_audited(model: nn.Module) -> SequenceParallelContext:
    context = SequenceParallelContext(layout="zigzag")
    with activate(context), RouteScaledDotProductAttention(context), AttentionAudit(model).audit(context, "training_step"):
        model(torch.randn(1, 8, 16))
    return context


def test_audit_fails_on_attention_that_bypasses_mqsp() -> None:
    model = nn.Sequential(SelfAttention(), ManualSoftmaxAttention())
    with pytest.raises(RuntimeError, match=r"without routing their attention through MQSP.*\['1'\]"):
        run_audited(model)


def test_audit_fails_when_nothing_was_routed() -> None:
    with pytest.raises(RuntimeError, match="no attention call went through MQSP"):
        run_audited(nn.Linear(16, 16))


def test_audit_accepts_sdpa_and_custom_modules() -> None:
    assert run_audited(nn.Sequential(SelfAttention(), CustomAttention(causal=True))).attention_calls == 2
