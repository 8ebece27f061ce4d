"""Text data for the examples, with no download by default.

The default corpus is real English that ships with Python itself: the help topics of the
standard library's ``pydoc_data.topics`` module (~450 KB). A WordPiece tokenizer is trained on
it locally with the ``tokenizers`` library and cached. Users with their own data pass a text
file or a folder of ``.txt`` files, or a Hugging Face dataset name (needs ``pip install datasets``
and network access); users with their own tokenizer pass a hub name or a local path.

Masking for masked-language modelling is drawn from a generator seeded by (seed, sample index):
every rank of a sequence-parallel group builds the same masked sample, whatever its process.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from transformers import PreTrainedTokenizerFast

DEFAULT_CACHE = Path.home() / ".cache" / "lightning_mqsp"
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def load_corpus(source: str | None = None) -> str:
    """Plain text: the standard library's pydoc topics (None), a .txt file or folder, or a HF dataset name."""
    if source is None:
        from pydoc_data.topics import topics

        return "\n\n".join(topics[name] for name in sorted(topics))
    path = Path(source)
    if path.is_file():
        return path.read_text(encoding="utf-8")
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise ValueError(f"No .txt files under {path}: pass a text file, a folder of .txt files, or a dataset name.")
        return "\n\n".join(f.read_text(encoding="utf-8") for f in files)
    try:
        import datasets
    except ImportError as error:
        raise ValueError(
            f"{source!r} is neither a file nor a folder; to use it as a Hugging Face dataset name, `pip install datasets`."
        ) from error
    split = datasets.load_dataset(source, split="train")
    return "\n\n".join(split["text"])


def build_tokenizer(
    corpus: str, vocab_size: int = 8192, cache_dir: Path = DEFAULT_CACHE, pretrained: str | None = None,
) -> PreTrainedTokenizerFast:
    """A BERT-style WordPiece tokenizer trained on ``corpus`` (cached by content), or ``pretrained``."""
    if pretrained is not None:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(pretrained)
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    digest = hashlib.sha256(f"{vocab_size}\0{corpus}".encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"wordpiece-{digest}.json"
    if not path.exists():
        tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tokenizer.decoder = decoders.WordPiece()
        tokenizer.train_from_iterator(
            corpus.splitlines(), trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False)
        )
        tokenizer.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[(t, tokenizer.token_to_id(t)) for t in ("[CLS]", "[SEP]")]
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")  # several ranks may train at once: publish atomically
        tokenizer.save(str(tmp))
        tmp.replace(path)
    return PreTrainedTokenizerFast(
        tokenizer_file=str(path), pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]"
    )


def token_blocks(corpus: str, tokenizer: PreTrainedTokenizerFast, seq_len: int) -> Tensor:
    """The corpus as one token stream cut into [N, seq_len] blocks (the tail that does not fill one is dropped)."""
    ids = tokenizer(corpus.split("\n\n"), add_special_tokens=False)["input_ids"]
    sep = tokenizer.sep_token_id
    stream = torch.tensor([token for paragraph in ids for token in (*paragraph, sep)], dtype=torch.long)
    n = stream.numel() // seq_len
    if n == 0:
        raise ValueError(
            f"The corpus has {stream.numel()} tokens, fewer than one sequence of {seq_len}: use a shorter seq_len or more text."
        )
    return stream[: n * seq_len].view(n, seq_len)


class MaskedLMBlocks(Dataset):
    """BERT masking of 15% of tokens (80% [MASK], 10% random, 10% kept), the same on every process."""

    def __init__(self, blocks: Tensor, tokenizer: PreTrainedTokenizerFast, seed: int = 0, mask_rate: float = 0.15) -> None:
        self.blocks, self.seed, self.mask_rate = blocks, seed, mask_rate
        self.mask_id, self.vocab_size = tokenizer.mask_token_id, len(tokenizer)

    def __len__(self) -> int:
        return self.blocks.size(0)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        input_ids = self.blocks[index].clone()
        chosen = torch.rand(input_ids.shape, generator=g) < self.mask_rate
        labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
        action = torch.rand(input_ids.shape, generator=g)
        input_ids[chosen & (action < 0.8)] = self.mask_id
        randomised = chosen & (action >= 0.8) & (action < 0.9)
        input_ids[randomised] = torch.randint(len(SPECIAL_TOKENS), self.vocab_size, input_ids.shape, generator=g)[randomised]
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


