"""Do latents track known factors? Per latent and per factor value: AUROC and best F1.

On a data set whose inputs carry known labels (the testbed world: shape, colour, size, position,
background), a latent *tracks* a factor value when its activation on an input tells whether the
value is present. Each input gets one activation per latent: the maximum over its rows (tokens,
patches, denoising steps), so a latent that fires on the red patch of an image counts for that
image. Then, for every (latent, value) pair:

* **AUROC**: the probability that a random input with the value has a higher activation than one
  without it (ties count half; Mann-Whitney U with mid-ranks), computed for all pairs at once;
* **best F1**: the best F1 of the rule "value present iff activation >= t" over the thresholds t
  the latent actually takes (positive activations only: a latent says nothing where it is off).

Summaries: the best latent for each value, how many values have a latent with AUROC >=
``coverage_auroc`` (0.95 by default), and the live latents whose best AUROC stays below
``track_auroc`` (they track no single factor value: a conjunction, a texture, noise, ...).

Labels are a presence matrix ``(n_samples, V)`` indexed by the cache's sample id (the input's
index in its source) with one column per ``factor=value`` (see :func:`write_labels`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .._io import atomic_path, atomic_write_json
from ..dictionaries import SparseAutoencoder
from ..kernels import SparseCodes
from ..sources import DataError

COVERAGE_AUROC = 0.95
TRACK_AUROC = 0.9
MAX_DENSE_ELEMENTS = 1 << 30
"""Largest (samples x latents) matrix of per-sample activations kept in memory (4 GiB)."""


@dataclass
class FactorLabels:
    """Which factor values each input shows."""

    value_names: list[str]
    """One name per column, ``factor=value`` (e.g. ``color=red``)."""
    presence: Tensor
    """``(n_samples, V)`` bool; row i is the input with sample id i."""

    def __post_init__(self) -> None:
        if self.presence.ndim != 2 or self.presence.shape[1] != len(self.value_names):
            raise DataError(
                f"presence must be (n_samples, {len(self.value_names)}), one column per value "
                f"name; got shape {tuple(self.presence.shape)}"
            )
        self.presence = self.presence.bool()

    @property
    def factors(self) -> list[str]:
        """The factor of each column (the part of its name before ``=``)."""
        return [name.split("=", 1)[0] for name in self.value_names]


def write_labels(path: str | Path, labels: FactorLabels) -> Path:
    """Save labels as JSON: ``{"value_names": [...], "presence": [[0, 1, ...], ...]}``."""
    path = Path(path)
    atomic_write_json(
        path,
        {
            "format": "saekit-factor-labels",
            "value_names": labels.value_names,
            "presence": labels.presence.to(torch.uint8).tolist(),
        },
    )
    return path


def read_labels(path: str | Path) -> FactorLabels:
    """Labels from a JSON file written by :func:`write_labels`, or an ``.npz`` with arrays
    ``presence`` (bool, (n_samples, V)) and ``value_names`` (strings); nothing is unpickled."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"factor labels not found: {path}")
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            if "presence" not in data or "value_names" not in data:
                raise DataError(f"{path} must hold the arrays 'presence' and 'value_names'")
            return FactorLabels(
                [str(v) for v in data["value_names"]], torch.from_numpy(data["presence"])
            )
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"factor labels {path} are not valid JSON ({err})") from err
    if not isinstance(raw, dict) or "value_names" not in raw or "presence" not in raw:
        raise DataError(
            f"{path} must be a JSON object with 'value_names' (list of 'factor=value') and "
            "'presence' (one 0/1 list per sample id)"
        )
    return FactorLabels(list(raw["value_names"]), torch.tensor(raw["presence"], dtype=torch.bool))


# ----------------------------------------------------------------------------- activations


class SampleMaxAccumulator:
    """Each input's activation per latent, the max over its rows, gathered batch by batch.

    Holds a dense ``(n_samples, d_sae)`` float32 matrix; rows whose sample id is outside
    ``[0, n_samples)`` are ignored.
    """

    def __init__(self, n_samples: int, d_sae: int) -> None:
        if n_samples * d_sae > MAX_DENSE_ELEMENTS:
            raise ValueError(
                f"{n_samples} samples x {d_sae} latents is too large to hold in memory; label "
                "fewer inputs"
            )
        self.n_samples, self.d_sae = n_samples, d_sae
        self._acts = torch.zeros(n_samples * d_sae, dtype=torch.float32)  # (S·L,) flattened
        self.seen = torch.zeros(n_samples, dtype=torch.bool)

    @torch.no_grad()
    def update(self, codes: SparseCodes, sample: Tensor) -> None:
        """Add the codes of rows whose inputs are ``sample`` ``(N,)``."""
        sample = sample.long().cpu()
        rows = codes.rows().cpu()
        entry_sample = sample[rows]  # (nnz,)
        keep = (entry_sample >= 0) & (entry_sample < self.n_samples)
        inside = sample[(sample >= 0) & (sample < self.n_samples)]
        self.seen[inside] = True
        index = entry_sample[keep] * self.d_sae + codes.indices.cpu()[keep]  # (nnz,)
        values = codes.values.detach().float().cpu()[keep].clamp_min(0)
        self._acts.scatter_reduce_(0, index, values, reduce="amax")

    def add_pairs(self, latent: Tensor, sample: Tensor, value: Tensor) -> None:
        """Add per-(latent, input) activations already reduced over rows."""
        keep = (sample >= 0) & (sample < self.n_samples)
        self.seen[sample[keep]] = True
        index = sample[keep] * self.d_sae + latent[keep]
        self._acts.scatter_reduce_(0, index, value[keep].float().clamp_min(0), reduce="amax")

    @property
    def activations(self) -> Tensor:
        """``(n_samples, d_sae)``: 0 where a latent never fired on an input."""
        return self._acts.view(self.n_samples, self.d_sae)


