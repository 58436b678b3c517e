"""How many processes share a job and which one this is: the one answer for training (DDP), metrics,
the sampler and index extraction.

Two sources, asked in this order: an initialised ``torch.distributed`` group (DDP, spawned extraction
ranks), then a launcher's environment (``torchrun``: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) before any
group exists.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Rank:
    rank: int
    world: int
    local_rank: int


def distributed_world_size() -> int:
    """Processes in the initialised ``torch.distributed`` group; 1 without one."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def distributed_rank() -> int:
    """This process's rank in the initialised ``torch.distributed`` group; 0 without one."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def launched_rank() -> Rank | None:
    """This process's rank when a launcher such as ``torchrun`` started several (``WORLD_SIZE`` > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1 or "RANK" not in os.environ:
        return None
    rank = int(os.environ["RANK"])
    return Rank(rank, world, int(os.environ.get("LOCAL_RANK", rank)))


def is_main_process() -> bool:
    """True for a single process and for rank 0 of a launched group (the one that writes results)."""
    launched = launched_rank()
    return launched is None or launched.rank == 0
