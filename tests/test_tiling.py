"""Tiled MLPs and normalisation layers: the same outputs and gradients as the untiled modules, with a smaller peak."""

from __future__ import annotations

import importlib

import pytest
import torch
from hf_families import FAMILIES, VOCAB
from reference import relative_error
from torch.distributed._tools.mem_tracker import MemTracker
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaMLP, LlamaRMSNorm

from lightning_mqsp.tiling import NORMS_FEED_PROJECTIONS, norms_feed_only_projections, tile_sequence, tile_token_wise


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


def _tiled_forwards(module: torch.nn.Module) -> list[str]:
    return sorted(type(m).__name__ for m in module.modules() if m.forward.__qualname__.endswith("_tiled.<locals>.forward"))


def test_tiles_every_mlp_and_norm_and_fuses_a_decoder_layers_norms_into_what_they_feed() -> None:
    """A Llama decoder layer: each norm passes its input through and the modules it feeds (the query, key and value
    projections; the MLP) normalise their tiles; any other MLP or norm is tiled on its own."""
    layer = LlamaDecoderLayer(LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4), layer_idx=0)
    assert not _tiled_forwards(layer)
    assert len(tile_token_wise(layer, 8)) == 2  # the two fused norms
    assert _tiled_forwards(layer) == ["Linear", "Linear", "Linear", "LlamaMLP"]
    x = torch.randn(1, 8, 32)
    assert torch.equal(layer.input_layernorm(x), x) and torch.equal(layer.post_attention_layernorm(x), x)
    other = LlamaMLP(LlamaConfig(hidden_size=32, intermediate_size=64))
    norm = LlamaRMSNorm(32)
    assert len(tile_token_wise(torch.nn.ModuleList([other, norm]), 8)) == 2
    assert _tiled_forwards(torch.nn.ModuleList([other, norm])) == ["LlamaMLP", "LlamaRMSNorm"]


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_fused_decoder_layers_compute_the_same_function(family: str) -> None:
    """The whole model, its norms fused into what they feed and tiled, against itself untiled: logits, the input
    embeddings' gradient and every parameter's (the norms' weights now get theirs through each tile)."""
    model = FAMILIES[family].build()
    ids = torch.randint(3, VOCAB, (2, 37), generator=torch.Generator().manual_seed(1))  # 37 tokens: 5 tiles, the last ragged

    def run() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=ids).logits
        logits.square().mean().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    expected = run()
    undos = tile_token_wise(model, 8)
    tiled, layers = _tiled_forwards(model), model.config.num_hidden_layers
    assert tiled.count("Linear") == 3 * layers and sum(name.endswith("MLP") for name in tiled) == layers  # q, k, v, MLP
    actual = run()
    assert relative_error(actual[0], expected[0]) <= 1e-6
    for name, grad in expected[1].items():
        assert relative_error(actual[1][name], grad) <= 1e-5, name
    for undo in undos:
        undo()
    assert torch.equal(run()[0], expected[0])


@pytest.mark.parametrize("name", NORMS_FEED_PROJECTIONS)
def test_the_fused_layers_norms_feed_only_what_they_are_fused_into(name: str) -> None:
    """The fusion rests on each layer's source: the first norm's output goes to the attention alone, which uses it for
    its query, key and value projections alone; the second norm's output goes to the MLP alone. The installed
    transformers' layers pass the check that tile_token_wise makes; a layer that also reads a norm's output elsewhere
    fails it, and is then tiled apart, with a warning."""
    family = name.removesuffix("DecoderLayer").lower()
    modeling = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    layer_class, attention_class = getattr(modeling, name), getattr(modeling, name.replace("DecoderLayer", "Attention"))
    assert norms_feed_only_projections(layer_class, attention_class)

    class ReadsTheNormAgain(layer_class):  # type: ignore[misc, valid-type]
        def forward(self, hidden_states, **kwargs):  # type: ignore[no-untyped-def]
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
            # Self Attention
            hidden_states, _ = self.self_attn(hidden_states=hidden_states, **kwargs)
            hidden_states = residual + hidden_states
            residual = hidden_states
            hidden_states = self.post_attention_layernorm(hidden_states)
            hidden_states = self.mlp(hidden_states) + 0.1 * hidden_states
            return residual + hidden_states

    assert not norms_feed_only_projections(ReadsTheNormAgain, attention_class)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)
    if name == "LlamaDecoderLayer":
        layer = type("ReadsTheNormAgain", (ReadsTheNormAgain,), {})(config, layer_idx=0)
        with pytest.warns(UserWarning, match="tiled apart, not fused"):
            undos = tile_token_wise(layer, 8)
        assert len(undos) == 3 and _tiled_forwards(layer) == ["LlamaMLP", "LlamaRMSNorm", "LlamaRMSNorm"]


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
