"""Activations with a known sparse structure, for benchmarks, tests and the quick demo.

Each row is a sparse non-negative combination of ground-truth unit "features" plus a little
Gaussian noise: ``x = sum_j a_j f_{i_j} + noise``. Since the features are known, we can measure
whether a dictionary recovers them (mean max cosine similarity, MMCS; Sharkey et al. 2022).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class SparseDataset:
    """Rows generated from known features."""

    activations: Tensor
    """(n_rows, d) the data."""
    features: Tensor
    """(n_features, d) the ground-truth unit directions."""
    active: Tensor
    """(n_rows, k) which features each row uses."""


def make_sparse_dataset(
    n_rows: int,
    d: int,
    n_features: int,
    k: int,
    *,
    noise: float = 0.01,
    zipf_exponent: float = 0.0,
    seed: int = 0,
    features: Tensor | None = None,
    device: torch.device | str = "cpu",
) -> SparseDataset:
    """Rows that each combine ``k`` distinct features with magnitudes in [0.5, 1.5].

    ``zipf_exponent`` > 0 makes some features much more frequent than others, as in real models.
    Pass the ``features`` of another dataset to draw more rows (e.g. held-out) from the same ones.
    ``device`` draws and builds the rows there (a GPU builds the benchmark's large sets in
    seconds); the same seed gives other rows on another device.
    """
    if k > n_features:
        raise ValueError(f"k={k} active features per row exceeds n_features={n_features}")
    g = torch.Generator(device).manual_seed(seed)
    drawn = F.normalize(torch.randn(n_features, d, generator=g, device=device), dim=1)
    features = drawn if features is None else features.to(device)
    weights = torch.arange(1, n_features + 1, dtype=torch.float64, device=device) ** -zipf_exponent
    active = torch.multinomial(weights, n_rows * k, replacement=True, generator=g).view(n_rows, k)
    while True:  # redraw repeated features within a row until every row has k distinct ones
        ordered = active.sort(dim=1).values
        repeated_rows = (ordered[:, 1:] == ordered[:, :-1]).any(dim=1).nonzero().squeeze(1)
        if repeated_rows.numel() == 0:
            break
        redraw = torch.multinomial(
            weights, repeated_rows.numel() * k, replacement=True, generator=g
        )
        active[repeated_rows] = redraw.view(-1, k)
    magnitudes = 0.5 + torch.rand(n_rows, k, generator=g, device=device)
    x = F.embedding_bag(active, features, per_sample_weights=magnitudes, mode="sum")
    x += noise * torch.randn(n_rows, d, generator=g, device=device)
    return SparseDataset(x, features, active)


def mean_max_cosine(learned: Tensor, truth: Tensor) -> float:
    """For each true feature, the best cosine similarity among the learned decoder rows; averaged.

    1.0 means every true feature has an exact copy in the dictionary.
    """
    similarity = F.normalize(truth.float(), dim=1) @ F.normalize(learned.float(), dim=1).T
    return similarity.max(dim=1).values.mean().item()
