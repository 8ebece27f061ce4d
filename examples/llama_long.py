"""Llama at long context with the full recipe: parameters, gradients and AdamW state sharded by FSDP2 over
every rank (``MQSPFSDPStrategy``), MQSP attention over the sequence split across the ranks of a node,
activation checkpointing of every decoder layer with the kept hidden states (and attention's queries, through
backward) offloaded to host memory, the attention's backward one group of key/value heads at a time,
and the causal-LM loss computed from the hidden states in chunks (the [tokens, vocabulary] logits never
exist whole), on packed documents.

A tiny model on this machine's CPU (2 ranks, 2048 tokens):

    python examples/llama_long.py fit --config examples/configs/llama_long.yaml

Llama-3.1-8B's shape (config built locally, no download) on a node of 8 GPUs, 128k tokens a sample:

    python examples/llama_long.py fit --config examples/configs/llama_long.yaml --model.preset=llama-8b \\
        --trainer.accelerator=gpu --trainer.devices=8 --trainer.precision=bf16-mixed \\
        --trainer.strategy.init_args.sequence_parallel_size=8 --trainer.strategy.init_args.mixed_precision=true \\
        --trainer.strategy.init_args.attention_head_groups=8 \\
        --data.seq_len=131072 --data.tokenizer=<a hub name or path, e.g. your Llama 3 tokenizer>

On one 80 GB GPU, with the parameters, gradients and AdamW state in host memory too (``docs/scaling.md``):

    python examples/llama_long.py fit --config examples/configs/llama_long.yaml --model.preset=llama-8b \\
        --trainer.accelerator=gpu --trainer.devices=1 --trainer.precision=bf16-mixed \\
        --trainer.strategy.init_args.sequence_parallel_size=1 --trainer.strategy.init_args.mixed_precision=true \\
        --trainer.strategy.init_args.offload_parameters=true --trainer.strategy.init_args.attention_head_groups=8 \\
        --data.seq_len=131072 --data.tokenizer=<...>

``--model.pretrained=<hub name or path>`` starts from a checkpoint instead of random weights.
``--model.loss_kernel`` picks the loss's kernel: ``auto`` (default) takes liger-kernel's fused linear cross entropy
on CUDA where it needs no more memory than the chunks (shards up to about 64K tokens of Llama-8B), ``liger`` or
``torch`` always. Over
several nodes, start the same command with Lightning's launchers (``--trainer.num_nodes``, torchrun or
SLURM): sequence parallelism stays inside a node, data parallelism spans the nodes. How long a
sequence fits: ``docs/scaling.md``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal

from torch import Tensor
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedModel

sys.path.insert(0, str(Path(__file__).parent))
from bert_mlm import LanguageModel, main

from lightning_mqsp import chunked_causal_lm_cross_entropy

#: Shapes of Llama models, built locally. "llama-8b" is Llama-3.1-8B's (RoPE theta 500k, GQA 32/8).
PRESETS: dict[str, dict] = {
    "tiny": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 172},
    "llama-8b": {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                 "intermediate_size": 14336, "rope_theta": 500_000.0},
}


def build_llama(preset: str, vocab_size: int, max_positions: int, pretrained: str | None) -> PreTrainedModel:
    if pretrained is not None:
        return AutoModelForCausalLM.from_pretrained(pretrained)
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}.")
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, max_position_embeddings=max_positions, **PRESETS[preset]))


class LlamaLong(LanguageModel):
    """Next-token prediction over packed documents with the chunked full-sequence loss."""

    def __init__(
        self, preset: str = "tiny", pretrained: str | None = None, vocab_size: int = 8192, max_positions: int = 131072,
        lr: float = 3e-4, weight_decay: float = 0.01, warmup_steps: int = 20, loss_chunk_size: int = 4096,
        loss_kernel: Literal["auto", "torch", "liger"] = "auto",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model: PreTrainedModel | None = None

    def configure_model(self) -> None:
        # Built here, not in __init__, so that a strategy can build it where it should live.
        if self.model is None:
            hp = self.hparams
            self.model = build_llama(hp.preset, hp.vocab_size, hp.max_positions, hp.pretrained)

    def loss(self, batch: dict[str, Tensor]) -> Tensor:
        assert self.model is not None
        # use_cache=False: with a cache transformers attends across packed documents, even in one process.
        hidden = self.model.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).last_hidden_state
        return chunked_causal_lm_cross_entropy(hidden, self.model.lm_head, batch["labels"], chunk_size=self.hparams.loss_chunk_size,
                                               kernel=self.hparams.loss_kernel)


if __name__ == "__main__":
    main(LlamaLong)
