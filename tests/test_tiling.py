"""Tiled MLPs and normalisation layers: the same outputs and gradients as the untiled modules, with a smaller peak."""

from __future__ import annotations

import torch
from reference import relative_error
from torch.distributed._tools.mem_tracker import MemTracker
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaMLP, LlamaRMSNorm

from lightning_mqsp.tiling import tile_sequence, tile_token_wise


def _mlp() -> LlamaMLP:
    torch.manual_seed(0)
    return LlamaMLP(LlamaConfig(hidden_size=32, intermediate_size=256))


def _forward_backward(mlp: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    mlp.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    out = mlp(x)
    out.square().sum().backward()
    return out.detach(), x.grad, {n: p.grad.clone() for n, p in mlp.named_parameters()}


def test_tiled_mlp_computes_the_same_function() -> None:
    x = torch.randn(2, 37, 32, generator=torch.Generator().manual_seed(1))  # 37 tokens: 5 tiles, the last ragged
    expected = _forward_backward(_mlp(), x)
    tiled = _mlp()
    undo = tile_sequence(tiled, 8)
    actual = _forward_backward(tiled, x)
    # Float rounding only: a product over fewer rows may be blocked (and rounded) differently; weight gradients add the tiles.
    assert relative_error(actual[0], expected[0]) <= 1e-6 and relative_error(actual[1], expected[1]) <= 1e-6
    for name, grad in expected[2].items():
        assert relative_error(actual[2][name], grad) <= 1e-6, name
    undo()
    assert torch.equal(_forward_backward(tiled, x)[0], expected[0])


def test_tiles_keep_one_intermediate_at_a_time() -> None:
    def peak(tile_size: int | None) -> int:
        mlp = _mlp()
        if tile_size is not None:
            assert len(tile_token_wise(mlp, tile_size)) == 1
        x = torch.randn(1, 2048, 32, requires_grad=True)
        tracker = MemTracker()
        tracker.track_external(mlp, x)
        with tracker:
            mlp(x).sum().backward()
        return tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]

    intermediate = 2048 * 256 * 4  # one [tokens, intermediate] float32 tensor; the untiled MLP keeps three
    assert peak(None) - peak(256) >= 2 * intermediate, (peak(None), peak(256))


def test_tiles_every_mlp_and_norm_of_a_layer() -> None:
    layer = LlamaDecoderLayer(LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4), layer_idx=0)
    tiled = {type(m).__name__ for m in layer.modules() if m.forward.__qualname__.endswith("tile_sequence.<locals>.forward")}
    assert not tiled
    assert len(tile_token_wise(layer, 8)) == 3  # the MLP and both RMSNorms
    tiled = [type(m).__name__ for m in layer.modules() if m.forward.__qualname__.endswith("tile_sequence.<locals>.forward")]
    assert sorted(tiled) == ["LlamaMLP", "LlamaRMSNorm", "LlamaRMSNorm"]


def test_a_tiled_bf16_rmsnorm_computes_the_same_function_and_keeps_no_float32_copy() -> None:
    """Llama's RMSNorm upcasts bf16 input to float32 and keeps float32 copies for backward; tiled, only a tile's."""
    norm = LlamaRMSNorm(32).to(torch.bfloat16)
    norm.weight.data.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(2))
    x = torch.randn(2, 37, 32, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    expected = _forward_backward(norm, x)
    undo = tile_sequence(norm, 8)
    actual = _forward_backward(norm, x)
    assert torch.equal(actual[0], expected[0]) and torch.equal(actual[1], expected[1])  # token-wise: the same bits
    assert relative_error(actual[2]["weight"].float(), expected[2]["weight"].float()) <= 1e-2  # bf16 sums over tiles
    undo()

    def peak(tile_size: int | None) -> int:
        tiled = LlamaRMSNorm(32).to(torch.bfloat16)
        if tile_size is not None:
            tile_sequence(tiled, tile_size)
        h = torch.randn(1, 4096, 32).to(torch.bfloat16).requires_grad_()
        tracker = MemTracker()
        tracker.track_external(tiled, h)
        with tracker:
            tiled(h).float().sum().backward()
        return tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]

    float32_copy = 4096 * 32 * 4
    assert peak(None) - peak(256) >= 2 * float32_copy, (peak(None), peak(256))
