"""What a dashboard shows about each latent, gathered in one streaming pass over a cache.

Per latent: how often it fires, its mean and max activation, a uniform sample of its row
activations (the histogram), its top-activating inputs, and a uniform sample of the inputs it
fires on (split into activation quantiles for the page), each with its activation at every
position of the input (the patch or spatial heatmap, the highlighted tokens).

An input's activation is the max over its rows, and its heatmap needs all of its rows. The
cache writer shuffles rows only *within* a shuffle group, which always holds whole inputs; so the
pass reads the cache in storage order, one group at a time, keeps that group's sparse codes in
memory (rows x k entries), and when the group ends updates every latent's top list and sample
from it. Memory is one group's codes plus ``latents x (top_k + reservoir)`` heatmaps; the rows
are read once, sequentially.

Top lists and samples are merged with one sort per group: candidates are ordered by (latent,
score) and the first ``capacity`` of each latent are kept. The uniform sample keeps, per latent,
the candidates with the smallest random keys (a bottom-k sketch), which is a uniform sample
without replacement however the inputs were grouped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..configuration import ConfigError
from ..dictionaries import SparseAutoencoder
from ..evaluation.factors import SampleMaxAccumulator


@dataclass
class CollectConfig:
    """How much the pass keeps per latent."""

    top_k: int = 8
    """Top-activating inputs per latent."""
    reservoir: int = 48
    """Uniformly sampled inputs per latent (shown by activation quantile)."""
    histogram_values: int = 512
    """Uniformly sampled row activations per latent (the activation histogram)."""
    batch_size: int = 4096
    """Rows per batch."""
    max_rows: int = 0
    """Stop after this many rows (0: the whole cache). Whole shuffle groups are read."""
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("top_k", "reservoir", "histogram_values", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")


@dataclass
class Examples:
    """Selected (latent, input) pairs: ``latent``, ``sample`` and ``value`` are aligned ``(P,)``."""

    latent: Tensor
    sample: Tensor
    value: Tensor
    """The input's activation (max over its rows)."""
    key: Tensor
    """The sort key that selected it (the value for top lists, a random key for samples)."""
    by_latent: bool = False
    """Entries are sorted by latent (what :func:`keep_best` returns): lookups bisect."""

    @staticmethod
    def empty() -> Examples:
        return Examples(
            torch.empty(0, dtype=torch.long),
            torch.empty(0, dtype=torch.long),
            torch.empty(0),
            torch.empty(0),
        )

    def __len__(self) -> int:
        return int(self.latent.numel())

    def pair_keys(self) -> Tensor:
        return pair_key(self.latent, self.sample)

    def of(self, latent: int) -> tuple[Tensor, Tensor]:
        """(samples, values) of one latent, in selection order."""
        if self.by_latent:
            lo = int(torch.searchsorted(self.latent, latent))
            hi = int(torch.searchsorted(self.latent, latent, right=True))
            return self.sample[lo:hi], self.value[lo:hi]
        mask = self.latent == latent
        return self.sample[mask], self.value[mask]


def pair_key(latent: Tensor, sample: Tensor) -> Tensor:
    """One int64 per (latent, sample): sample ids must be below 2^32."""
    return latent.long() * (1 << 32) + sample.long()


def keep_best(pool: Examples, capacity: int, *, descending: bool) -> Examples:
    """The ``capacity`` entries of each latent with the largest (or smallest) key."""
    if len(pool) == 0:
        return pool
    order = torch.sort(pool.key, descending=descending, stable=True).indices
    order = order[torch.sort(pool.latent[order], stable=True).indices]  # by latent, then key
    latent = pool.latent[order]
    first = torch.searchsorted(latent, latent)  # index of each latent's first entry
    keep = order[(torch.arange(len(latent)) - first) < capacity]
    return Examples(
        pool.latent[keep], pool.sample[keep], pool.value[keep], pool.key[keep], by_latent=True
    )


def _cat(a: Examples, b: Examples) -> Examples:
    return Examples(
        torch.cat([a.latent, b.latent]),
        torch.cat([a.sample, b.sample]),
        torch.cat([a.value, b.value]),
        torch.cat([a.key, b.key]),
    )


