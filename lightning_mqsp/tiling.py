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

import inspect
import re
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


def _tiled(function: Callable[..., Tensor], tile_size: int, dim: int) -> Callable[..., Tensor]:
    """``function`` (token-wise along ``dim`` of its first argument) over tiles of ``tile_size`` tokens, each checkpointed."""

    def forward(hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if hidden_states.size(dim) <= tile_size:
            return function(hidden_states, *args, **kwargs)
        tiles = [checkpoint(function, tile, *args, use_reentrant=False, **kwargs) for tile in hidden_states.split(tile_size, dim)]
        return torch.cat(tiles, dim=dim)

    return forward


def _check_tile_size(tile_size: int) -> None:
    if not (isinstance(tile_size, int) and tile_size >= 1):
        raise ValueError(f"tile_size must be a positive int, got {tile_size!r}.")


def tile_sequence(module: nn.Module, tile_size: int, dim: int = 1) -> Callable[[], None]:
    """Run ``module`` (token-wise along ``dim`` of its first argument) over tiles of ``tile_size`` tokens; return the undo."""
    _check_tile_size(tile_size)
    untiled = module.forward
    module.forward = _tiled(untiled, tile_size, dim)

    def undo() -> None:
        module.forward = untiled

    return undo


def fuse_norm_into(norm: nn.Module, consumers: list[nn.Module], tile_size: int) -> Callable[[], None]:
    """Make ``norm`` pass its input through and each of ``consumers`` normalise its tiles itself (``consumer(norm(x))``,
    tiled); return the undo. Only for a norm whose output feeds ``consumers`` and nothing else.

    Apart, the norm's output exists for the whole shard and its consumers keep it for backward (an MLP's tiles, or the
    attention's query, key and value projections), and in a checkpointed layer's recomputation it exists again: one
    hidden state a token through the layer's backward, where the full recipe peaks. Fused, only the norm's input is
    kept, which the residual stream keeps anyway, and the norm is recomputed a tile at a time with each consumer (a
    norm is a few elementwise passes: cheap beside the matmuls it feeds)."""
    _check_tile_size(tile_size)
    norm_forward = norm.forward
    consumer_forwards = [consumer.forward for consumer in consumers]
    norm.forward = lambda hidden_states: hidden_states
    for consumer, consumer_forward in zip(consumers, consumer_forwards):
        consumer.forward = _tiled(lambda hidden_states, f=consumer_forward: f(norm_forward(hidden_states)), tile_size, dim=1)

    def undo() -> None:
        norm.forward = norm_forward
        for consumer, consumer_forward in zip(consumers, consumer_forwards):
            consumer.forward = consumer_forward

    return undo


#: Class-name endings of the token-wise modules :func:`tile_token_wise` tiles: MLPs (LlamaMLP, MistralMLP, GPT2MLP, ...)
#: and normalisation layers (LlamaRMSNorm, torch's LayerNorm, T5LayerNorm, ...), which normalise each token on its own.
TOKEN_WISE = ("MLP", "RMSNorm", "LayerNorm")
#: Decoder layers whose ``input_layernorm`` feeds the attention's query, key and value projections and nothing else, and
#: whose ``post_attention_layernorm`` feeds their ``mlp`` and nothing else: :func:`tile_token_wise` fuses each norm into
#: what it feeds (:func:`fuse_norm_into`), once :func:`norms_feed_only_projections` has found so in their source.
NORMS_FEED_PROJECTIONS = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer")


_premise_holds: dict[tuple[type[nn.Module], type[nn.Module]], bool] = {}


def norms_feed_only_projections(layer_class: type[nn.Module], attention_class: type[nn.Module]) -> bool:
    """Whether the sources of a decoder layer's ``forward`` and its attention's show the fusion's premise: the first
    norm's output goes to the attention alone, which reads it for its shape and its query, key and value projections
    alone, and the second norm's output goes to the MLP alone, whose output is added to the residual. A transformers
    release that changes either makes this False (and the fusion is then not made). Read once per pair of classes."""
    key = (layer_class, attention_class)
    if key not in _premise_holds:
        _premise_holds[key] = _premise_in_source(layer_class, attention_class)
    return _premise_holds[key]


def _premise_in_source(layer_class: type[nn.Module], attention_class: type[nn.Module]) -> bool:
    try:
        layer = inspect.getsource(layer_class.forward)
        attention = inspect.getsource(attention_class.forward)
    except (OSError, TypeError):
        return False
    first = re.search(r"hidden_states = self\.input_layernorm\(hidden_states\)\s+(#[^\n]*\s+)?hidden_states, _ = "
                      r"self\.self_attn\(\s*hidden_states=hidden_states,", layer)
    second = re.search(r"hidden_states = self\.post_attention_layernorm\(hidden_states\)\s+hidden_states = "
                       r"self\.mlp\(hidden_states\)\s+hidden_states = residual \+ hidden_states", layer)
    once = layer.count("self.input_layernorm") == layer.count("self.post_attention_layernorm") == 1
    uses = [line.strip() for line in attention.splitlines() if re.search(r"\bhidden_states\b", line)]
    reads = [use for use in uses if use not in ("hidden_states: torch.Tensor,", "input_shape = hidden_states.shape[:-1]")]
    projections_only = len(reads) == 3 and all(
        "hidden_states" not in re.sub(r"self\.[qkv]_proj\(hidden_states\)", "", use) for use in reads)
    return bool(first and second and once and projections_only)


def tile_token_wise(model: nn.Module, tile_size: int) -> list[Callable[[], None]]:
    """Tile every MLP and normalisation layer of ``model`` (class names ending with one of ``TOKEN_WISE``), each norm
    fused into what it feeds in the layers of ``NORMS_FEED_PROJECTIONS``; return the undos."""
    undos: list[Callable[[], None]] = []
    fused: set[nn.Module] = set()
    for layer in model.modules():
        if not any(cls.__name__ in NORMS_FEED_PROJECTIONS for cls in type(layer).__mro__):  # FSDP2 subclasses it
            continue
        attention = layer.get_submodule("self_attn")
        if not norms_feed_only_projections(type(layer), type(attention)):  # the forward it runs, overridden or not
            warnings.warn(f"{type(layer).__name__}'s source does not show its norms feeding only the attention's "
                          "projections and the MLP: its norms and MLP are tiled apart, not fused (one hidden state a token "
                          "more at each layer's backward)", stacklevel=2)
            continue
        first_norm, second_norm, mlp = (layer.get_submodule(name) for name in ("input_layernorm", "post_attention_layernorm", "mlp"))
        projections = [attention.get_submodule(name) for name in ("q_proj", "k_proj", "v_proj")]
        undos.append(fuse_norm_into(first_norm, projections, tile_size))
        undos.append(fuse_norm_into(second_norm, [mlp], tile_size))
        fused |= {first_norm, second_norm, mlp}
    tiled = [m for m in model.modules() if type(m).__name__.endswith(TOKEN_WISE) and m not in fused]
    return undos + [tile_sequence(module, tile_size) for module in tiled]
