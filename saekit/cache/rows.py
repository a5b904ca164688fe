"""The per-row metadata columns of a cache, and the subsampling that keeps caches affordable.

Every shard stores the activations ``(n, d)`` and one column per metadata field. The columns
are always all present (unknown values are filled with -1 / NaN), so every reader sees the same
schema whatever model wrote the cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ..adapters.base import BRANCH_NAMES, NO_BRANCH, ModelAdapter, Rows
from ..configuration import ConfigError

# column -> (dtype, fill value when the adapter does not know it)
COLUMNS: dict[str, tuple[torch.dtype, float]] = {
    "sample": (torch.int64, -1),  # input id in the data source
    "position": (torch.int32, -1),  # token / patch index (h·W + w for feature maps)
    "step": (torch.int16, -1),  # denoising step index
    "timestep": (torch.float32, math.nan),  # scheduler timestep of that step
    "branch": (torch.int8, NO_BRANCH),  # CFG half: 0 uncond, 1 cond
    "stream": (torch.int8, -1),  # index into the manifest's streams (image vs text token ...)
}

METADATA_BYTES_PER_ROW = sum(
    torch.empty((), dtype=dtype).element_size() for dtype, _ in COLUMNS.values()
)


def metadata_columns(rows: Rows) -> dict[str, Tensor]:
    """The metadata of ``rows`` as the stored columns (dtype cast, unknowns filled)."""
    n = len(rows)
    device = rows.values.device
    columns = {}
    for name, (dtype, fill) in COLUMNS.items():
        column = getattr(rows, name)
        if column is None:
            columns[name] = torch.full((n,), fill, dtype=dtype, device=device)
        else:
            columns[name] = column.to(device=device, dtype=dtype)
    return columns


@dataclass
class RowFilter:
    """Which rows to keep (all by default). Filters combine: a row is kept when it passes all."""

    every_k: int = 1
    """Keep every k-th position (token/patch index divisible by k)."""

    positions: list[int] | None = None
    """Keep only these positions (e.g. [0] for a ViT's CLS token)."""

    streams: list[str] | None = None
    """Keep only rows of these streams (e.g. [image] for a VLM's image tokens)."""

    steps: list[int] | None = None
    """Keep only these denoising step indices."""

    branches: list[Literal["cond", "uncond"]] | None = None
    """Keep only these classifier-free-guidance halves."""

    def __post_init__(self) -> None:
        if self.every_k < 1:
            raise ConfigError(f"every_k must be at least 1, got {self.every_k}")
        for name in ("positions", "streams", "steps", "branches"):
            if getattr(self, name) == []:
                raise ConfigError(f"{name} is an empty list, which keeps no row; leave it unset")

    @property
    def keeps_everything(self) -> bool:
        return self.every_k == 1 and not (
            self.positions or self.streams or self.steps or self.branches
        )

    def check(self, adapter: ModelAdapter) -> None:
        """Refuse names the adapter does not know, before the run starts."""
        if self.streams:
            try:
                adapter.stream_codes(self.streams)
            except ValueError as err:
                raise ConfigError(f"rows.streams: {err}") from err

    def mask(self, rows: Rows, stream_names: tuple[str, ...]) -> Tensor | None:
        """A boolean mask of the rows to keep, or None when all are kept."""
        if self.keeps_everything:
            return None
        device = rows.values.device
        keep = torch.ones(len(rows), dtype=torch.bool, device=device)
        if self.every_k > 1:
            keep &= rows.position % self.every_k == 0
        if self.positions:
            keep &= torch.isin(rows.position, torch.tensor(self.positions, device=device))
        if self.streams:
            if rows.stream is None:
                keep &= False
            else:
                codes = [stream_names.index(s) for s in self.streams]
                keep &= torch.isin(rows.stream.long(), torch.tensor(codes, device=device))
        if self.steps:
            if rows.step is None:
                keep &= False
            else:
                keep &= torch.isin(rows.step.long(), torch.tensor(self.steps, device=device))
        if self.branches:
            if rows.branch is None:
                keep &= False
            else:
                codes = [BRANCH_NAMES[b] for b in self.branches]
                keep &= torch.isin(rows.branch.long(), torch.tensor(codes, device=device))
        return keep
