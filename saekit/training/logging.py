"""Metric records: always a local JSONL file, and Weights & Biases when asked."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .._optional import require


class MetricsLogger:
    """Appends one JSON object per record to ``metrics.jsonl``; mirrors scalars to wandb.

    On resume, records newer than the checkpoint's step are dropped first, so the file reads as
    one uninterrupted run.
    """

    def __init__(
        self,
        path: Path,
        *,
        resume_step: int | None = None,
        wandb_project: str | None = None,
        run_name: str | None = None,
        config: dict[str, Any] | None = None,
        enabled: bool = True,
    ) -> None:
        self.path = path
        self.enabled = enabled
        self._wandb: Any = None
        if not enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            path.write_text("")
        elif path.exists():
            kept = [line for line in path.read_text().splitlines() if _step_of(line) <= resume_step]
            path.write_text("".join(line + "\n" for line in kept))
        self._file = path.open("a")
        if wandb_project:
            wandb = require("wandb", "logging to Weights & Biases")
            self._wandb = wandb.init(
                project=wandb_project, name=run_name, config=config, resume="allow"
            )

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._wandb is not None:
            prefix = record.get("dictionary", "")
            scalars = {
                f"{prefix}/{k}" if prefix else k: v
                for k, v in record.items()
                if isinstance(v, (int, float)) and k != "step"
            }
            self._wandb.log(scalars, step=record.get("step"))

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()


def _step_of(line: str) -> float:
    try:
        return float(json.loads(line).get("step", 0))
    except (json.JSONDecodeError, AttributeError):
        return float("inf")  # a torn last line from a killed run: drop it


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl file."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
