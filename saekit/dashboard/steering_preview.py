"""A preview of what a latent does to a text-to-image model: one prompt, a few seeds, a few
strengths of the latent's decoder direction added at its hookpoint (Surkov et al. 2024 steer
SDXL-Turbo this way).

The hook here is deliberately minimal: ``activation + strength * W_dec[latent]`` at every
position, every denoising step and both classifier-free-guidance halves. saekit's steering
module (scoped by step, region and guidance half) is the tool for real interventions; this
preview only shows the direction's effect.

Strengths are multiples of the latent's largest activation on the cache, so strength 1 adds the
direction as strongly as the latent ever writes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..adapters.base import Capture, ModelAdapter
from ..evaluation.downstream import Generate
from ..evaluation.splice import HookHandle
from ..steering.hooks import add_vector


def add_direction(
    model: nn.Module | ModelAdapter,
    hookpoint: str,
    capture: Capture,
    direction: Tensor,
    strength: float,
) -> HookHandle:
    """Add ``strength * direction`` ``(d,)`` to the activation at ``hookpoint`` on every call
    (saekit.steering's ``add`` primitive, :func:`saekit.steering.hooks.add_vector`)."""
    return add_vector(model, hookpoint, capture, direction, strength)


@dataclass
class SteeringGrid:
    """Images of one latent: ``images[i][j]`` at ``strengths[i]`` and ``seeds[j]``."""

    latent: int
    prompt: str
    strengths: list[float]
    """Absolute strengths added (multiples of the latent's max activation)."""
    multipliers: list[float]
    seeds: list[int]
    images: Tensor
    """``(S, N, 3, H, W)`` in [0, 1]."""


@torch.no_grad()
def steering_grid(
    generate: Generate,
    model: nn.Module | ModelAdapter,
    hookpoint: str,
    capture: Capture,
    direction: Tensor,
    *,
    latent: int,
    prompt: str,
    scale: float,
    multipliers: Sequence[float] = (0.0, 1.0, 2.0, 4.0),
    seeds: Sequence[int] = (0, 1, 2),
) -> SteeringGrid:
    """Generate ``prompt`` for each seed at each strength ``multiplier * scale``."""
    rows = []
    for multiplier in multipliers:
        strength = float(multiplier) * scale
        if strength == 0:
            rows.append(generate([prompt] * len(seeds), list(seeds)))
            continue
        with add_direction(model, hookpoint, capture, direction, strength) as handle:
            rows.append(generate([prompt] * len(seeds), list(seeds)))
        if handle.calls == 0:
            raise RuntimeError(
                f"the preview's generation never ran through {hookpoint!r}; is it a module of "
                "the pipeline's denoiser or text encoder?"
            )
    return SteeringGrid(
        latent,
        prompt,
        [float(m) * scale for m in multipliers],
        [float(m) for m in multipliers],
        list(seeds),
        torch.stack(rows),
    )
