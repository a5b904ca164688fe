"""Concept selection: which latents carry a concept, per hookpoint and per denoising step.

Given activations of inputs with the concept (prompts that name it, images that show it, scenes
with a factor value) and without it, every latent is scored by SAeUron's normalised
mean-activation difference (Cywinski & Deja 2025, eq. 4):

    score(i, t) = mu(i, t, D_c) / sum_j mu(j, t, D_c)  -  mu(i, t, D_not_c) / sum_j mu(j, t, D_not_c)

where ``mu(i, t, D)`` is latent ``i``'s mean activation over every row (token, feature-map
position) of the inputs ``D`` at denoising step ``t``. Normalising by the total activation makes
the two sets comparable when one activates the dictionary more overall. The latents above a
percentile of the scores (SAeUron), or the top ``count``, are selected; each selected latent's
typical activation (its mean value where it fires on the concept) is kept so that relative
strengths mean the same for every latent.

The score rewards a latent that fires *more* with the concept, not one that fires *only* with
it. A latent shared by the concept's word and an unrelated word (common in dictionaries of token
embeddings, where each word is a sum of a few shared latents), or another concept's latent that
co-occurs with this one by chance in the two sets, can score as high as a pure one, and editing
it wherever it fires edits the other concept too. Each selected latent's *specificity* is
therefore kept as well: the share of its normalised mean activation that falls on the inputs
with the concept,

    specificity(i, t) = a(i, t) / (a(i, t) + b(i, t))

with ``a`` and ``b`` the two normalised means above (0.5: fires alike with and without the
concept; 1: only with it; the latent's precision as a detector of the concept). Unlearning uses
the specific latents as the concept's *detectors*: every selected latent is edited, but only on
rows where a detector fires (:func:`~.unlearn.unlearn_interventions`).

A :class:`Selection` is a small JSON file that ``saekit steer`` and ``saekit unlearn`` read.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..adapters.base import Rows
from ..dictionaries import SparseAutoencoder

SELECTION_VERSION = 1


@dataclass
class LatentStats:
    """Per-latent statistics of a set of rows."""

    mean: Tensor
    """``(d_sae,)`` mean activation over all rows (0 where a latent is off)."""
    firing_mean: Tensor
    """``(d_sae,)`` mean activation over the rows where the latent fires (0 if it never does)."""
    rows: int


@torch.no_grad()
def latent_stats(sae: SparseAutoencoder, rows: Tensor, *, batch_size: int = 4096) -> LatentStats:
    """:class:`LatentStats` of ``rows`` ``(N, d_in)`` under ``sae``."""
    total = torch.zeros(sae.d_sae, dtype=torch.float64)
    fired = torch.zeros(sae.d_sae, dtype=torch.float64)
    for start in range(0, rows.shape[0], batch_size):
        chunk = rows[start : start + batch_size].to(device=sae.device, dtype=sae.dtype)
        codes = sae.encode(chunk)
        values = codes.values.double().cpu()
        indices = codes.indices.cpu()
        total.index_add_(0, indices, values)
        fired.index_add_(0, indices, (values > 0).double())
    n = max(rows.shape[0], 1)
    return LatentStats(
        (total / n).float(), (total / fired.clamp_min(1)).float(), int(rows.shape[0])
    )


def saeuron_scores(with_concept: Tensor, without_concept: Tensor) -> Tensor:
    """``(d_sae,)`` normalised mean-activation differences of two ``(d_sae,)`` mean vectors."""
    eps = torch.finfo(torch.float32).tiny
    a = with_concept.float() / with_concept.float().sum().clamp_min(eps)
    b = without_concept.float() / without_concept.float().sum().clamp_min(eps)
    return a - b


def specificities(with_concept: Tensor, without_concept: Tensor) -> Tensor:
    """``(d_sae,)`` share of each latent's normalised mean activation that falls on the inputs
    with the concept, from the same two ``(d_sae,)`` mean vectors (0 for a latent that never
    fires)."""
    eps = torch.finfo(torch.float32).tiny
    a = with_concept.float() / with_concept.float().sum().clamp_min(eps)
    b = without_concept.float() / without_concept.float().sum().clamp_min(eps)
    return a / (a + b).clamp_min(eps)


def pick(scores: Tensor, *, count: int | None = None, percentile: float | None = None) -> Tensor:
    """Latent ids by descending score: the top ``count``, or those above the ``percentile``-th
    percentile (e.g. 99.9 keeps the top 0.1%); only latents with a positive score."""
    if (count is None) == (percentile is None):
        raise ValueError("give exactly one of count= or percentile=")
    order = torch.argsort(scores, descending=True, stable=True)
    if count is not None:
        if count < 1:
            raise ValueError(f"count must be at least 1, got {count}")
        chosen = order[:count]
    else:
        assert percentile is not None
        if not 0 <= percentile < 100:
            raise ValueError(f"percentile must be in [0, 100), got {percentile}")
        threshold = torch.quantile(scores.float(), percentile / 100)
        chosen = order[scores[order] > threshold]
    return chosen[scores[chosen] > 0]


@dataclass
class SelectionEntry:
    """The latents selected at one hookpoint (and one denoising step)."""

    hookpoint: str
    features: list[int]
    scores: list[float]
    typical: list[float]
    """Each feature's typical activation (its mean where it fires on the concept)."""
    step: int | None = None
    """Denoising step index; None: every call (no steps, or scored over all steps)."""
    timestep: float | None = None
    specificity: list[float] | None = None
    """Each feature's specificity (see the module's docstring); None in files written before
    saekit recorded it (then every feature counts as a detector)."""

    def detectors(self, min_specificity: float) -> list[int]:
        """The features whose specificity is at least ``min_specificity``: the latents that say
        the concept is present on a row. Every feature when none is that specific (or the
        specificity is unknown), so a concept never loses its edit."""
        if self.specificity is None:
            return list(self.features)
        specific = [
            f for f, s in zip(self.features, self.specificity, strict=True) if s >= min_specificity
        ]
        return specific or list(self.features)


