"""lightning-mqsp: Micro-Query Sequence Parallelism for PyTorch Lightning."""

from lightning_mqsp._versions import check_versions

check_versions()  # before the imports below, which would fail on an old torch or transformers with a less useful error

from lightning.pytorch.strategies import StrategyRegistry

from lightning_mqsp.adapters import sequence_parallel_attention
from lightning_mqsp.attention import auto_micro_q_size, mqsp_attention
from lightning_mqsp.comm import CollectiveError, CommCounter, count_communication
from lightning_mqsp.layout import global_positions, shard_sequence, unshard_sequence
from lightning_mqsp.loss import (
    causal_lm_cross_entropy,
    chunked_causal_lm_cross_entropy,
    chunked_cross_entropy,
    sequence_parallel_cross_entropy,
    sequence_parallel_loss,
)
from lightning_mqsp.sharding import gather_sequence
from lightning_mqsp.strategy import MQSPStrategy
from lightning_mqsp.strategy_fsdp import MQSPFSDPStrategy

# Lightning has no entry point for third-party strategies: importing the package registers "mqsp".
if "mqsp" not in StrategyRegistry:
    StrategyRegistry.register(
        "mqsp", MQSPStrategy, description="Micro-Query Sequence Parallelism: DDP across sequence-parallel groups"
    )
if "mqsp_fsdp" not in StrategyRegistry:
    StrategyRegistry.register(
        "mqsp_fsdp", MQSPFSDPStrategy, description="Micro-Query Sequence Parallelism with parameters sharded by FSDP2"
    )

__all__ = [
    "CollectiveError",
    "CommCounter",
    "MQSPFSDPStrategy",
    "MQSPStrategy",
    "auto_micro_q_size",
    "causal_lm_cross_entropy",
    "chunked_causal_lm_cross_entropy",
    "chunked_cross_entropy",
    "count_communication",
    "gather_sequence",
    "global_positions",
    "mqsp_attention",
    "sequence_parallel_attention",
    "sequence_parallel_cross_entropy",
    "sequence_parallel_loss",
    "shard_sequence",
    "unshard_sequence",
]
__version__ = "0.1.0.dev0"
