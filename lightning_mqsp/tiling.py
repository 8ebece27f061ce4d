"""Token-wise modules run over the sequence in tiles, so that their wide intermediates never exist whole.

A transformer MLP maps each token on its own; at long local lengths its intermediate activations
(``l x intermediate_size``, 3.5x the hidden size in Llama, two or three of them) are the largest
tensors of a layer. Normalisation layers are token-wise too, and under bf16 they upcast: Llama's
RMSNorm keeps float32 copies of its input for backward and makes more in it, together several times
a bf16 hidden state; in a checkpointed layer's backward they were the peak of an 8B model's step
(``docs/scaling.md``). :func:`tile_sequence` makes a module run on ``tile_size`` tokens at a time,
each tile checkpointed: forward keeps only the tiles' inputs (views of the input) and the
concatenated output, backward recomputes one tile at a time. It computes the same function as the
untiled module, to float rounding (a product over fewer rows may be blocked differently, and the
weight gradient adds the tiles one by one).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


def tile_sequence(module: nn.Module, tile_size: int, dim: int = 1) -> Callable[[], None]:
    """Run ``module`` (token-wise along ``dim`` of its first argument) over tiles of ``tile_size`` tokens; return the undo."""
    if not (isinstance(tile_size, int) and tile_size >= 1):
        raise ValueError(f"tile_size must be a positive int, got {tile_size!r}.")
    untiled = module.forward

    def forward(hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if hidden_states.size(dim) <= tile_size:
            return untiled(hidden_states, *args, **kwargs)
        tiles = [checkpoint(untiled, tile, *args, use_reentrant=False, **kwargs) for tile in hidden_states.split(tile_size, dim)]
        return torch.cat(tiles, dim=dim)

    module.forward = forward

    def undo() -> None:
        module.forward = untiled

    return undo


#: Class-name endings of the token-wise modules :func:`tile_token_wise` tiles: MLPs (LlamaMLP, MistralMLP, GPT2MLP, ...)
#: and normalisation layers (LlamaRMSNorm, torch's LayerNorm, T5LayerNorm, ...), which normalise each token on its own.
TOKEN_WISE = ("MLP", "RMSNorm", "LayerNorm")


def tile_token_wise(model: nn.Module, tile_size: int) -> list[Callable[[], None]]:
    """Tile every MLP and normalisation layer of ``model`` (class names ending with one of ``TOKEN_WISE``); return the undos."""
    return [tile_sequence(module, tile_size) for module in model.modules() if type(module).__name__.endswith(TOKEN_WISE)]
