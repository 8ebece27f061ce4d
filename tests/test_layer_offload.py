"""Offloading only the first layers' activation checkpoints (lightning_mqsp/layer_offload.py), on the CPU: the
gradients are the same as without offload, only the chosen layers' inputs go through the copy engine, and bad values
are refused with the fix named."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_mqsp import MQSPFSDPStrategy, MQSPStrategy, offload
from lightning_mqsp.adapters.huggingface import enable_activation_checkpointing
from lightning_mqsp.layer_offload import check_offload_layers, decoder_layers, layer_offload, offloaded_layer_count

LAYERS = 4


class _RecordingEngine(offload.CopyEngine):
    """Copies every floating-point tensor (the CPU stands in for the device) and records the storages it copied."""

    def __init__(self) -> None:
        super().__init__()
        self.copied: list[int] = []
        self._sources: list[Tensor] = []  # kept alive, so that no later tensor reuses a recorded storage's address

    def needs_copy(self, x: Tensor) -> bool:
        return x.is_floating_point()

    def start(self, x: Tensor) -> tuple[Tensor, None]:
        self.copied.append(x.untyped_storage().data_ptr())
        self._sources.append(x)
        return x.detach().clone(), None


def _model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).train()
    enable_activation_checkpointing(model)
    return model


def _step(model: LlamaForCausalLM, offloaded: int | None) -> tuple[dict[str, Tensor], list[int], list[int]]:
    """Gradients of one step with ``offloaded`` layers offloading (None: no offload), the storages the engine copied,
    and each layer's input hidden states' storage (seen by a hook of the test's own)."""
    inputs: list[int] = []
    hooks = [layer.register_forward_pre_hook(lambda _, args: inputs.append(args[0].untyped_storage().data_ptr()))
             for layer in decoder_layers(model)]
    engine, saved_engine = _RecordingEngine(), offload.ENGINE
    offload.ENGINE = engine
    try:
        ids = torch.arange(24).remainder(64).unsqueeze(0)
        if offloaded is None:
            loss = model(input_ids=ids, labels=ids).loss
        else:
            selected = layer_offload([model], offloaded)
            remove = selected.attach()
            with selected.saved_tensors():
                loss = model(input_ids=ids, labels=ids).loss
            remove()
        loss.backward()
    finally:
        offload.ENGINE = saved_engine
        for hook in hooks:
            hook.remove()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return grads, engine.copied, inputs[:LAYERS]  # the forward's, not backward's recomputation


@pytest.mark.parametrize("offloaded", [0, 2, LAYERS])
def test_only_the_first_layers_checkpoints_go_to_host_and_the_gradients_do_not_change(offloaded: int) -> None:
    model = _model()
    reference, copied_without, _ = _step(model, None)
    grads, copied, layer_inputs = _step(model, offloaded)
    assert not copied_without
    for name, grad in reference.items():
        torch.testing.assert_close(grads[name], grad, rtol=0, atol=0, msg=name)
    assert [storage in copied for storage in layer_inputs] == [k < offloaded for k in range(LAYERS)]
    if offloaded == 0:
        assert not copied


def test_the_count_is_a_number_or_a_fraction_of_the_layers() -> None:
    assert offloaded_layer_count(None, 32) == 32
    assert offloaded_layer_count(20, 32) == 20
    assert offloaded_layer_count(0.5, 32) == 16
    assert offloaded_layer_count(0.3, 32) == 10  # rounded up
    with pytest.raises(ValueError, match="has 32 decoder layers: give at most 32"):
        offloaded_layer_count(33, 32)


@pytest.mark.parametrize(("value", "fix"), [
    (-1, "use 0 to keep every checkpoint"), (0.0, r"lie in \(0, 1\]"), (1.5, r"lie in \(0, 1\]"), (True, "int >= 0"),
    ("half", "int >= 0"),
])
def test_bad_values_are_refused_with_the_fix(value: object, fix: str) -> None:
    with pytest.raises(ValueError, match=fix):
        check_offload_layers(value, offload_activations=True)  # type: ignore[arg-type]


@pytest.mark.parametrize("strategy", [MQSPStrategy, MQSPFSDPStrategy])
def test_the_strategies_need_offload_activations_for_it(strategy: type) -> None:
    with pytest.raises(ValueError, match="needs offload_activations=True"):
        strategy(offload_activation_layers=4)
    assert strategy(offload_activations=True, offload_activation_layers=0.5).offload_activation_layers == 0.5


@pytest.mark.parametrize("strategy", [MQSPStrategy, MQSPFSDPStrategy])
def test_the_strategies_take_offload_prefetch_as_a_bool(strategy: type) -> None:
    assert strategy(offload_activations=True).offload_prefetch is True
    assert strategy(offload_activations=True, offload_prefetch=False).offload_prefetch is False
    with pytest.raises(ValueError, match="offload_prefetch must be True or False"):
        strategy(offload_activations=True, offload_prefetch="no")


@pytest.mark.parametrize("strategy", [MQSPStrategy, MQSPFSDPStrategy])
def test_offload_queries_follows_offload_activations_unless_given(strategy: type) -> None:
    assert strategy(offload_activations=True).sequence_parallel.offload_queries is True
    assert strategy(offload_activations=True, offload_queries=False).sequence_parallel.offload_queries is False
    assert strategy(offload_queries=True).sequence_parallel.offload_queries is True
    with pytest.raises(ValueError, match="offload_queries must be True, False or None"):
        strategy(offload_activations=True, offload_queries="no")
