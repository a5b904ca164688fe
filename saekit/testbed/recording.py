"""What a testbed training script leaves beside its weights: settings, curve and final scores.

Every shipped model directory holds a ``training.json`` written by this class, so the numbers in
the README can be checked against the run that produced the weights.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .._io import atomic_write_json


def seed_everything(seed: int, threads: int | None = None) -> None:
    """Seed torch (and numpy through the caller's Generator) and fix the thread count.

    The thread count is part of the recipe: CPU reductions may sum in a different order with a
    different number of threads, so runs repeat bit for bit only with the same setting.
    """
    torch.manual_seed(seed)
    if threads is not None:
        torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)


def machine() -> str:
    cores = os.cpu_count()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.machine()}, {cores} CPU cores, {torch.get_num_threads()} threads, {gpu}"


@dataclass
class TrainingRecord:
    """The settings, curve and final scores of one training run."""

    model: str
    settings: dict[str, Any]
    curve: list[dict[str, float]] = field(default_factory=list)
    final: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.time)

    def log(self, step: int, **metrics: float) -> None:
        row = {"step": step, "seconds": round(time.time() - self.started, 1)}
        row.update({k: round(float(v), 5) for k, v in metrics.items()})
        self.curve.append(row)
        print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "settings": self.settings,
            "machine": machine(),
            "torch": torch.__version__,
            "wall_seconds": round(time.time() - self.started, 1),
            "final": self.final,
            "curve": self.curve,
        }

    def write(self, directory: str | Path) -> Path:
        path = Path(directory) / "training.json"
        atomic_write_json(path, self.as_dict())
        return path
