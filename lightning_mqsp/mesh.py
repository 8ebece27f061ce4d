"""The ``("data_parallel", "sequence_parallel")`` device mesh the strategies train on.

Ranks of a sequence-parallel group are consecutive (the devices of one node by default, where the
links are fast); data parallelism runs across groups. The sequence-parallel groups are created
with their own collective timeout, so that a rank that dies or hangs inside an attention call
ends its peers' wait after that timeout (not the process group's default of 30 minutes).
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

MESH_DIM_NAMES = ("data_parallel", "sequence_parallel")
#: The default timeout of the sequence-parallel collectives: long enough for a first step that
#: compiles kernels or autotunes, short enough that a dead rank does not hold a job for half an hour.
DEFAULT_SEQUENCE_PARALLEL_TIMEOUT = datetime.timedelta(minutes=10)


def check_sizes(world_size: int, sequence_parallel_size: int) -> None:
    """Raise a ValueError that names the fix if the world does not split into sequence-parallel groups."""
    sp = sequence_parallel_size
    if sp > world_size:
        raise ValueError(
            f"sequence_parallel_size={sp} is larger than the world of {world_size} processes "
            f"(devices x num_nodes): lower sequence_parallel_size to at most {world_size}, or use more devices."
        )
    if world_size % sp != 0:
        raise ValueError(
            f"The world size {world_size} (devices x num_nodes) is not divisible by sequence_parallel_size={sp}: "
            f"choose a sequence_parallel_size that divides {world_size}, or a number of devices that is a multiple of {sp}."
        )


def sequence_parallel_mesh(
    device_type: str, sequence_parallel_size: int, timeout: datetime.timedelta = DEFAULT_SEQUENCE_PARALLEL_TIMEOUT,
) -> DeviceMesh:
    """A ``(world / sp, sp)`` mesh over the initialised default group; its sequence-parallel groups time out after ``timeout``."""
    world_size = dist.get_world_size()
    check_sizes(world_size, sequence_parallel_size)
    ranks = torch.arange(world_size).view(-1, sequence_parallel_size)
    # Every rank creates every group, in the same order, as new_group requires.
    sequence_groups = [dist.new_group(row.tolist(), timeout=timeout) for row in ranks]
    data_groups = [dist.new_group(column.tolist()) for column in ranks.T]
    rank = dist.get_rank()
    own = [data_groups[rank % sequence_parallel_size], sequence_groups[rank // sequence_parallel_size]]
    return DeviceMesh.from_group(own, device_type, mesh=ranks, mesh_dim_names=MESH_DIM_NAMES)