class CausalLMBlocks(Dataset):
    """Next-token prediction: labels are the inputs (the model or the strategy shifts them).

    With ``document_separator``, each block is a pack of documents (the paragraphs the separator
    token ends): ``position_ids`` restart at every document and there is no attention mask, as
    transformers' ``DataCollatorWithFlattening`` packs them, so no token attends across a document.
    """

    def __init__(self, blocks: Tensor, document_separator: int | None = None) -> None:
        self.blocks, self.document_separator = blocks, document_separator

    def __len__(self) -> int:
        return self.blocks.size(0)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        ids = self.blocks[index]
        if self.document_separator is None:
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
        position = torch.arange(ids.numel())
        starts = torch.cat([torch.ones(1, dtype=torch.bool), ids[:-1] == self.document_separator])
        first = torch.where(starts, position, torch.zeros_like(position)).cummax(dim=0).values
        return {"input_ids": ids, "position_ids": position - first, "labels": ids.clone()}


class TextDataModule(pl.LightningDataModule):
    """Long-sequence language-modelling data from a local corpus.

    Args:
        objective: ``"mlm"`` (BERT masking), ``"causal"``, or ``"packed"`` (causal, paragraphs packed as documents).
        seq_len: tokens per sample (the full sequence, before it is split over ranks).
        source: None for the standard library's pydoc topics, else a text file, a folder or a dataset name.
        tokenizer: None to train a WordPiece tokenizer on the corpus, else a hub name or a path.
        tokenizer_vocab_size: vocabulary size of the WordPiece tokenizer trained when ``tokenizer`` is None.
        val_fraction: share of the blocks held out for validation.
    """

    def __init__(
        self, objective: str = "mlm", seq_len: int = 1024, batch_size: int = 1, source: str | None = None,
        tokenizer: str | None = None, tokenizer_vocab_size: int = 8192, val_fraction: float = 0.1, seed: int = 0,
        num_workers: int = 0, cache_dir: str = str(DEFAULT_CACHE),
    ) -> None:
        super().__init__()
        if objective not in ("mlm", "causal", "packed"):
            raise ValueError(f"objective must be 'mlm', 'causal' or 'packed', got {objective!r}.")
        self.save_hyperparameters()
        self.tokenizer = build_tokenizer(load_corpus(source), tokenizer_vocab_size, Path(cache_dir), tokenizer)

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        blocks = token_blocks(load_corpus(hp.source), self.tokenizer, hp.seq_len)
        n_val = max(1, int(len(blocks) * hp.val_fraction)) if len(blocks) > 1 else 0
        train, val = blocks[n_val:], blocks[:n_val]
        if hp.objective == "mlm":
            self.train_set, self.val_set = MaskedLMBlocks(train, self.tokenizer, hp.seed), MaskedLMBlocks(val, self.tokenizer, hp.seed + 1)
        else:
            separator = self.tokenizer.sep_token_id if hp.objective == "packed" else None
            self.train_set, self.val_set = CausalLMBlocks(train, separator), CausalLMBlocks(val, separator)

    def train_dataloader(self) -> DataLoader:
        # The same seeded shuffle on one process and on many: Lightning keeps a DistributedSampler it is
        # given, so runs at different sequence-parallel sizes see the same batches in the same order
        # (Lightning's own choice would be a RandomSampler alone and a DistributedSampler otherwise).
        replicas = getattr(self.trainer, "distributed_sampler_kwargs", None) or {"num_replicas": 1, "rank": 0}
        sampler = DistributedSampler(self.train_set, shuffle=True, seed=self.hparams.seed, **replicas)
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, sampler=sampler, num_workers=self.hparams.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.hparams.batch_size, num_workers=self.hparams.num_workers)
