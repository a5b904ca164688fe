"""Process-group facts that every part may ask (rank-0-only logging and progress bars)."""

from __future__ import annotations

import os


def rank() -> int:
    """This process's global rank under torchrun/SLURM-style launchers (0 when not launched)."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    except ImportError:  # pragma: no cover - torch always has it
        pass
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size()
    except ImportError:  # pragma: no cover
        pass
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_rank_zero() -> bool:
    return rank() == 0
