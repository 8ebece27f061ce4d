"""Hugging Face adapter: registration, masks kept, state dict unchanged, setup-time refusals, position limit."""

from __future__ import annotations

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
