"""BatchSharder and gather: label shift, padding, positions, batch types, round trip."""

from __future__ import annotations

import pytest
import torch
from transformers import BatchEncoding

from lightning_mqsp.layout import unshard_sequence
from lightning_mqsp.sharding import BatchSharder, gather_outputs, shift_left


def full_batch(length: int = 6) -> dict[str, torch.Tensor]:
    ids = torch.arange(1, 2 * length + 1).reshape(2, length)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids + 100, "extra": torch.tensor([7, 8])}


def shards(batch: dict, world_size: int, layout: str, **kwargs) -> list[dict]:
    return [BatchSharder(rank, world_size, layout, pad_token_id=0, **kwargs).shard(batch) for rank in range(world_size)]


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_padding_positions_and_round_trip(layout: str) -> None:
    parts = shards(full_batch(6), 2, layout)  # 6 does not divide into 2 (contiguous: yes) / 4 (zigzag: no) chunks
    padded = 6 if layout == "contiguous" else 8
    for key, pad in (("input_ids", 0), ("attention_mask", 0), ("labels", -100)):
        whole = unshard_sequence([p[key] for p in parts], 1, layout)
        assert whole.shape == (2, padded)
        torch.testing.assert_close(whole[:, :6], full_batch(6)[key])
        assert (whole[:, 6:] == pad).all()
    positions = unshard_sequence([p["position_ids"] for p in parts], 1, layout)
    torch.testing.assert_close(positions, torch.arange(padded).expand(2, -1))
    assert torch.equal(parts[1]["extra"], torch.tensor([7, 8]))  # not a sequence key: untouched


def test_mask_is_created_when_padding_a_batch_without_one() -> None:
    batch = {"input_ids": torch.ones(1, 3, dtype=torch.long)}
    whole = unshard_sequence([p["attention_mask"] for p in shards(batch, 2, "contiguous")], 1, "contiguous")
    torch.testing.assert_close(whole, torch.tensor([[1, 1, 1, 0]]))


def test_causal_labels_shift_before_sharding_so_no_label_crosses_an_edge() -> None:
    batch = full_batch(8)
    parts = shards(batch, 2, "zigzag", shift_labels=True)
    whole = unshard_sequence([p["labels"] for p in parts], 1, "zigzag")
    torch.testing.assert_close(whole, shift_left(batch["labels"]))
    assert (whole[:, -1] == -100).all() and torch.equal(whole[:, :-1], batch["labels"][:, 1:])


def test_batch_encoding_and_tuples_keep_their_type() -> None:
    encoding = BatchEncoding({"input_ids": torch.arange(8).reshape(1, 8)})
    out = BatchSharder(1, 2, "contiguous").shard(encoding)
    assert isinstance(out, BatchEncoding) and torch.equal(out["input_ids"], torch.arange(4, 8).reshape(1, 4))
    ids, labels, scalar = BatchSharder(0, 2, "zigzag").shard((torch.arange(8).reshape(1, 8), torch.arange(8).reshape(1, 8), 3))
    assert torch.equal(ids, torch.tensor([[0, 1, 6, 7]])) and torch.equal(labels, ids) and scalar == 3
    with pytest.raises(ValueError, match="cannot pad a tuple batch of length 6 to 8"):
        BatchSharder(0, 2, "zigzag").shard((torch.zeros(1, 6),))


def test_missing_sequence_keys_name_the_fix() -> None:
    with pytest.raises(ValueError, match="Pass `sequence_keys"):
        BatchSharder(0, 2, "zigzag").shard({"tokens": torch.zeros(1, 8)})


def test_gather_outputs_single_rank_trims_padding_and_keeps_structure() -> None:
    outputs = {"logits": torch.randn(2, 8, 3), "pooled": torch.randn(2, 5), "nested": (torch.randn(2, 8),)}
    gathered = gather_outputs(outputs, local_length=8, group=None, layout="zigzag", full_length=6)
    assert gathered["logits"].shape == (2, 6, 3) and gathered["nested"][0].shape == (2, 6)
    assert torch.equal(gathered["pooled"], outputs["pooled"])


def _gather_on_rank(layout: str) -> bool:
    import torch.distributed as dist

    from lightning_mqsp.sharding import all_gather_sequence

    full = torch.arange(2 * 6 * 3, dtype=torch.float32).reshape(2, 6, 3)
    sharder = BatchSharder(dist.get_rank(), 2, layout)
    local = sharder.shard({"inputs_embeds": full})["inputs_embeds"]
    return torch.equal(all_gather_sequence(local, None, layout, full_length=6), full)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_gather_sequence_restores_original_order(workers, layout: str) -> None:
    assert workers(2).run(_gather_on_rank, layout) == [True, True]


