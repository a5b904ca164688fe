"""The evaluation report: typed results of every dictionary evaluated, written as one JSON file.

Layout of ``eval.json`` (what ``saekit push --eval_report`` reads into the model card)::

    {"format": "saekit-eval", "format_version": 1, "saekit_version": ..., "created": ...,
     "machine": ..., "dictionaries": {<folder>: {"dictionary": {...}, "data": {...},
        "reconstruction": {...}, "downstream": {<task>: {...}}, "factors": {...}, "seconds": ...}}}

Numbers that are not finite (a recall with no captions, an undefined AUROC) are written as
``null``: JSON has no NaN.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .._io import atomic_write_json, read_json
from ..dictionaries import SparseAutoencoder
from .factors import FactorReport
from .metrics import ReconstructionMetrics

FORMAT = "saekit-eval"
FORMAT_VERSION = 1
REPORT_FILE = "eval.json"


@dataclass
class DictionaryEval:
    """Everything measured about one dictionary."""

    dictionary: dict[str, Any]
    """What was evaluated: path, hookpoint, capture, architecture, d_in, d_sae, k, model."""
    data: dict[str, Any] = field(default_factory=dict)
    """What it was evaluated on: cache path, hookpoint, rows."""
    reconstruction: ReconstructionMetrics | None = None
    downstream: dict[str, Any] = field(default_factory=dict)
    """Task name -> result (ContrastiveResult, NextTokenResult, DiffusionResult)."""
    factors: FactorReport | None = None
    figures: list[str] = field(default_factory=list)
    """PNG files written beside the report (relative paths)."""
    seconds: float = 0.0


@dataclass
class EvalReport:
    """One ``saekit eval`` run."""

    dictionaries: dict[str, DictionaryEval]
    saekit_version: str = ""
    created: str = ""
    machine: str = ""

    def __post_init__(self) -> None:
        from .. import __version__

        self.saekit_version = self.saekit_version or __version__
        self.created = self.created or datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"
        )
        self.machine = self.machine or machine_description()


def machine_description() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.machine()}, {os.cpu_count()} CPU cores, {gpu}"


def describe_dictionary(sae: SparseAutoencoder, path: str | Path | None = None) -> dict[str, Any]:
    cfg = sae.cfg
    return {
        "path": None if path is None else str(path),
        "hookpoint": cfg.hookpoint,
        "capture": cfg.capture,
        "architecture": cfg.architecture,
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "k": cfg.k if cfg.architecture in ("topk", "batchtopk") else None,
        "model": cfg.model,
    }


def to_json(value: Any) -> Any:
    """A JSON-safe copy: dataclasses to objects, tensors to lists, NaN and inf to null."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, torch.Tensor):
        return to_json(value.tolist())
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    return value


def write_report(path: str | Path, report: EvalReport) -> Path:
    """Write ``report`` atomically as JSON."""
    path = Path(path)
    body = {"format": FORMAT, "format_version": FORMAT_VERSION, **to_json(report)}
    atomic_write_json(path, body)
    return path


def read_report(path: str | Path) -> dict[str, Any]:
    """A report written by :func:`write_report`, checked for its format."""
    raw = read_json(path, what="eval report")
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise ValueError(f"{path} is not a saekit eval report (no 'format': '{FORMAT}')")
    if not isinstance(raw.get("format_version"), int) or raw["format_version"] > FORMAT_VERSION:
        raise ValueError(
            f"{path} has format_version {raw.get('format_version')!r}; this saekit reads up to "
            f"{FORMAT_VERSION}"
        )
    return raw
