"""Data-dependent initialisation: input scale and decoder bias."""

from __future__ import annotations

import math

from torch import Tensor


def geometric_median(points: Tensor, max_iter: int = 100, tol: float = 1e-6) -> Tensor:
    """The point minimising the sum of Euclidean distances to ``points`` (N, d): Weiszfeld's
    algorithm. Robust to outlier tokens (e.g. attention sinks), unlike the mean; Bricken et al.
    2023 initialise b_dec this way."""
    points = points.double()
    guess = points.mean(0)
    for _ in range(max_iter):
        distances = (points - guess).norm(dim=1).clamp_min(1e-12)
        weights = 1.0 / distances
        new = (weights[:, None] * points).sum(0) / weights.sum()
        shift = (new - guess).norm()
        guess = new
        if shift <= tol * (1 + guess.norm()):
            break
    return guess.float()


def input_scale(batch: Tensor) -> float:
    """Factor that brings the batch's mean row norm to sqrt(d): one dictionary hyper-parameter
    set then transfers across models and layers (Conerly et al. 2024, Anthropic April update)."""
    mean_norm = batch.float().norm(dim=1).mean().item()
    if not math.isfinite(mean_norm) or mean_norm == 0:
        raise ValueError("cannot normalise activations whose mean norm is zero or not finite")
    return math.sqrt(batch.shape[1]) / mean_norm