@dataclass
class Heatmaps:
    """Activation of a latent at each position of an input, for the selected pairs."""

    key: Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))
    """``(E,)`` the pair (see :func:`pair_key`)."""
    position: Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))
    value: Tensor = field(default_factory=lambda: torch.empty(0))
    _sorted: bool = field(default=False, repr=False)

    def keep(self, keys: Tensor) -> None:
        self._sorted = False
        mask = torch.isin(self.key, keys)
        self.key, self.position, self.value = self.key[mask], self.position[mask], self.value[mask]

    def add(self, key: Tensor, position: Tensor, value: Tensor) -> None:
        self._sorted = False
        self.key = torch.cat([self.key, key])
        self.position = torch.cat([self.position, position])
        self.value = torch.cat([self.value, value])

    def sort(self) -> None:
        """Order the entries by (pair, position), so that :meth:`of` bisects."""
        order = self.position.argsort(stable=True)
        order = order[self.key[order].argsort(stable=True)]
        self.key, self.position, self.value = (
            self.key[order],
            self.position[order],
            self.value[order],
        )
        self._sorted = True

    def of(self, latent: int, sample: int) -> tuple[Tensor, Tensor]:
        """(positions, values) of one pair, sorted by position."""
        if not self._sorted:
            self.sort()
        key = latent * (1 << 32) + sample
        lo = int(torch.searchsorted(self.key, key))
        hi = int(torch.searchsorted(self.key, key, right=True))
        return self.position[lo:hi], self.value[lo:hi]


@dataclass
class LatentCollection:
    """The result of the pass."""

    d_sae: int
    rows: int
    """Rows read."""
    samples: int
    """Distinct inputs read."""
    fires: Tensor
    """``(d_sae,)`` int64 rows each latent fired on."""
    activation_sum: Tensor
    """``(d_sae,)`` float64."""
    max_activation: Tensor
    """``(d_sae,)`` float32."""
    input_fires: Tensor
    """``(d_sae,)`` int64 inputs each latent fired on (anywhere in the input)."""
    top: Examples
    """Up to ``top_k`` inputs per latent with the highest activation."""
    sampled: Examples
    """Up to ``reservoir`` inputs per latent drawn uniformly among those it fires on."""
    heatmaps: Heatmaps
    histogram: Examples
    """Up to ``histogram_values`` row activations per latent (``sample`` is unused)."""
    positions: int
    """The largest position seen plus one (positions per input)."""
    sample_ids: Tensor
    """``(samples,)`` the ids of the inputs read, ascending."""
    hookpoint: str = ""
    """The cache's name of the hookpoint read."""
    sample_shape: list[int] = field(default_factory=list)
    """The hooked tensor's shape per input, as the cache recorded it."""
    sample_activations: Tensor | None = None
    """``(n_samples, d_sae)`` every input's activation (max over its rows) for the inputs with
    ids below ``n_samples``, when asked for (factor scores)."""

    @property
    def density(self) -> Tensor:
        """``(d_sae,)`` fraction of rows each latent fires on."""
        return self.fires.double() / max(self.rows, 1)

    @property
    def mean_activation(self) -> Tensor:
        """``(d_sae,)`` mean activation over the rows where the latent fires."""
        return self.activation_sum / self.fires.clamp_min(1).double()


def _group_bounds(reader: Any) -> list[int]:
    """Row offsets (in storage order) where each shuffle group of the reader's shards ends."""
    bounds: list[int] = []
    rows = 0
    previous = None
    for path, record in reader.hookpoint.shards:
        group = (str(path.parent), record.group)
        if previous is not None and group != previous:
            bounds.append(rows)
        rows += record.rows
        previous = group
    bounds.append(rows)
    return bounds


