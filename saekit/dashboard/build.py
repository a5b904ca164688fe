"""Build the dashboard of a dictionary: one pass over its cache, then static files.

    build_dashboard(sae, "runs/heldout-cache", "site/")        # opens as site/index.html

What a page shows depends on what is known: thumbnails and heatmaps when the cache's inputs are
images (or prompts of a text-to-image model that can remake its samples), highlighted tokens
when a tokenizer is given, factor scores with labels, nearest words with a CLIP model, and a
steering preview with a text-to-image model.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..configuration import ConfigError
from ..dictionaries import SparseAutoencoder
from ..evaluation.factors import FactorLabels, FactorScores, score_factors
from .collect import CollectConfig, LatentCollection, collect, quantile_examples
from .inputs import PositionLayout, SourceInputs, infer_layout, save_thumbnail
from .render import (
    INDEX_COLUMNS,
    ExampleCard,
    LatentPage,
    SiteMeta,
    SteeringView,
    index_html,
    index_script,
    latent_html,
    page_name,
    write_assets,
    write_text,
)
from .steering_preview import Generate, steering_grid


@dataclass
class DashboardConfig:
    """What the dashboard shows."""

    top_k: int = 8
    """Top-activating inputs per latent."""
    quantiles: int = 4
    """Activation quantile bands shown below the top inputs."""
    per_quantile: int = 4
    """Inputs shown per band."""
    reservoir: int = 48
    """Inputs sampled per latent to draw the bands from."""
    histogram_bins: int = 24
    max_pages: int = 0
    """Latent pages to write, the most frequently active first (0: every live latent)."""
    factors_shown: int = 5
    words_shown: int = 6
    batch_size: int = 4096
    max_rows: int = 0
    """Rows of the cache to read (whole shuffle groups; 0: all)."""
    seed: int = 0
    title: str | None = None

    def __post_init__(self) -> None:
        for name in ("top_k", "quantiles", "per_quantile", "reservoir", "histogram_bins"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_pages < 0:
            raise ValueError(
                f"max_pages must be 0 (all live latents) or positive, got {self.max_pages}"
            )


@dataclass
class SteeringSpec:
    """A steering preview for a text-to-image model."""

    generate: Generate
    model: Any
    """The module (or adapter) whose ``named_modules()`` path is the dictionary's hookpoint."""
    prompt: str
    seeds: Sequence[int] = (0, 1, 2)
    multipliers: Sequence[float] = (0.0, 1.0, 2.0, 4.0)
    latents: int | Sequence[int] = 8
    """How many latents get a preview (the most frequently active first), or which."""
    hookpoint: str | None = None
    """Default: the dictionary's."""


@dataclass
class DashboardResult:
    index: Path
    pages: int
    thumbnails: int
    rows: int
    seconds: float
    collection: LatentCollection = field(repr=False)
    factors: FactorScores | None = field(default=None, repr=False)


def _histogram(values: torch.Tensor, maximum: float, bins: int) -> tuple[list[float], list[int]]:
    if values.numel() == 0 or maximum <= 0:
        return [0.0, 1.0], [0]
    edges = torch.linspace(0, maximum, bins + 1)
    index = (values / maximum * bins).long().clamp(0, bins - 1)
    counts = torch.bincount(index, minlength=bins)
    return [round(float(e), 5) for e in edges], [int(c) for c in counts]


def _default_inputs(view: Any) -> SourceInputs | None:
    from ..cache import InputConfig, open_inputs
    from ..configuration import ConfigError, from_dict

    data = (view.first.config or {}).get("data")
    if not data:
        return None
    try:
        return SourceInputs(open_inputs(from_dict(InputConfig, data)))
    except (ConfigError, OSError, ValueError):
        return None  # the inputs moved or are gone: pages show ids and values only


