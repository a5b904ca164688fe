"""Reconstruction and sparsity metrics of a dictionary, accumulated over batches in one pass.

What the field reports for a sparse autoencoder (Gao et al. 2024; Rajamanoharan et al. 2024;
Bricken et al. 2023):

* **FVU**, the fraction of variance unexplained, ``sum |x - x_hat|^2 / sum |x - mean(x)|^2``
  with the mean over the whole evaluation set (so a dictionary that outputs the mean scores 1),
  and **explained variance** ``1 - FVU``;
* **MSE** per element and the mean **cosine** between each input and its reconstruction;
* **L0**, the mean number of active latents per row;
* **dead** latents (never active on the evaluation set) and **dense** latents (active on more
  than ``dense_threshold`` of the rows), as fractions of the dictionary;
* the **feature density histogram** (log10 of each latent's firing rate; Bricken et al. 2023);
* **shrinkage**: the mean norm ratio ``|x_hat| / |x|``, and the relative reconstruction bias
  ``gamma = E|x_hat|^2 / E<x_hat, x>`` (Rajamanoharan et al. 2024, "Improving dictionary learning
  with gated sparse autoencoders", section 5.1): the rescaling ``x_hat / gamma`` that best fits x;
  ``gamma < 1`` means the dictionary shrinks its outputs.

Sums are kept in float64 and the variance is merged batch by batch with Chan et al.'s formula,
so the result does not depend on how the rows were batched (up to float64 rounding).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..dictionaries import SparseAutoencoder
from ..kernels import SparseCodes

DENSE_THRESHOLD = 0.1
"""A latent active on more than this fraction of rows counts as dense."""

HISTOGRAM_BIN_WIDTH = 0.25
"""Width of the density histogram's bins, in decades (log10 units)."""


@dataclass
class DensityHistogram:
    """How many latents fire at each rate: counts of ``log10(density)`` in fixed-width bins."""

    log10_edges: list[float]
    """Bin edges in log10(fraction of rows), ascending; the last edge is 0 (every row)."""
    counts: list[int]
    """Latents per bin (``len(log10_edges) - 1`` entries); dead latents are not in any bin."""
    dead: int
    """Latents that never fired (density 0, log10 = -inf)."""


@dataclass
class ReconstructionMetrics:
    """How well a dictionary reconstructs a set of activations, and how sparsely."""

    rows: int
    """Rows evaluated."""
    fvu: float
    """Fraction of variance unexplained (0 is perfect, 1 is no better than the mean)."""
    explained_variance: float
    """``1 - fvu``."""
    mse: float
    """Mean squared error per element."""
    cosine: float
    """Mean cosine similarity between a row and its reconstruction."""
    l0: float
    """Mean number of active latents per row."""
    dead_fraction: float
    """Fraction of latents that never fired on these rows."""
    dense_fraction: float
    """Fraction of latents active on more than ``dense_threshold`` of the rows."""
    dense_threshold: float
    """The firing rate above which a latent counts as dense."""
    shrinkage: float
    """Mean of ``|x_hat| / |x|`` over rows (1: no shrinkage)."""
    relative_reconstruction_bias: float
    """``gamma = E|x_hat|^2 / E<x_hat, x>`` (Rajamanoharan et al. 2024); below 1: shrinkage."""
    density_histogram: DensityHistogram
    """Latents per log10 firing-rate bin."""


@dataclass
class LatentStats:
    """Per-latent statistics over the evaluated rows (tensors of shape ``(d_sae,)``)."""

    rows: int
    """Rows seen."""
    fires: Tensor
    """int64: rows on which each latent was active (strictly positive)."""
    sum: Tensor
    """float64: the sum of each latent's activations."""
    max: Tensor
    """float32: each latent's largest activation (0 if it never fired)."""

    @property
    def density(self) -> Tensor:
        """float64: fraction of rows on which each latent fired."""
        return self.fires.double() / max(self.rows, 1)

    @property
    def mean_when_active(self) -> Tensor:
        """float64: each latent's mean activation over the rows where it fired (0 if dead)."""
        return self.sum / self.fires.clamp_min(1).double()


