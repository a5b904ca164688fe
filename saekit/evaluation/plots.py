"""PNG figures of training and evaluation (matplotlib, headless).

* :func:`plot_training_curves`: FVU, L0, dead fraction and cosine against tokens, from a run's
  ``metrics.jsonl`` (one line per dictionary of a sweep);
* :func:`plot_density_histogram`: how many latents fire at each log10 rate, dead ones apart;
* :func:`plot_factor_coverage`: the best AUROC and best F1 reached for every factor value;
* :func:`plot_downstream`: each downstream score per condition (clean, spliced, ...).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .._io import atomic_path
from .._optional import require
from .factors import FactorReport
from .metrics import DensityHistogram


def _pyplot() -> Any:
    matplotlib = require("matplotlib", "evaluation figures")
    matplotlib.use("Agg")  # files only; never opens a window
    return require("matplotlib.pyplot", "evaluation figures")


def _save(figure: Any, path: Path) -> Path:
    plt = _pyplot()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110)
    plt.close(figure)
    return path


def read_metrics_lines(path: str | Path) -> list[dict[str, Any]]:
    """Records of a ``metrics.jsonl`` file; a torn last line (a killed run) is skipped."""
    records = []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def plot_training_curves(metrics: str | Path, output: str | Path) -> Path:
    """FVU, L0, dead fraction and cosine against tokens seen, one line per dictionary."""
    records = read_metrics_lines(metrics)
    if not records:
        raise ValueError(f"{metrics} holds no metric records")
    by_dictionary: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        by_dictionary[str(record.get("dictionary", ""))].append(record)
    plt = _pyplot()
    panels = [("fvu", "FVU", True), ("l0", "L0", False), ("dead_fraction", "dead fraction", False)]
    panels.append(("cosine", "reconstruction cosine", False))
    figure, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
    for axis, (key, title, log_scale) in zip(axes, panels, strict=True):
        for name, rows in by_dictionary.items():
            points = [
                (r.get("tokens", r.get("step")), r[key]) for r in rows if r.get(key) is not None
            ]
            if points:
                xs, ys = zip(*points, strict=True)
                axis.plot(xs, ys, label=name or None, linewidth=1.4)
        axis.set_title(title)
        axis.set_xlabel("tokens")
        axis.grid(alpha=0.3)
        if log_scale and all(
            r.get(key) is None or r[key] > 0 for rows in by_dictionary.values() for r in rows
        ):
            axis.set_yscale("log")
    if len(by_dictionary) > 1:
        axes[0].legend(fontsize=7)
    return _save(figure, Path(output))


def plot_density_histogram(
    histogram: DensityHistogram, output: str | Path, title: str = ""
) -> Path:
    """Bars of latents per log10 firing-rate bin, with the dead latents as a separate bar."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6, 3.2))
    edges = histogram.log10_edges
    width = edges[1] - edges[0] if len(edges) > 1 else 1.0
    axis.bar(edges[:-1], histogram.counts, width=width, align="edge", color="#4c72b0")
    dead_at = edges[0] - 1.5 * width
    axis.bar([dead_at], [histogram.dead], width=width, color="#c44e52", label="dead")
    axis.set_xlabel("log10(fraction of rows the latent fires on)")
    axis.set_ylabel("latents")
    axis.set_title(title or "feature density")
    axis.legend()
    axis.grid(alpha=0.3, axis="y")
    return _save(figure, Path(output))


def plot_factor_coverage(report: FactorReport, output: str | Path) -> Path:
    """Best AUROC and best F1 per factor value, with the coverage threshold drawn."""
    plt = _pyplot()
    names = list(report.per_value)
    if not names:
        raise ValueError("no factor value has both positive and negative inputs")
    figure, axis = plt.subplots(figsize=(max(6.0, 0.28 * len(names) + 2), 3.6))
    positions = range(len(names))
    axis.bar(
        [p - 0.2 for p in positions],
        [report.per_value[n].auroc for n in names],
        width=0.4,
        label="best AUROC",
        color="#4c72b0",
    )
    axis.bar(
        [p + 0.2 for p in positions],
        [report.per_value[n].f1 for n in names],
        width=0.4,
        label="best F1",
        color="#dd8452",
    )
    axis.axhline(report.coverage_auroc, color="black", linewidth=0.8, linestyle="--")
    axis.set_xticks(list(positions))
    axis.set_xticklabels(names, rotation=70, ha="right", fontsize=7)
    axis.set_ylim(0, 1.02)
    axis.set_title(
        f"{report.values_covered}/{report.values_total} factor values have a latent with "
        f"AUROC >= {report.coverage_auroc}"
    )
    axis.legend(fontsize=8, loc="lower right")
    return _save(figure, Path(output))


def plot_downstream(
    scores: Mapping[str, Mapping[str, float]], output: str | Path, title: str = ""
) -> Path:
    """Grouped bars: one group per metric, one bar per condition (``scores[condition][metric]``)."""
    plt = _pyplot()
    conditions = list(scores)
    metrics: Sequence[str] = list(dict.fromkeys(m for c in conditions for m in scores[c]))
    if not metrics:
        raise ValueError("no downstream scores to plot")
    figure, axis = plt.subplots(figsize=(max(5.0, 1.1 * len(metrics) + 2), 3.4))
    width = 0.8 / max(len(conditions), 1)
    for i, condition in enumerate(conditions):
        values = [scores[condition].get(m, math.nan) for m in metrics]
        axis.bar([j + i * width for j in range(len(metrics))], values, width=width, label=condition)
    axis.set_xticks([j + width * (len(conditions) - 1) / 2 for j in range(len(metrics))])
    axis.set_xticklabels(metrics, rotation=30, ha="right", fontsize=8)
    axis.set_title(title)
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3, axis="y")
    return _save(figure, Path(output))