class _Site:
    """Writes thumbnails once per input and builds example cards."""

    def __init__(
        self,
        root: Path,
        collection: LatentCollection,
        inputs: SourceInputs | None,
        layout: PositionLayout,
    ) -> None:
        self.root, self.collection, self.inputs, self.layout = root, collection, inputs, layout
        self.thumbs: dict[int, str | None] = {}

    def thumb(self, sample: int) -> str | None:
        if sample not in self.thumbs:
            image = self.inputs.image(sample) if self.inputs is not None else None
            if image is None:
                self.thumbs[sample] = None
            else:
                relative = f"thumbs/{sample}.png"
                save_thumbnail(image, self.root / relative)
                self.thumbs[sample] = relative
        return self.thumbs[sample]

    def card(self, latent: int, sample: int, value: float) -> ExampleCard:
        positions, values = self.collection.heatmaps.of(latent, sample)
        text = self.inputs.text(sample) if self.inputs is not None else ""
        card = ExampleCard(sample, value, text)
        layout = self.layout
        if layout.kind == "grid" and layout.grid is not None:
            card.thumb = self.thumb(sample)
            card.heat = (layout.grid[0], layout.grid[1], layout.grid_values(positions, values))
            cls = values[positions < layout.offset]
            if cls.numel() and float(cls.max()) > 0:  # the CLS token has no place on the grid
                card.note = f"CLS {float(cls.max()):.3f}"
        elif layout.kind == "tokens":
            tokens = self.inputs.tokens(sample) if self.inputs is not None else None
            if tokens is not None:
                dense = torch.zeros(len(tokens))
                inside = positions < len(tokens)
                dense[positions[inside]] = values[inside]
                card.tokens = list(zip(tokens, (float(v) for v in dense), strict=True))
        else:
            card.thumb = self.thumb(sample)
        return card


def build_dashboard(
    sae: SparseAutoencoder,
    cache: Any,
    output_dir: str | Path,
    *,
    hookpoint: str | None = None,
    config: DashboardConfig | None = None,
    inputs: SourceInputs | None = None,
    labels: FactorLabels | None = None,
    words: list[list[tuple[str, float]]] | None = None,
    steering: SteeringSpec | None = None,
    device: torch.device | str | None = None,
    progress: Callable[[str], None] | None = None,
) -> DashboardResult:
    """Write the dashboard of ``sae`` on ``cache`` into ``output_dir`` (``index.html`` and
    ``latents/*.html``). ``inputs`` default to the source recorded in the cache's manifest;
    ``labels`` add factor scores; ``words`` (per latent) the nearest vocabulary words;
    ``steering`` a preview grid per latent."""
    from ..cache import open_cache

    began = time.perf_counter()
    cfg = config or DashboardConfig()
    say = progress or (lambda message: None)
    root = Path(output_dir)
    view = open_cache(cache) if not hasattr(cache, "hookpoints") else cache
    collection = collect(
        sae,
        view,
        hookpoint=hookpoint,
        config=CollectConfig(
            top_k=cfg.top_k,
            reservoir=cfg.reservoir,
            batch_size=cfg.batch_size,
            max_rows=cfg.max_rows,
            seed=cfg.seed,
        ),
        n_samples=0 if labels is None else len(labels.presence),
        device=device,
    )
    say(f"read {collection.rows:,} rows of {collection.samples:,} inputs")
    factors = None
    if labels is not None and collection.sample_activations is not None:
        factors = score_factors(collection.sample_activations, labels)
    inputs = inputs if inputs is not None else _default_inputs(view)
    record = view.hookpoint(collection.hookpoint).record
    modality = inputs.modality if inputs is not None else "none"
    layout = infer_layout(collection.sample_shape, sae.d_in, collection.positions, modality)

    live = (collection.input_fires > 0).nonzero().squeeze(1)
    order = live[collection.input_fires[live].argsort(descending=True, stable=True)]
    with_pages = order if cfg.max_pages == 0 else order[: cfg.max_pages]
    page_set = {int(i) for i in with_pages}

    best_names: list[str | None] = [None] * sae.d_sae
    best_auroc = torch.full((sae.d_sae,), float("nan"))
    if factors is not None:
        best_names, best_auroc = factors.best_value()

    previews: dict[int, SteeringView] = {}
    if steering is not None:
        previews = _steering_previews(steering, sae, collection, order, root)
        say(f"steering previews for {len(previews)} latents")

    site = _Site(root, collection, inputs, layout)
    title = cfg.title or f"{sae.cfg.hookpoint or 'dictionary'} · {sae.cfg.name}"
    meta = SiteMeta(
        title=title,
        facts=[
            ("latents", f"{sae.d_sae:,}"),
            ("live", f"{len(live):,}"),
            ("rows", f"{collection.rows:,}"),
            ("inputs", f"{collection.samples:,}"),
            ("model", str(sae.cfg.model or "–")),
            ("hookpoint", f"{sae.cfg.hookpoint or record.module} ({record.capture})"),
        ]
        + (
            [
                (
                    "factor values covered",
                    f"{factors.report.values_covered}/{factors.report.values_total}",
                )
            ]
            if factors is not None
            else []
        ),
        d_sae=sae.d_sae,
        layout=_describe_layout(layout),
    )
    density = collection.density
    mean = collection.mean_activation
    for count, latent in enumerate(with_pages.tolist()):
        page = LatentPage(
            latent=latent,
            density=float(density[latent]),
            fires=int(collection.fires[latent]),
            inputs=int(collection.input_fires[latent]),
            max_activation=float(collection.max_activation[latent]),
            mean_activation=float(mean[latent]),
            histogram=_histogram(
                collection.histogram.of(latent)[1],
                float(collection.max_activation[latent]),
                cfg.histogram_bins,
            ),
        )
        top_samples, top_values = collection.top.of(latent)
        page.top = [
            site.card(latent, int(s), float(v))
            for s, v in zip(top_samples, top_values, strict=True)
        ]
        page.bands = [
            (lo, hi, [site.card(latent, s, v) for s, v in chosen])
            for lo, hi, chosen in quantile_examples(
                collection, latent, cfg.quantiles, cfg.per_quantile
            )
        ]
        if factors is not None:
            ranked = torch.nan_to_num(factors.auroc[latent], nan=-1.0).argsort(descending=True)
            page.factors = [
                (
                    factors.value_names[int(v)],
                    float(factors.auroc[latent, v]),
                    float(factors.f1[latent, v]),
                )
                for v in ranked[: cfg.factors_shown]
                if not torch.isnan(factors.auroc[latent, v])
            ]
        if words is not None:
            page.words = words[latent][: cfg.words_shown]
        page.steering = previews.get(latent)
        write_text(root / page_name(latent, sae.d_sae), latent_html(page, meta))
        if count and count % 500 == 0:
            say(f"{count:,} latent pages written")

    rows = []
    for latent in range(sae.d_sae):
        top_samples, _ = collection.top.of(latent)
        thumb = (
            site.thumb(int(top_samples[0]))
            if top_samples.numel() and layout.kind != "tokens"
            else None
        )
        rows.append(
            [
                latent,
                thumb,
                float(density[latent]),
                float(collection.max_activation[latent]),
                float(mean[latent]),
                int(collection.input_fires[latent]),
                best_names[latent],
                float(best_auroc[latent]),
                ", ".join(w for w, _ in words[latent][:3]) if words is not None else "",
                page_name(latent, sae.d_sae) if latent in page_set else None,
            ]
        )
    assert len(rows[0]) == len(INDEX_COLUMNS)
    write_assets(root)
    write_text(root / "data" / "index.js", index_script(rows, meta))
    write_text(root / "index.html", index_html(meta))
    (root / "data" / "built.txt").write_text(
        f"saekit dashboard built {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}\n"
    )
    return DashboardResult(
        index=root / "index.html",
        pages=len(page_set),
        thumbnails=sum(1 for t in site.thumbs.values() if t),
        rows=collection.rows,
        seconds=round(time.perf_counter() - began, 2),
        collection=collection,
        factors=factors,
    )


