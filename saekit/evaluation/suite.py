"""Evaluate a dictionary on a held-out cache in one streaming pass: reconstruction, sparsity,
and (with factor labels) how its latents line up with known factors; write the figures.

    result = evaluate_on_cache(sae, "runs/heldout-cache", labels=read_labels("labels.json"))
    result.reconstruction.fvu, result.factors.report.values_covered

The pass reads the cache in a seeded shuffled order, so ``max_rows`` evaluates a random subset
of the rows (every input, position and step equally likely), never the first shard only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..dictionaries import SparseAutoencoder
from ..sources import DataError
from .factors import (
    COVERAGE_AUROC,
    TRACK_AUROC,
    FactorLabels,
    FactorScores,
    SampleMaxAccumulator,
    score_factors,
)
from .metrics import DENSE_THRESHOLD, LatentStats, ReconstructionAccumulator, ReconstructionMetrics
from .report import DictionaryEval


@dataclass
class CacheEvaluation:
    """What one pass over a cache measured."""

    reconstruction: ReconstructionMetrics
    latents: LatentStats
    factors: FactorScores | None
    data: dict[str, Any]
    """The cache, hookpoint and rows read."""


@torch.no_grad()
def evaluate_on_cache(
    sae: SparseAutoencoder,
    cache: Any,
    *,
    hookpoint: str | None = None,
    max_rows: int = 0,
    batch_size: int = 4096,
    dense_threshold: float = DENSE_THRESHOLD,
    labels: FactorLabels | None = None,
    coverage_auroc: float = COVERAGE_AUROC,
    track_auroc: float = TRACK_AUROC,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> CacheEvaluation:
    """Reconstruction metrics, per-latent statistics and factor scores of ``sae`` on the rows of
    ``cache`` (a directory or view) at ``hookpoint`` (default: the dictionary's, else the only
    one). ``max_rows`` 0 reads every row."""
    from ..cache import CacheReader, open_cache

    view = open_cache(cache) if not hasattr(cache, "hookpoints") else cache
    name = hookpoint
    if name is None and sae.cfg.hookpoint is not None:
        # The dictionary's module path, with its capture if the cache names it that way.
        candidates = [
            h.name
            for h in view.hookpoints.values()
            if h.record.module == sae.cfg.hookpoint and h.record.capture == sae.cfg.capture
        ]
        name = candidates[0] if len(candidates) == 1 else None
    reader = CacheReader(
        view, name, batch_size, epochs=1, shuffle=True, seed=seed, metadata=labels is not None
    )
    if reader.d_in != sae.d_in:
        raise DataError(
            f"the cache's hookpoint {reader.hookpoint.name} has width {reader.d_in} but the "
            f"dictionary reads d_in={sae.d_in}; evaluate it on the hookpoint it was trained on"
        )
    device = torch.device(device) if device is not None else sae.device
    acc = ReconstructionAccumulator(sae.d_sae, dense_threshold)
    samples = None if labels is None else SampleMaxAccumulator(len(labels.presence), sae.d_sae)
    limit = max_rows if max_rows > 0 else None
    try:
        for batch in reader:
            x = batch.activations if hasattr(batch, "activations") else batch  # (N, d)
            meta = batch.metadata if hasattr(batch, "metadata") else None
            if limit is not None:
                x = x[: limit - acc.rows]
            x = x.to(device=device, dtype=sae.dtype)
            codes = sae.encode(x)
            acc.update(x, sae.decode(codes), codes)
            if samples is not None and meta is not None:
                samples.update(codes, meta["sample"][: x.shape[0]])
            if limit is not None and acc.rows >= limit:
                break
    finally:
        reader.close()
    factors = None
    if labels is not None and samples is not None:
        factors = score_factors(
            samples.activations,
            labels,
            seen=samples.seen,
            coverage_auroc=coverage_auroc,
            track_auroc=track_auroc,
        )
    data = {
        "cache": str(view.path),
        "hookpoint": reader.hookpoint.name,
        "rows": acc.rows,
        "cache_rows": reader.n_rows,
    }
    return CacheEvaluation(acc.metrics(), acc.latent_stats(), factors, data)


def write_figures(
    entry: DictionaryEval,
    evaluation: CacheEvaluation | None,
    output_dir: str | Path,
    *,
    prefix: str = "",
    metrics_file: str | Path | None = None,
) -> list[str]:
    """PNG figures of one dictionary's evaluation (and its training curves when its run's
    ``metrics.jsonl`` is given); returns their paths relative to ``output_dir``."""
    from . import plots

    output_dir = Path(output_dir)
    written = []
    if evaluation is not None:
        written.append(
            plots.plot_density_histogram(
                evaluation.reconstruction.density_histogram,
                output_dir / f"{prefix}density.png",
                title=f"feature density ({evaluation.reconstruction.rows:,} rows)",
            )
        )
        if evaluation.factors is not None and evaluation.factors.report.per_value:
            written.append(
                plots.plot_factor_coverage(
                    evaluation.factors.report, output_dir / f"{prefix}factors.png"
                )
            )
    for task, result in entry.downstream.items():
        scores = downstream_scores(result)
        if scores:
            written.append(
                plots.plot_downstream(scores, output_dir / f"{prefix}{task}.png", title=task)
            )
    if metrics_file is not None and Path(metrics_file).is_file():
        written.append(
            plots.plot_training_curves(metrics_file, output_dir / f"{prefix}training.png")
        )
    return [str(p.relative_to(output_dir)) for p in written]


def downstream_scores(result: Any) -> dict[str, dict[str, float]]:
    """``condition -> metric -> value`` of a downstream result, for a bar chart."""
    from .downstream import ContrastiveResult, DiffusionResult, NextTokenResult

    table: dict[str, dict[str, float]] = {}
    if isinstance(result, ContrastiveResult):
        for condition, s in result.conditions.items():
            row = {f"zero-shot {k}": v for k, v in s.zero_shot_accuracy.items()}
            row |= {f"i2t {k}": v for k, v in s.recall_image_to_text.items()}
            row |= {f"t2i {k}": v for k, v in s.recall_text_to_image.items()}
            table[condition] = row
    elif isinstance(result, NextTokenResult):
        table = {c: {"cross-entropy": v} for c, v in result.loss.items()}
    elif isinstance(result, DiffusionResult):
        for condition, accuracy in result.oracle_accuracy.items():
            table[condition] = {f"oracle {k}": v for k, v in accuracy.items()}
        for condition, rmse in result.pixel_rmse.items():
            table.setdefault(condition, {})["pixel RMSE"] = rmse
    return table
