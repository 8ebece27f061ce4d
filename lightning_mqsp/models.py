"""Built-in model shapes, so that the planner and the memory estimator need no download: Hugging Face configs built
locally from the published shapes (hidden size, depth, heads, key/value heads, vocabulary, tied embeddings), at a
given full sequence length L (a learned position table must hold every global position, so it grows with L)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from transformers import (
    BertConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    Qwen2Config,
    Qwen3Config,
)


def _bert(length: int, hidden: int, layers: int, heads: int, vocab: int = 30522) -> PretrainedConfig:
    return BertConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=4 * hidden, max_position_embeddings=max(length, 512), attention_probs_dropout_prob=0.0,
    )


def _decoder(length: int, config: Callable[..., PretrainedConfig], positions: int, **shape: Any) -> PretrainedConfig:
    return config(max_position_embeddings=max(length, positions), **shape)


_LLAMA3: dict[str, Any] = {"vocab_size": 128256, "rope_theta": 500_000.0}

#: Model name -> config at full sequence length L. Attention-probability dropout is off (MQSP's kernels draw none);
#: hidden dropout stays. The names without a vendor (``llama-8b``, ``tiny-llama``, ...) are the estimator's own
#: shapes of ``docs/scaling.md``; ``llama-8b`` is Llama-3.1-8B's.
MODELS: dict[str, Callable[[int], PretrainedConfig]] = {
    "tiny-bert": partial(_bert, hidden=64, layers=2, heads=4, vocab=1000),
    "bert-base": partial(_bert, hidden=768, layers=12, heads=12),
    "bert-large": partial(_bert, hidden=1024, layers=24, heads=16),
    "gpt2": lambda length: GPT2Config(n_positions=max(length, 1024), attn_pdrop=0.0),
    # A ~1B Llama-style decoder; key/value heads = query heads, since the baselines take no GQA.
    "llama-1b": partial(_decoder, config=LlamaConfig, positions=2048, vocab_size=32000, hidden_size=2048,
                        intermediate_size=5632, num_hidden_layers=22, num_attention_heads=16, num_key_value_heads=16),
    "llama-8b": partial(_decoder, config=LlamaConfig, positions=8192, **_LLAMA3, hidden_size=4096, intermediate_size=14336,
                        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),
    # Llama's shape, tiny: the recipes' estimates are validated against real runs of it.
    "tiny-llama": partial(_decoder, config=LlamaConfig, positions=1024, vocab_size=1000, hidden_size=64, intermediate_size=172,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    "llama-3.2-1b": partial(_decoder, config=LlamaConfig, positions=8192, **_LLAMA3, hidden_size=2048, intermediate_size=8192,
                            num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                            tie_word_embeddings=True),
    "llama-3.2-3b": partial(_decoder, config=LlamaConfig, positions=8192, **_LLAMA3, hidden_size=3072, intermediate_size=8192,
                            num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8, head_dim=128,
                            tie_word_embeddings=True),
    "qwen2.5-7b": partial(_decoder, config=Qwen2Config, positions=32768, vocab_size=152064, hidden_size=3584,
                          intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                          rope_theta=1_000_000.0, tie_word_embeddings=False),
    "qwen3-8b": partial(_decoder, config=Qwen3Config, positions=40960, vocab_size=151936, hidden_size=4096,
                        intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                        head_dim=128, rope_theta=1_000_000.0, tie_word_embeddings=False),
    "mistral-7b": partial(_decoder, config=MistralConfig, positions=32768, vocab_size=32768, hidden_size=4096,
                          intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                          rope_theta=1_000_000.0, tie_word_embeddings=False, sliding_window=None),  # v0.3: full attention
}
#: The published names of the built-in shapes the estimator knows by a short name.
MODELS["llama-3.1-8b"] = MODELS["llama-8b"]


def model_config(name: str, length: int) -> PretrainedConfig:
    """The built-in config ``name`` at full length ``length``; an unknown name is an error that lists the built-ins."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}: built-in shapes are {', '.join(sorted(MODELS))}; "
                         "or pass a local config.json (or the folder holding it)")
    return MODELS[name](length)
