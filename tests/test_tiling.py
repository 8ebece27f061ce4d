"""Tiled MLPs: the same outputs and gradients as the untiled module, with a smaller peak."""

from __future__ import annotations

import torch
from reference import relative_error
from torch.distributed._tools.mem_tracker import MemTracker
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

from lightning_mqsp.tiling import tile_mlps, tile_sequence


def _mlp() -> LlamaMLP:
    torch.manual_seed(0)
    return LlamaMLP(LlamaConfig(hidden_size=32, intermediate_size=256))


def _forward_backward(mlp: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
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
            assert len(tile_mlps(mlp, tile_size)) == 1
        x = torch.randn(1, 2048, 32, requires_grad=True)
        tracker = MemTracker()
        tracker.track_external(mlp, x)
        with tracker:
            mlp(x).sum().backward()
        return tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]

    intermediate = 2048 * 256 * 4  # one [tokens, intermediate] float32 tensor; the untiled MLP keeps three
    assert peak(None) - peak(256) >= 2 * intermediate, (peak(None), peak(256))