def _describe_layout(layout: PositionLayout) -> str:
    if layout.kind == "grid" and layout.grid is not None:
        h, w = layout.grid
        after = " after a CLS token" if layout.offset else ""
        return f"Heatmaps: the latent's activation on each cell of a {h} x {w} grid{after}."
    if layout.kind == "tokens":
        return "Tokens are shaded by the latent's activation at each position."
    return "One activation per input (max over its positions)."


def _steering_previews(
    spec: SteeringSpec,
    sae: SparseAutoencoder,
    collection: LatentCollection,
    order: torch.Tensor,
    root: Path,
) -> dict[int, SteeringView]:
    from .inputs import tensor_to_pil

    latents = (
        [int(i) for i in order[: spec.latents]]
        if isinstance(spec.latents, int)
        else list(spec.latents)
    )
    hookpoint = spec.hookpoint or sae.cfg.hookpoint
    if hookpoint is None:
        raise ValueError("the dictionary names no hookpoint; give SteeringSpec.hookpoint")
    views = {}
    for latent in latents:
        scale = float(collection.max_activation[latent]) or 1.0
        grid = steering_grid(
            spec.generate,
            spec.model,
            hookpoint,
            sae.cfg.capture,
            sae.W_dec[latent].detach(),
            latent=latent,
            prompt=spec.prompt,
            scale=scale,
            multipliers=spec.multipliers,
            seeds=spec.seeds,
        )
        paths = []
        for i in range(len(grid.strengths)):
            row = []
            for j, seed in enumerate(grid.seeds):
                relative = f"steer/{latent}/{i}-{seed}.png"
                save_thumbnail(tensor_to_pil(grid.images[i, j]), root / relative, size=96)
                row.append(relative)
            paths.append(row)
        views[latent] = SteeringView(
            spec.prompt, grid.multipliers, grid.strengths, grid.seeds, paths
        )
    return views
