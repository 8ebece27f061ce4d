"""Offload the activation checkpoints of only the first layers (``offload_activation_layers`` of the strategies).

``offload_activations`` alone moves everything the forward saves for backward into host memory: with activation
checkpointing, every decoder layer's input hidden states. Where the device has room for some of them, keeping those
there spares host memory (a node's host memory is a budget too: ``docs/scaling.md``) and PCIe traffic. The first
``count`` layers offload theirs; the others, and what is saved after the last layer (the final norm, the loss) unless
every layer offloads, stay on the device. The first layers are the ones offloaded because their checkpoints live longest (from early in the
forward to the end of backward) and are read back last, so their copies have the most time to land; the device's peak
(the start of backward, when every kept checkpoint is alive) is the same whichever layers stay.

Which layer a saved tensor belongs to is told by forward hooks on the decoder layers: a layer's own saves happen
between its pre- and post-hook, and a checkpointed layer's input is saved by ``torch.utils.checkpoint`` before its
pre-hook, after the previous layer's post-hook; so a post-hook hands over to the next layer and a pre-hook claims
the saves for its own. Saves before the first layer (the embeddings) count as the first layer's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from torch import nn

from lightning_mqsp import offload

#: ``offload_activation_layers``: a number of layers, or a fraction of them (None: all of them).
OffloadLayers = int | float | None


def check_offload_layers(option: OffloadLayers, offload_activations: bool) -> None:
    """Reject a bad ``offload_activation_layers`` at construction, before the model's depth is known."""
    if option is None:
        return
    if not offload_activations:
        raise ValueError(f"offload_activation_layers={option!r} chooses which layers offload their checkpoints, and needs "
                         "offload_activations=True: set it, or leave offload_activation_layers=None.")
    if isinstance(option, bool) or not isinstance(option, int | float):
        raise ValueError(f"offload_activation_layers must be a number of layers (int >= 0) or a fraction of them "
                         f"(float in (0, 1]), got {option!r}.")
    if isinstance(option, int) and option < 0:
        raise ValueError(f"offload_activation_layers must be >= 0 layers, got {option}: use 0 to keep every checkpoint "
                         "on the device.")
    if isinstance(option, float) and not 0 < option <= 1:
        raise ValueError(f"offload_activation_layers as a fraction of the layers must lie in (0, 1], got {option}: "
                         "give a number of layers as an int.")


def offloaded_layer_count(option: OffloadLayers, depth: int) -> int:
    """How many of ``depth`` layers offload: all for None, the number itself, or a fraction of them rounded up."""
    if option is None:
        return depth
    if isinstance(option, float):
        return math.ceil(option * depth)
    if option > depth:
        raise ValueError(f"offload_activation_layers={option}, but the model has {depth} decoder layers: give at most "
                         f"{depth} (or a fraction, e.g. 0.5).")
    return option


class LayerOffload:
    """Saved-tensor hooks that offload what the forward saves while one of the first ``count`` of ``layers`` runs."""

    def __init__(self, layers: Sequence[nn.Module], count: int) -> None:
        self.layers, self.count = list(layers), count
        self._layer = 0  # the layer the next saved tensor belongs to

    @property
    def offloading(self) -> bool:
        """Whether a tensor saved now goes to host memory: in the first ``count`` layers, and after the last one only
        when every layer offloads (then it is ``offload_activations`` alone)."""
        return self._layer < self.count or self.count == len(self.layers)

    def attach(self) -> Callable[[], None]:
        """Register the layers' hooks; returns what removes them."""
        handles = []
        for index, layer in enumerate(self.layers):
            handles.append(layer.register_forward_pre_hook(lambda *_, index=index: self._enter(index)))
            handles.append(layer.register_forward_hook(lambda *_, index=index: self._enter(index + 1)))

        def remove() -> None:
            for handle in handles:
                handle.remove()

        return remove

    def _enter(self, layer: int) -> None:
        self._layer = layer

    @contextmanager
    def saved_tensors(self, prefetch: bool = True) -> Iterator[None]:
        """Around a training step's forward: offload the first layers' saves through :mod:`lightning_mqsp.offload`
        (``prefetch``: see :func:`~lightning_mqsp.offload.offloaded_saved_tensors`)."""

        self._layer = 0  # backward's recomputation ran the layers' hooks again
        with offload.offloaded_saved_tensors(lambda: self.offloading, prefetch):
            yield


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of a Hugging Face model (its ``_no_split_modules`` classes, as FSDP shards them), in order;
    also once sharded (FSDP2 makes each layer's class a subclass of its own)."""
    classes = set(getattr(model, "_no_split_modules", None) or ())
    return [m for m in model.modules() if any(c.__name__ in classes for c in type(m).__mro__)]


def layer_offload(models: Sequence[Any], option: OffloadLayers) -> LayerOffload:
    """A :class:`LayerOffload` over the decoder layers of ``models`` (Hugging Face models), ``option`` resolved."""
    layers = [layer for model in models for layer in decoder_layers(model)]
    if not layers:
        raise ValueError("offload_activation_layers needs Hugging Face decoder layers (their `_no_split_modules` classes) "
                         "and the module has none: leave it None to offload every checkpoint.")
    return LayerOffload(layers, offloaded_layer_count(option, len(layers)))