@dataclass
class ReconstructionAccumulator:
    """Accumulates :class:`ReconstructionMetrics` and :class:`LatentStats` batch by batch.

    >>> acc = ReconstructionAccumulator(sae.d_sae)
    >>> for x in batches:                       # (N, d) each
    ...     codes = sae.encode(x); acc.update(x, sae.decode(codes), codes)
    >>> acc.metrics().fvu
    """

    d_sae: int
    dense_threshold: float = DENSE_THRESHOLD
    rows: int = 0
    _mean: Tensor | None = None  # (d,) float64 running mean of x
    _m2: float = 0.0  # sum over rows of |x - running mean|^2 (Chan et al. merge)
    _sse: float = 0.0
    _cosine: float = 0.0
    _l0: float = 0.0
    _norm_ratio: float = 0.0
    _recon_sq: float = 0.0  # sum |x_hat|^2
    _recon_dot: float = 0.0  # sum <x_hat, x>
    _fires: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))
    _sum: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))
    _max: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float32))

    def __post_init__(self) -> None:
        if not 0 < self.dense_threshold <= 1:
            raise ValueError(f"dense_threshold is a fraction in (0, 1], got {self.dense_threshold}")
        self._fires = torch.zeros(self.d_sae, dtype=torch.int64)
        self._sum = torch.zeros(self.d_sae, dtype=torch.float64)
        self._max = torch.zeros(self.d_sae, dtype=torch.float32)

    @torch.no_grad()
    def update(self, x: Tensor, recon: Tensor, codes: SparseCodes) -> None:
        """Add a batch: inputs ``x`` (N, d), reconstructions ``recon`` (N, d), their codes."""
        if x.shape != recon.shape or x.ndim != 2:
            raise ValueError(
                f"x and recon must both be (N, d), got {tuple(x.shape)} and {tuple(recon.shape)}"
            )
        if codes.n_rows != x.shape[0] or codes.d_sae != self.d_sae:
            raise ValueError(
                f"codes hold {codes.n_rows} rows of {codes.d_sae} latents; expected "
                f"{x.shape[0]} rows of {self.d_sae}"
            )
        n = x.shape[0]
        if n == 0:
            return
        x64, r64 = x.double(), recon.double()  # (N, d)
        batch_mean = x64.mean(0)  # (d,)
        batch_m2 = float((x64 - batch_mean).pow(2).sum())
        if self._mean is None:
            self._mean, self._m2 = batch_mean, batch_m2
        else:  # Chan, Golub & LeVeque (1979): merge two sets' means and squared deviations
            total = self.rows + n
            delta = batch_mean - self._mean
            self._m2 += batch_m2 + float(delta.pow(2).sum()) * self.rows * n / total
            self._mean = self._mean + delta * (n / total)
        self.rows += n

        self._sse += float((x64 - r64).pow(2).sum())
        x_norm, r_norm = x64.norm(dim=1), r64.norm(dim=1)  # (N,)
        dot = (x64 * r64).sum(1)  # (N,)
        tiny = torch.finfo(torch.float64).tiny
        self._cosine += float((dot / (x_norm * r_norm).clamp_min(tiny)).sum())
        self._norm_ratio += float((r_norm / x_norm.clamp_min(tiny)).sum())
        self._recon_sq += float(r_norm.pow(2).sum())
        self._recon_dot += float(dot.sum())
        self._l0 += float(codes.l0().sum())

        active = codes.values > 0  # (nnz,)
        latents = codes.indices[active].cpu()
        values = codes.values[active].detach().float().cpu()
        self._fires += torch.bincount(latents, minlength=self.d_sae)
        self._sum.index_add_(0, latents, values.double())
        self._max.scatter_reduce_(0, latents, values, reduce="amax")

    def latent_stats(self) -> LatentStats:
        return LatentStats(self.rows, self._fires.clone(), self._sum.clone(), self._max.clone())

    def metrics(self) -> ReconstructionMetrics:
        """The metrics of every row added so far."""
        if self.rows == 0:
            raise ValueError("no rows were evaluated; the data source was empty")
        n = self.rows
        d = self._mean.numel() if self._mean is not None else 1
        # A constant input has no variance to explain: report FVU 0 for an exact
        # reconstruction of it and inf otherwise, rather than dividing by zero.
        no_variance = 0.0 if self._sse == 0 else math.inf
        fvu = self._sse / self._m2 if self._m2 > 0 else no_variance
        density = self._fires.double() / n
        dead = int((self._fires == 0).sum())
        gamma = self._recon_sq / self._recon_dot if self._recon_dot != 0 else math.nan
        return ReconstructionMetrics(
            rows=n,
            fvu=fvu,
            explained_variance=1.0 - fvu,
            mse=self._sse / (n * d),
            cosine=self._cosine / n,
            l0=self._l0 / n,
            dead_fraction=dead / self.d_sae,
            dense_fraction=float((density > self.dense_threshold).sum()) / self.d_sae,
            dense_threshold=self.dense_threshold,
            shrinkage=self._norm_ratio / n,
            relative_reconstruction_bias=gamma,
            density_histogram=density_histogram(self._fires, n),
        )


