"""lightning-mqsp: Micro-Query Sequence Parallelism for PyTorch Lightning."""

from lightning_mqsp.attention import auto_micro_q_size, mqsp_attention
from lightning_mqsp.comm import CommCounter, count_communication
from lightning_mqsp.layout import global_positions, shard_sequence, unshard_sequence

__all__ = [
    "CommCounter",
    "auto_micro_q_size",
    "count_communication",
    "global_positions",
    "mqsp_attention",
    "shard_sequence",
    "unshard_sequence",
]
__version__ = "0.1.0.dev0"
