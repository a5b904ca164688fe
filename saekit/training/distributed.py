"""Training past one process with ``torch.distributed`` (torchrun, SLURM, or any launcher that
sets RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT).

Three ways to spread the work (``--parallel``):

* ``data``: one dictionary, replicated; each rank reads a disjoint slice of every global batch.
  Losses use batch statistics reduced over all ranks and gradients are summed, so N ranks with
  batch B/N each follow the same trajectory as one process with batch B (to float rounding).
* ``dictionaries``: the dictionaries of a sweep are dealt round-robin to the ranks; each rank
  reads the whole data and trains its own, with no communication but at checkpoints.
* ``latents``: one dictionary too large for one device; each rank holds a contiguous slice of
  the latents (rows of W_enc, b_enc, W_dec). See :mod:`saekit.training.latent_parallel`.

A collective that fails because a peer died raises :class:`PeerLostError`, which says the last
checkpoint is intact and how to resume.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor

from .. import _dist

Parallelism = Literal["data", "dictionaries", "latents"]


class PeerLostError(RuntimeError):
    """Another rank stopped (killed, crashed or unreachable) in the middle of a collective."""


@dataclass
class ProcessGroup:
    """This process's place in a run of ``world_size`` processes, with the collectives we use."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        """Sum of ``tensor`` over all ranks (in place; returns it)."""
        if self.active:
            _guarded(dist.all_reduce, tensor)
        return tensor

    def all_reduce_min(self, tensor: Tensor) -> Tensor:
        """Minimum of ``tensor`` over all ranks (in place; returns it)."""
        if self.active:
            _guarded(dist.all_reduce, tensor, op=dist.ReduceOp.MIN)
        return tensor

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's (JSON-like) object, in rank order."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world_size
        _guarded(dist.all_gather_object, out, obj)
        return out

    def all_gather(self, tensor: Tensor) -> Tensor:
        """The ranks' tensors concatenated along dim 0, in rank order."""
        if not self.active:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        _guarded(dist.all_gather, parts, tensor.contiguous())
        return torch.cat(parts)

    def barrier(self) -> None:
        if self.active:
            _guarded(dist.barrier)

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        if not self.active:
            return obj
        box = [obj]
        _guarded(dist.broadcast_object_list, box, src=src)
        return box[0]


def _guarded(fn: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except (RuntimeError, dist.DistError) as err:
        raise PeerLostError(
            f"rank {dist.get_rank()} lost contact with another rank during {fn.__name__} ({err}). "
            "The run stops; the last complete checkpoint is intact: rerun the same command with "
            "--resume once every rank can start."
        ) from err


def from_environment(device_type: str, timeout_s: float) -> ProcessGroup:
    """Join the process group that the launcher described in the environment, if any.

    NCCL on CUDA, gloo on CPU. ``timeout_s`` bounds how long a rank waits for a silent peer.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return ProcessGroup()
    if "RANK" not in os.environ:
        raise RuntimeError(
            "WORLD_SIZE > 1 but RANK is not set: launch with torchrun (or set RANK per process)"
        )
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    _dist.joined()  # the process then ends through _dist.exit_process (gloo's worker threads)
    return ProcessGroup(dist.get_rank(), dist.get_world_size(), local_rank)


def flat_all_reduce_(tensors: list[Tensor], group: ProcessGroup) -> None:
    """Sum many tensors over the ranks with one collective (one flat buffer)."""
    if not group.active or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    group.all_reduce_sum(flat)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()