def density_histogram(
    fires: Tensor, rows: int, bin_width: float = HISTOGRAM_BIN_WIDTH
) -> DensityHistogram:
    """Histogram of ``log10(fires / rows)`` over the latents that fired, from the rarest
    resolvable rate (one row in ``rows``) up to 1, in bins of ``bin_width`` decades."""
    if rows <= 0:
        raise ValueError("a density histogram needs at least one row")
    n_bins = max(1, math.ceil(math.log10(rows) / bin_width)) if rows > 1 else 1
    edges = [-(n_bins - i) * bin_width for i in range(n_bins + 1)]  # ascending, last is 0
    alive = fires[fires > 0].double()
    log_density = torch.log10(alive / rows)  # (alive,) in [-log10(rows), 0]
    # Bin i holds [edges[i], edges[i+1]); a latent firing on every row goes in the last bin.
    index = ((log_density - edges[0]) / bin_width).floor().long().clamp(0, n_bins - 1)
    counts = torch.bincount(index, minlength=n_bins)
    return DensityHistogram(
        log10_edges=edges, counts=[int(c) for c in counts], dead=int((fires == 0).sum())
    )


@torch.no_grad()
def evaluate_reconstruction(
    sae: SparseAutoencoder,
    batches: Iterable[Tensor],
    *,
    max_rows: int | None = None,
    dense_threshold: float = DENSE_THRESHOLD,
    device: torch.device | str | None = None,
) -> tuple[ReconstructionMetrics, LatentStats]:
    """Reconstruction metrics and per-latent statistics of ``sae`` over ``batches`` of (N, d)
    activations (a :class:`~saekit.cache.CacheReader`, an array source, a list of tensors).

    ``max_rows`` stops after that many rows (the last batch is cut). Rows are moved to
    ``device`` (default: the dictionary's) and computed in the dictionary's dtype.
    """
    device = torch.device(device) if device is not None else sae.W_dec.device
    acc = ReconstructionAccumulator(sae.d_sae, dense_threshold)
    for batch in batches:
        x = batch.activations if hasattr(batch, "activations") else batch
        if max_rows is not None:
            x = x[: max(max_rows - acc.rows, 0)]
            if x.shape[0] == 0:
                break
        x = x.to(device=device, dtype=sae.W_dec.dtype)  # (N, d)
        codes = sae.encode(x)
        acc.update(x, sae.decode(codes), codes)
    return acc.metrics(), acc.latent_stats()