@torch.no_grad()
def sample_activations(
    sae: SparseAutoencoder,
    batches: Iterable[Any],
    n_samples: int,
    *,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """Each input's activation per latent: the max over its rows, in one pass over ``batches``
    (cache batches with metadata: ``.activations`` (N, d) and ``.metadata["sample"]`` (N,)).

    Returns ``(activations (n_samples, d_sae) float32, seen (n_samples,) bool)``.
    """
    device = torch.device(device) if device is not None else sae.device
    acc = SampleMaxAccumulator(n_samples, sae.d_sae)
    for batch in batches:
        x = batch.activations.to(device=device, dtype=sae.dtype)  # (N, d)
        acc.update(sae.encode(x), batch.metadata["sample"])
    return acc.activations, acc.seen


# ----------------------------------------------------------------------------- scores


def auroc(scores: Tensor, labels: Tensor) -> Tensor:
    """AUROC of every score column against every label column: ``(S, L)`` x ``(S, V)`` ->
    ``(L, V)``; NaN where a label column has no positives or no negatives. Ties count half."""
    s = scores.double()
    ordered = s.T.contiguous().sort(dim=1).values  # (L, S)
    queries = s.T.contiguous()
    below = torch.searchsorted(ordered, queries, right=False)  # (L, S) strictly smaller
    not_above = torch.searchsorted(ordered, queries, right=True)  # (L, S) smaller or equal
    ranks = (below + not_above + 1).double() / 2  # (L, S) 1-based mid-ranks
    y = labels.double()  # (S, V)
    positives = y.sum(0)  # (V,)
    negatives = y.shape[0] - positives
    rank_sum = ranks @ y  # (L, V) sum of the positives' ranks
    u = rank_sum - positives * (positives + 1) / 2
    area = u / (positives * negatives)
    area[:, (positives == 0) | (negatives == 0)] = math.nan
    return area.float()


def best_f1(scores: Tensor, labels: Tensor, *, chunk: int = 256) -> tuple[Tensor, Tensor]:
    """Best F1 over thresholds of every (score column, label column) pair, and its threshold.

    Predicts "present" where ``score >= t``; t ranges over each column's distinct positive
    values. Returns ``(f1 (L, V), threshold (L, V))``; a column that is never positive has F1 0
    and threshold inf.
    """
    n_latents = scores.shape[1]
    y = labels.float()  # (S, V)
    positives = y.sum(0)  # (V,)
    f1 = torch.zeros(n_latents, y.shape[1])
    threshold = torch.full((n_latents, y.shape[1]), math.inf)
    for start in range(0, n_latents, chunk):
        block = scores[:, start : start + chunk].float()  # (S, c)
        values, order = block.sort(dim=0, descending=True)  # (S, c)
        # Only cuts among positive values count, and they all sit in the first rows once sorted:
        # a sparse latent needs just its few firing inputs, not all S.
        depth = max(1, int((block > 0).sum(0).max()))
        values, order = values[:depth], order[:depth]  # (M, c)
        true_pos = y[order].cumsum(0)  # (M, c, V): positives among the top i+1
        predicted = torch.arange(1, depth + 1, dtype=torch.float32)[:, None, None]  # (M, 1, 1)
        score = 2 * true_pos / (predicted + positives)  # (S, c, V)
        # A cut is valid after the last of a run of equal values, and only among positives.
        last_of_run = torch.ones_like(values, dtype=torch.bool)
        last_of_run[:-1] = values[:-1] != values[1:]
        valid = last_of_run & (values > 0)  # (M, c)
        score = score.masked_fill(~valid[:, :, None], -1.0)
        best, at = score.max(0)  # (c, V)
        fired = best >= 0
        f1[start : start + chunk] = best.clamp_min(0)
        cut = values.T.gather(1, at)  # (c, V) the activation at the best cut
        threshold[start : start + chunk] = torch.where(fired, cut, torch.full_like(cut, math.inf))
    return f1, threshold


@dataclass
class ValueScore:
    """The latents that best track one factor value."""

    auroc_latent: int
    """The latent with the highest AUROC for this value."""
    auroc: float
    f1_latent: int
    """The latent with the best F1 for this value."""
    f1: float
    positives: int
    """Inputs that show the value."""


@dataclass
class FactorReport:
    """How the latents line up with the known factors (summary; matrices in FactorScores)."""

    samples: int
    """Labelled inputs that the cache holds."""
    coverage_auroc: float
    values_covered: int
    """Factor values with a latent of AUROC >= coverage_auroc."""
    values_total: int
    """Factor values with both positive and negative inputs."""
    track_auroc: float
    untracked_latents: int
    """Live latents whose best AUROC over all values is below track_auroc."""
    live_latents: int
    """Latents that fired on at least one labelled input."""
    per_value: dict[str, ValueScore]
    per_factor_covered: dict[str, float]
    """Per factor: the share of its values that are covered."""


@dataclass
class FactorScores:
    """Every (latent, value) score, and the summary."""

    value_names: list[str]
    auroc: Tensor
    """``(d_sae, V)``."""
    f1: Tensor
    """``(d_sae, V)`` best F1."""
    threshold: Tensor
    """``(d_sae, V)`` the activation threshold of the best F1."""
    live: Tensor
    """``(d_sae,)`` bool: fired on a labelled input."""
    report: FactorReport

    def best_value(self) -> tuple[list[str | None], Tensor]:
        """Per latent: the value with the highest AUROC (None for dead latents) and that AUROC."""
        filled = torch.nan_to_num(self.auroc, nan=-1.0)
        best, index = filled.max(1)  # (L,)
        names = [
            self.value_names[int(i)] if bool(alive) and b >= 0 else None
            for i, b, alive in zip(index, best, self.live, strict=True)
        ]
        return names, torch.where(self.live, best, torch.full_like(best, math.nan))

    def save(self, path: str | Path) -> Path:
        """The matrices as safetensors (value names in the metadata)."""
        from safetensors.torch import save_file

        path = Path(path)
        with atomic_path(path) as tmp:
            save_file(
                {
                    "auroc": self.auroc.contiguous(),
                    "f1": self.f1.contiguous(),
                    "threshold": self.threshold.contiguous(),
                    "live": self.live.to(torch.uint8),
                },
                str(tmp),
                metadata={"value_names": json.dumps(self.value_names)},
            )
        return path


def score_factors(
    activations: Tensor,
    labels: FactorLabels,
    *,
    seen: Tensor | None = None,
    coverage_auroc: float = COVERAGE_AUROC,
    track_auroc: float = TRACK_AUROC,
) -> FactorScores:
    """Score every latent against every factor value.

    ``activations`` ``(n_samples, d_sae)`` per input (see :func:`sample_activations`);
    ``seen`` marks the inputs present in the cache (others are left out).
    """
    n = min(activations.shape[0], labels.presence.shape[0])
    keep = torch.ones(n, dtype=torch.bool) if seen is None else seen[:n].clone()
    acts = activations[:n][keep]  # (S, L)
    presence = labels.presence[:n][keep]  # (S, V)
    if acts.shape[0] < 2:
        raise DataError(
            f"only {acts.shape[0]} labelled inputs are in the cache; factor scores need inputs "
            "with and without each value (do the labels' sample ids match the cache's inputs?)"
        )
    area = auroc(acts, presence)  # (L, V)
    f1, threshold = best_f1(acts, presence)
    live = (acts > 0).any(0)  # (L,)
    area = torch.where(live[:, None], area, torch.full_like(area, math.nan))
    defined = ~torch.isnan(area).all(0)  # (V,) values with positives and negatives

    per_value: dict[str, ValueScore] = {}
    filled = torch.nan_to_num(area, nan=-1.0)
    for v, name in enumerate(labels.value_names):
        if not bool(defined[v]):
            continue
        a_latent = int(filled[:, v].argmax())
        f_latent = int(f1[:, v].argmax())
        per_value[name] = ValueScore(
            a_latent,
            float(area[a_latent, v]),
            f_latent,
            float(f1[f_latent, v]),
            int(presence[:, v].sum()),
        )
    covered = {name for name, s in per_value.items() if s.auroc >= coverage_auroc}
    factors = labels.factors
    per_factor: dict[str, float] = {}
    for factor in dict.fromkeys(factors):
        names = [n for n, f in zip(labels.value_names, factors, strict=True) if f == factor]
        scored = [n for n in names if n in per_value]
        if scored:
            per_factor[factor] = sum(n in covered for n in scored) / len(scored)
    best = filled.max(1).values  # (L,)
    untracked = int((live & (best < track_auroc)).sum())
    report = FactorReport(
        samples=int(acts.shape[0]),
        coverage_auroc=coverage_auroc,
        values_covered=len(covered),
        values_total=int(defined.sum()),
        track_auroc=track_auroc,
        untracked_latents=untracked,
        live_latents=int(live.sum()),
        per_value=per_value,
        per_factor_covered=per_factor,
    )
    return FactorScores(list(labels.value_names), area, f1, threshold, live, report)


def labels_from_scenes(scenes: Sequence[Any]) -> FactorLabels:
    """Labels of testbed scenes (sample id i = scenes[i]), with the world's value names."""
    from ..testbed import world

    return FactorLabels(world.value_names(), torch.from_numpy(world.presence(scenes)))
