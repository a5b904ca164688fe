"""Data-dependent initialisation: input scale and decoder bias."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

_DATA_INIT_SALT = 0xDA7A_1417


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


@torch.no_grad()
def init_from_data(
    W_dec: Tensor,
    W_enc: Tensor,
    centred: Tensor,
    seed: int,
    encoder_scale: float,
    start: int = 0,
) -> int:
    """Start latents ``start, start + 1, ...`` at directions of the data: each decoder row the
    unit direction of one row of ``centred`` (the first batch minus ``b_dec``), its encoder row
    the same direction at norm ``encoder_scale``.

    A token is a sparse sum of features, so one of its rows lies at cosine ~1/sqrt(L0) to each of
    its features, where a random direction lies at ~1/sqrt(d_in): latents start next to features
    instead of far from all of them, the way dictionary learning has long seeded its atoms with
    data samples (Aharon et al. 2006, K-SVD). On both ground-truth sets of
    scripts/bench_train.py it raised held-out explained variance after one epoch from 0.27 to 0.38
    (set a) and from 0.54 to 0.71 (set b), and feature recovery more (README, "What the training
    defaults are made of").

    Latent ``j`` takes row ``perm[j]`` of one seeded permutation, so every rank of a latent-split
    run (``start`` = its first latent) draws its slice of the same assignment. Latents beyond the
    batch's rows, and rows too close to ``b_dec`` to have a direction, keep their random init.

    Args:
        W_dec, W_enc: (m_local, d_in) weights of latents ``start:start + m_local``, set in place.
        centred: (n, d_in) rows of the first batch minus the decoder bias.
        seed: the dictionary's seed.
        encoder_scale: row norm of the encoder (TrainConfig.encoder_init_scale).
        start: the first latent these weights hold (latent-split runs).
        encoder_scale: row norm of the encoder (TrainConfig.encoder_init_scale).
        start: the first latent these weights hold (latent-split runs).

    Returns:
        How many latents were set from data.
    """
    n = centred.shape[0]
    generator = torch.Generator().manual_seed(_DATA_INIT_SALT + seed)
    order = torch.randperm(n, generator=generator)[start : start + W_dec.shape[0]]
    rows = centred.index_select(0, order.to(centred.device)).float()  # (taken, d_in)
    norms = rows.norm(dim=1)
    usable = norms > 1e-6 * norms.mean().clamp_min(torch.finfo(norms.dtype).tiny)
    directions = F.normalize(rows, dim=1)
    taken = order.numel()
    keep_random = ~usable
    directions[keep_random] = W_dec[:taken][keep_random].float()
    W_dec[:taken] = directions.to(W_dec)
    W_enc[:taken] = (directions * encoder_scale).to(W_enc)
    return int(usable.sum())