def _gather_outputs_to_first_rank(layout: str) -> tuple[bool, bool]:
    """(whether this rank got the full outputs, whether it got None) when gathering to the group's first rank."""
    import torch.distributed as dist

    full = torch.arange(2 * 6 * 3, dtype=torch.float32).reshape(2, 6, 3)
    local = BatchSharder(dist.get_rank(), 2, layout).shard({"inputs_embeds": full})["inputs_embeds"]
    pooled = full[:, :1, 0]  # [2, 1]: not a sequence tensor, passed through
    gathered = gather_outputs({"logits": local, "pooled": pooled}, local.size(1), None, layout, 6, first_rank_only=True)
    return gathered is not None and torch.equal(gathered["logits"], full) and torch.equal(gathered["pooled"], pooled), gathered is None


@pytest.mark.timeout(120)
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_gather_outputs_to_the_first_rank_only(workers, layout: str) -> None:
    """predict_outputs="first_rank": the group's first rank gets the full outputs, in order; the other gets None."""
    assert workers(2).run(_gather_outputs_to_first_rank, layout) == [(True, False), (False, True)]


def _documents(parts: list[BatchSharder], layout: str) -> torch.Tensor:
    return unshard_sequence([p.last_document_ids for p in parts], 1, layout)


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_packed_documents_from_restarting_positions(layout: str) -> None:
    """transformers' rule: without an attention mask, a position that does not step by one starts a document."""
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2], [0, 1, 2, 3, 4, 5, 0, 1]])
    batch = {"input_ids": torch.arange(16).view(2, 8), "position_ids": positions}
    sharders = [BatchSharder(rank, 2, layout) for rank in range(2)]
    parts = [s.shard(batch) for s in sharders]
    torch.testing.assert_close(_documents(sharders, layout), torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2], [0, 0, 0, 0, 0, 0, 1, 1]]))
    torch.testing.assert_close(unshard_sequence([p["position_ids"] for p in parts], 1, layout), positions)
    assert all("attention_mask" not in p for p in parts)
    with_mask = [BatchSharder(rank, 2, layout) for rank in range(2)]  # with a padding mask transformers packs nothing
    for s in with_mask:
        s.shard({**batch, "attention_mask": torch.ones(2, 8, dtype=torch.long)})
    assert all(s.last_document_ids is None for s in with_mask)


def test_explicit_document_ids_restart_positions_and_pad_as_a_document() -> None:
    batch = {"input_ids": torch.arange(6).view(1, 6), "document_ids": torch.tensor([[4, 4, 9, 9, 9, 2]])}
    sharders = [BatchSharder(rank, 2, "zigzag") for rank in range(2)]  # 6 tokens: padded to 8
    parts = [s.shard(batch) for s in sharders]
    torch.testing.assert_close(_documents(sharders, "zigzag"), torch.tensor([[0, 0, 1, 1, 1, 2, 3, 3]]))
    positions = unshard_sequence([p["position_ids"] for p in parts], 1, "zigzag")
    torch.testing.assert_close(positions, torch.tensor([[0, 1, 0, 1, 2, 0, 0, 1]]))
    assert all("document_ids" not in p and "attention_mask" not in p for p in parts)  # the model takes neither


def test_document_ids_with_a_padding_mask_are_refused() -> None:
    batch = {"input_ids": torch.ones(1, 4, dtype=torch.long), "attention_mask": torch.ones(1, 4), "document_ids": torch.zeros(1, 4)}
    with pytest.raises(ValueError, match="both `document_ids` and an `attention_mask`"):
        BatchSharder(0, 2, "contiguous").shard(batch)


def test_positions_are_the_models_own() -> None:
    """RoBERTa numbers real tokens from padding_idx + 1: the strategy adds exactly the positions the model computes."""
    from transformers.models.roberta.modeling_roberta import RobertaEmbeddings

    from lightning_mqsp.adapters.huggingface import padding_aware_positions

    ids = torch.tensor([[5, 6, 7, 1, 1, 1], [8, 1, 9, 9, 9, 9]])  # padding_idx 1
    parts = [BatchSharder(r, 2, "zigzag", position_ids_fn=lambda i: padding_aware_positions(i, 1)).shard({"input_ids": ids})
             for r in range(2)]
    positions = unshard_sequence([p["position_ids"] for p in parts], 1, "zigzag")[:, :6]
    torch.testing.assert_close(positions, RobertaEmbeddings.create_position_ids_from_input_ids(ids, 1))


def test_tuple_batches_of_causal_lms_are_refused() -> None:
    with pytest.raises(ValueError, match="a tuple batch does not say which tensor holds them"):
        BatchSharder(0, 2, "contiguous", shift_labels=True).shard((torch.ones(1, 4), torch.ones(1, 4)))