class _Collector:
    def __init__(self, d_sae: int, cfg: CollectConfig, n_samples: int = 0) -> None:
        self.d_sae, self.cfg = d_sae, cfg
        self.per_sample = SampleMaxAccumulator(n_samples, d_sae) if n_samples else None
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.rows = 0
        self.fires = torch.zeros(d_sae, dtype=torch.long)
        self.input_fires = torch.zeros(d_sae, dtype=torch.long)
        self.sum = torch.zeros(d_sae, dtype=torch.float64)
        self.max = torch.zeros(d_sae)
        self.top = Examples.empty()
        self.sampled = Examples.empty()
        self.histogram = Examples.empty()
        self.heatmaps = Heatmaps()
        self.positions = 0
        self.sample_ids: list[Tensor] = []
        self._group: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []

    def add_rows(self, codes: Any, sample: Tensor, position: Tensor) -> None:
        """The sparse codes of rows of the current group, with each row's input and position."""
        self.rows += codes.n_rows
        self.sample_ids.append(sample.unique())
        if self.per_sample is not None:  # inputs where nothing fires are still inputs
            inside = self.sample_ids[-1]
            inside = inside[(inside >= 0) & (inside < self.per_sample.n_samples)]
            self.per_sample.seen[inside.long()] = True
        self.positions = max(self.positions, int(position.max()) + 1 if position.numel() else 0)
        active = codes.values > 0
        latent = codes.indices[active].cpu().long()
        value = codes.values[active].detach().float().cpu()
        row = codes.rows()[active].cpu()
        self.fires += torch.bincount(latent, minlength=self.d_sae)
        self.sum.index_add_(0, latent, value.double())
        self.max.scatter_reduce_(0, latent, value, reduce="amax")
        self._group.append((latent, sample.long()[row], position.long()[row], value))

    def end_group(self) -> None:
        """Fold the group's inputs (now complete) into the top lists, samples and heatmaps."""
        if not self._group:
            return
        latent, sample, position, value = (
            torch.cat(parts) for parts in zip(*self._group, strict=True)
        )
        self._group = []
        # A uniform sample of row activations per latent (the histogram), merged once a group.
        random = torch.rand(len(latent), generator=self.generator)
        rows = Examples(latent, torch.zeros_like(latent), value, random)
        self.histogram = keep_best(
            _cat(self.histogram, rows), self.cfg.histogram_values, descending=False
        )
        keys = pair_key(latent, sample)  # (E,)
        unique, inverse = torch.unique(keys, return_inverse=True)  # (P,)
        pair_max = torch.zeros(len(unique)).scatter_reduce_(0, inverse, value, reduce="amax")
        pair_latent, pair_sample = unique // (1 << 32), unique % (1 << 32)
        self.input_fires += torch.bincount(pair_latent, minlength=self.d_sae)
        if self.per_sample is not None:
            self.per_sample.add_pairs(pair_latent, pair_sample, pair_max)
        candidates = Examples(pair_latent, pair_sample, pair_max, pair_max)
        self.top = keep_best(_cat(self.top, candidates), self.cfg.top_k, descending=True)
        random = torch.rand(len(unique), generator=self.generator)
        drawn = Examples(pair_latent, pair_sample, pair_max, random)
        self.sampled = keep_best(_cat(self.sampled, drawn), self.cfg.reservoir, descending=False)
        # Heatmaps: keep the pairs still selected; add this group's selected pairs, one value per
        # (pair, position) (the max over denoising steps and CFG halves at that position).
        selected = torch.cat([self.top.pair_keys(), self.sampled.pair_keys()]).unique()
        self.heatmaps.keep(selected)
        mine = torch.isin(keys, selected)
        if mine.any():
            pairs, pair_id = torch.unique(keys[mine], return_inverse=True)
            cell = pair_id * (1 << 20) + position[mine]  # positions are below 2^20
            cells, where = torch.unique(cell, return_inverse=True)
            cell_value = torch.zeros(len(cells)).scatter_reduce_(
                0, where, value[mine], reduce="amax"
            )
            self.heatmaps.add(pairs[cells // (1 << 20)], cells % (1 << 20), cell_value)

    def result(self, hookpoint: Any) -> LatentCollection:
        ids = torch.cat(self.sample_ids).unique() if self.sample_ids else torch.empty(0)
        return LatentCollection(
            d_sae=self.d_sae,
            rows=self.rows,
            samples=int(ids.numel()),
            fires=self.fires,
            activation_sum=self.sum,
            max_activation=self.max,
            input_fires=self.input_fires,
            top=self.top,
            sampled=self.sampled,
            heatmaps=self.heatmaps,
            histogram=self.histogram,
            positions=self.positions,
            sample_ids=ids,
            hookpoint=hookpoint.name,
            sample_shape=list(hookpoint.record.sample_shape),
            sample_activations=None if self.per_sample is None else self.per_sample.activations,
        )


@torch.no_grad()
def collect(
    sae: SparseAutoencoder,
    cache: Any,
    *,
    hookpoint: str | None = None,
    config: CollectConfig | None = None,
    n_samples: int = 0,
    device: torch.device | str | None = None,
) -> LatentCollection:
    """One pass over ``cache`` (a directory or view) at ``hookpoint`` (default: the dictionary's
    or the only one): everything the dashboard shows about every latent; with ``n_samples``,
    also every input's activation (ids below ``n_samples``) for factor scores."""
    from ..cache import CacheBatch, CacheReader, open_cache

    cfg = config or CollectConfig()
    view = open_cache(cache) if not hasattr(cache, "hookpoints") else cache
    if hookpoint is None and sae.cfg.hookpoint is not None:
        matches = [
            h.name
            for h in view.hookpoints.values()
            if h.record.module == sae.cfg.hookpoint and h.record.capture == sae.cfg.capture
        ]
        hookpoint = matches[0] if len(matches) == 1 else None
    reader = CacheReader(view, hookpoint, cfg.batch_size, epochs=1, shuffle=False, metadata=True)
    if reader.d_in != sae.d_in:
        from ..sources import DataError

        raise DataError(
            f"the cache's hookpoint {reader.hookpoint.name} has width {reader.d_in} but the "
            f"dictionary reads d_in={sae.d_in}"
        )
    device = torch.device(device) if device is not None else sae.device
    bounds = _group_bounds(reader)
    collector = _Collector(sae.d_sae, cfg, n_samples)
    offset, group = 0, 0
    try:
        for batch in reader:
            assert isinstance(batch, CacheBatch)  # metadata=True
            x, meta = batch.activations, batch.metadata
            start = 0
            while start < x.shape[0]:
                while offset == bounds[group]:  # an empty group
                    collector.end_group()
                    group += 1
                stop = min(x.shape[0], start + bounds[group] - offset)
                rows = x[start:stop].to(device=device, dtype=sae.dtype)  # (n, d)
                codes = sae.encode(rows)
                collector.add_rows(codes, meta["sample"][start:stop], meta["position"][start:stop])
                offset += stop - start
                start = stop
                if offset == bounds[group]:
                    collector.end_group()
                    group += 1
                    if cfg.max_rows and offset >= cfg.max_rows:
                        return collector.result(reader.hookpoint)
    finally:
        reader.close()
    collector.end_group()
    return collector.result(reader.hookpoint)


def quantile_examples(
    collection: LatentCollection, latent: int, bands: int, per_band: int
) -> list[tuple[float, float, list[tuple[int, float]]]]:
    """The sampled inputs of ``latent`` split into ``bands`` activation quantile bands (highest
    first): ``[(low, high, [(sample, value), ...]), ...]`` with up to ``per_band`` per band."""
    samples, values = collection.sampled.of(latent)
    if values.numel() == 0:
        return []
    order = values.argsort(descending=True)
    samples, values = samples[order], values[order]
    out = []
    n = values.numel()
    for band in range(bands):
        lo, hi = math.floor(band * n / bands), math.floor((band + 1) * n / bands)
        if hi <= lo:
            continue
        chosen = list(range(lo, hi))[:: max(1, (hi - lo) // per_band)][:per_band]
        out.append(
            (
                float(values[hi - 1]),
                float(values[lo]),
                [(int(samples[i]), float(values[i])) for i in chosen],
            )
        )
    return out