@dataclass
class Selection:
    """A concept's latents, as written to and read from a small JSON file."""

    concept: str
    entries: list[SelectionEntry] = field(default_factory=list)
    method: str = "saeuron"
    meta: dict[str, Any] = field(default_factory=dict)

    def features(self, hookpoint: str, step: int | None = None) -> list[int]:
        return [
            f
            for e in self.entries
            if e.hookpoint == hookpoint and (step is None or e.step in (None, step))
            for f in e.features
        ]

    def typical_tensor(self, hookpoint: str, d_sae: int) -> Tensor | None:
        """``(d_sae,)`` typical activations of the selected latents at ``hookpoint`` (0
        elsewhere; the mean over steps where a latent is selected at several), or None."""
        entries = [e for e in self.entries if e.hookpoint == hookpoint]
        if not entries:
            return None
        total = torch.zeros(d_sae)
        count = torch.zeros(d_sae)
        for entry in entries:
            index = torch.tensor(entry.features, dtype=torch.long)
            total.index_add_(0, index, torch.tensor(entry.typical, dtype=torch.float32))
            count.index_add_(0, index, torch.ones(len(entry.features)))
        return total / count.clamp_min(1)

    def to_dict(self) -> dict[str, Any]:
        return {"version": SELECTION_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Selection:
        version = data.get("version", SELECTION_VERSION)
        if version != SELECTION_VERSION:
            raise ValueError(
                f"selection file version {version} is not supported (this saekit reads "
                f"{SELECTION_VERSION}); rerun the selection"
            )
        entries = [SelectionEntry(**e) for e in data.get("entries", [])]
        return cls(
            str(data["concept"]),
            entries,
            str(data.get("method", "saeuron")),
            dict(data.get("meta", {})),
        )

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Selection:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no selection file at {path}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not a selection file (bad JSON: {err})") from None
        if not isinstance(data, dict) or "concept" not in data:
            raise ValueError(f"{path} is not a selection file (no 'concept')")
        return cls.from_dict(data)


def _groups(rows: Rows | Tensor, per_step: bool) -> dict[int | None, tuple[Tensor, float | None]]:
    """Rows split by denoising step (``None``: all rows together)."""
    if isinstance(rows, Tensor) or not per_step or rows.step is None:
        values = rows if isinstance(rows, Tensor) else rows.values
        return {None: (values, None)}
    out: dict[int | None, tuple[Tensor, float | None]] = {}
    for step in torch.unique(rows.step).tolist():
        keep = rows.step == step
        timestep = None if rows.timestep is None else float(rows.timestep[keep][0])
        out[int(step)] = (rows.values[keep], timestep)
    return out


def select_concept(
    concept: str,
    saes: Mapping[str, SparseAutoencoder],
    with_concept: Mapping[str, Rows | Tensor],
    without_concept: Mapping[str, Rows | Tensor],
    *,
    count: int | None = None,
    percentile: float | None = None,
    per_step: bool = True,
    batch_size: int = 4096,
) -> Selection:
    """Score and select ``concept``'s latents at every hookpoint of ``saes`` from the rows of
    inputs with and without it (``Rows`` with a step column are scored per step when
    ``per_step``; plain ``(N, d)`` tensors as one group)."""
    selection = Selection(concept, meta={"count": count, "percentile": percentile})
    for hookpoint, sae in saes.items():
        if hookpoint not in with_concept or hookpoint not in without_concept:
            raise ValueError(f"no rows of {hookpoint!r} with and without {concept!r}")
        positive = _groups(with_concept[hookpoint], per_step)
        negative = _groups(without_concept[hookpoint], per_step)
        for step, (rows, timestep) in positive.items():
            if step not in negative:
                raise ValueError(f"step {step} at {hookpoint!r} has no rows without {concept!r}")
            pos = latent_stats(sae, rows, batch_size=batch_size)
            neg = latent_stats(sae, negative[step][0], batch_size=batch_size)
            scores = saeuron_scores(pos.mean, neg.mean)
            chosen = pick(scores, count=count, percentile=percentile)
            specificity = specificities(pos.mean, neg.mean)[chosen]
            selection.entries.append(
                SelectionEntry(
                    hookpoint,
                    chosen.tolist(),
                    [round(float(s), 8) for s in scores[chosen]],
                    [round(float(t), 6) for t in pos.firing_mean[chosen]],
                    step,
                    timestep,
                    [round(float(s), 4) for s in specificity],
                )
            )
    return selection


def merge_features(
    selections: Iterable[Selection], *, min_specificity: float | None = None
) -> dict[tuple[str, int | None], list[int]]:
    """``(hookpoint, step) -> features``: the union of several selections' latents (each
    latent once, so one edited twice is not scaled twice); with ``min_specificity``, only their
    detectors (:meth:`SelectionEntry.detectors`)."""
    out: dict[tuple[str, int | None], list[int]] = {}
    for selection in selections:
        for entry in selection.entries:
            features = out.setdefault((entry.hookpoint, entry.step), [])
            kept = entry.features
            if min_specificity is not None:
                kept = entry.detectors(min_specificity)
            features.extend(f for f in kept if f not in features)
    return out


def rows_of(values: Sequence[Rows]) -> Rows:
    """Rows concatenated (to pool several batches of captures)."""

    def cat(name: str) -> Tensor | None:
        columns = [getattr(r, name) for r in values]
        return None if any(c is None for c in columns) else torch.cat(columns)

    return Rows(
        torch.cat([r.values for r in values]),
        torch.cat([r.sample for r in values]),
        torch.cat([r.position for r in values]),
        cat("step"),
        cat("timestep"),
        cat("branch"),
        cat("stream"),
    )


@torch.no_grad()
def collect_rows(
    model: Any,
    hookpoints: Sequence[str],
    samples: Sequence[Any],
    *,
    batch_size: int = 16,
    branch: str | None = "cond",
) -> dict[str, Rows]:
    """Rows of ``hookpoints`` for ``samples`` (``Sample`` s, or prompts), through the adapter's
    own feed (what caching does; a diffusion pipeline runs its full denoising loop, every step
    recorded), in memory. ``branch``: keep one CFG half (``cond``/``uncond``) or None for both.
    For selection sets of a few hundred inputs; larger sets belong in a cache."""
    from ..adapters import adapter_for
    from ..adapters.base import BRANCH_NAMES, InputBatch, Sample
    from ..cache.capture import ActivationCapture, Hookpoint

    adapter = adapter_for(model)
    points = []
    for name in hookpoints:
        module, at, capture = name.partition("@")
        points.append(Hookpoint(name, module, capture if at else "output"))  # type: ignore[arg-type]
    items = [
        s if isinstance(s, Sample) else Sample(i, prompt=str(s)) for i, s in enumerate(samples)
    ]
    found: dict[str, list[Rows]] = {p.name: [] for p in points}

    def on_capture(point: Hookpoint, tensor: Tensor, context: Any) -> None:
        rows = adapter.flatten(point.module, tensor, context)
        if branch is not None and rows.branch is not None:
            rows = rows.select(rows.branch == BRANCH_NAMES[branch])
        found[point.name].append(
            Rows(
                rows.values.float().cpu(),
                rows.sample.cpu(),
                rows.position.cpu(),
                *(
                    None if c is None else c.cpu()
                    for c in (rows.step, rows.timestep, rows.branch, rows.stream)
                ),
            )
        )

    with ActivationCapture(adapter, points, on_capture, early_stop=False) as capturer:
        for start in range(0, len(items), batch_size):
            capturer.run(InputBatch(list(items[start : start + batch_size])))
    return {name: rows_of(parts) for name, parts in found.items() if parts}
