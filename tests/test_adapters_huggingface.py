"""Hugging Face adapter: registration, masks kept, state dict unchanged, setup-time refusals, position limit."""

from __future__ import annotations

import re

import pytest
import torch
from transformers import (
    AttentionInterface,
    AttentionMaskInterface,
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    BertModel,
    RobertaConfig,
    RobertaForMaskedLM,
)

from lightning_mqsp.adapters import SequenceParallelContext, activate, huggingface


def tiny_bert_config(**kwargs) -> BertConfig:
    return BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                      max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **kwargs)


def tiny_models() -> list[torch.nn.Module]:
    torch.manual_seed(0)
    roberta = RobertaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                            max_position_embeddings=80, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return [BertForMaskedLM(tiny_bert_config()), RobertaForMaskedLM(roberta)]


def one_rank() -> SequenceParallelContext:
    return SequenceParallelContext(group=None, rank=0, world_size=1, layout="zigzag")


def test_registered_in_both_interfaces() -> None:
    huggingface.register()
    assert AttentionInterface._global_mapping["mqsp"] is huggingface.mqsp_attention_forward
    assert AttentionMaskInterface._global_mapping["mqsp"] is huggingface.mqsp_mask


@pytest.mark.parametrize("index", [0, 1], ids=["bert", "roberta"])
def test_switch_keeps_state_dict_and_padding_and_undoes(index: int) -> None:
    model = tiny_models()[index].eval()
    keys = list(model.state_dict())
    ids = torch.randint(3, 50, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 7:] = 0
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
    undo = huggingface.prepare(model)
    assert model.config._attn_implementation == "mqsp" and list(model.state_dict()) == keys
    context = one_rank()
    with torch.no_grad(), activate(context):
        actual = model(input_ids=ids, attention_mask=mask).logits
    # A dropped padding mask would change row 1; one routed call per layer proves MQSP ran.
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    assert context.attention_calls == 2
    for callback in undo:
        callback()
    assert model.config._attn_implementation == "sdpa"


def test_global_length_over_the_position_table_names_the_fix() -> None:
    model = BertForMaskedLM(tiny_bert_config()).eval()
    huggingface.prepare(model)
    two_ranks = SequenceParallelContext(group=None, rank=0, world_size=2, layout="zigzag")
    with activate(two_ranks), pytest.raises(ValueError, match=r"global sequence length 80 .* exceeds the 64 learned positions .*truncate"):
        model(input_ids=torch.ones(1, 40, dtype=torch.long))


@pytest.mark.parametrize("build", [lambda: BertModel(tiny_bert_config()), lambda: BertForSequenceClassification(tiny_bert_config())],
                         ids=["pooler", "sequence_head"])
def test_pooling_models_are_refused_unless_allowed(build) -> None:
    with pytest.raises(ValueError, match=r"pools over the sequence.*allow_sequence_pooling=True"):
        huggingface.prepare(build())
    assert huggingface.prepare(build(), allow_sequence_pooling=True)


def test_model_without_attention_interface_is_refused() -> None:
    class LegacyBert(BertForMaskedLM):
        def _can_set_attn_implementation(self) -> bool:  # what transformers reports for models outside the interface
            return False

    with pytest.raises(ValueError, match="cannot swap the attention of LegacyBert"):
        huggingface.prepare(LegacyBert(tiny_bert_config()))


def test_cross_attention_is_refused() -> None:
    with pytest.raises(ValueError, match="does not support cross-attention"):
        huggingface.prepare(BertForMaskedLM(tiny_bert_config(is_decoder=True, add_cross_attention=True)))


def test_prepared_four_d_mask_is_refused() -> None:
    q = torch.randn(1, 2, 4, 8)
    with activate(one_rank()), pytest.raises(ValueError, match="2-D key-padding mask"):
        huggingface.mqsp_attention_forward(torch.nn.Module(), q, q, q, torch.ones(1, 1, 4, 4, dtype=torch.bool))


def test_outside_the_strategy_the_error_says_how_to_switch_back() -> None:
    model = BertForMaskedLM(tiny_bert_config())
    huggingface.prepare(model)
    with pytest.raises(RuntimeError, match="set_attn_implementation\\('sdpa'\\)"):
        model(input_ids=torch.ones(1, 8, dtype=torch.long))


def test_relative_position_bias_is_refused_at_setup() -> None:
    from transformers import T5Config, T5EncoderModel

    model = T5EncoderModel(T5Config(vocab_size=50, d_model=32, d_kv=8, num_layers=2, num_heads=4, d_ff=64))
    # transformers 5.0's T5 does not dispatch through AttentionInterface at all: refused by name either way.
    with pytest.raises(ValueError, match=r"relative position bias|does not dispatch through transformers' AttentionInterface"):
        huggingface.prepare(model)


class _Attention(torch.nn.Module):  # a stand-in for a transformers attention module
    is_causal = True


@pytest.mark.parametrize(("keyword", "value", "message"), [
    ("s_aux", torch.zeros(2), "attention sinks"),
    ("position_bias", torch.zeros(1, 2, 4, 4), "a relative position bias"),
    ("encoder_hidden_states", torch.zeros(1, 4, 8), "cross-attention"),
    ("rope_deltas", torch.zeros(1), "the attention keyword `rope_deltas`, which lightning-mqsp does not know"),
])
def test_attention_keywords_it_cannot_honour_are_refused_by_name(keyword: str, value: torch.Tensor, message: str) -> None:
    q = torch.randn(1, 2, 4, 8)
    with activate(one_rank()), pytest.raises(ValueError, match=re.escape(f"cannot run _Attention: it uses {message}")):
        huggingface.mqsp_attention_forward(_Attention(), q, q, q, None, **{keyword: value})


def test_known_keywords_are_honoured() -> None:
    """sliding_window and softcap change the result exactly as the visibility model says; unset keywords are accepted."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 12, 8, generator=g) for _ in range(3))
    with activate(one_rank()):
        out, weights = huggingface.mqsp_attention_forward(
            _Attention(), q, k, v, None, scaling=0.3, sliding_window=4, softcap=2.0, s_aux=None, position_bias=None,
            output_attentions=False, use_cache=False, position_ids=torch.arange(12)[None],
        )
    assert weights is None
    positions = torch.arange(12)
    scores = 2.0 * torch.tanh(q.double() @ k.double().transpose(-1, -2) * 0.3 / 2.0)
    distance = positions[:, None] - positions[None, :]
    scores = scores.masked_fill(~((distance >= 0) & (distance <= 3)), float("-inf"))  # causal, 4 keys: itself and 3 before
    expected = (scores.softmax(-1) @ v.double()).transpose(1, 2)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)


def test_custom_mask_overlays_are_refused() -> None:
    with pytest.raises(ValueError, match="custom mask overlay"):
        huggingface.mqsp_mask(1, 4, 4, mask_function=lambda *a: True, attention_mask=None, use_vmap=True)


def test_labels_the_strategy_cannot_make_exact_are_refused() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                         intermediate_size=64))
    huggingface.prepare(llama)
    ids = torch.randint(3, 50, (1, 8))
    with activate(one_rank()), pytest.raises(ValueError, match=r"let the strategy shift them \(MQSPStrategy\(shift_labels=True\)"):
        llama(input_ids=ids, labels=ids)
    shifted = SequenceParallelContext(layout="zigzag", labels_shifted=True)
    with activate(shifted), pytest.raises(ValueError, match="num_items_in_batch"):
        llama(input_ids=ids, labels=ids, num_items_in_batch=8)
