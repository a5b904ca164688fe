"""Image degradations that mimic a small generative model's samples: blur, noise, colour drift.

The oracle's shape classifier trains on degraded renders so that it reads the diffusion model's
soft-edged, slightly off-colour samples as well as the world's crisp ones; the tests use the same
functions to check that the pixel rules survive them.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .world import BACKGROUNDS, COLORS, IMAGE_SIZE, SHAPES, shape_mask


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Blur each ``(N, 3, H, W)`` image with its own ``sigma`` (``(N,)``, pixels; 0 = unchanged)."""
    radius = 2
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)  # (5,)
    s = sigma.clamp_min(1e-3)[:, None]  # (N, 1)
    kernel = torch.exp(-0.5 * (offsets[None] / s) ** 2)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)  # (N, 5)
    n, c, h, w = images.shape
    x = images.reshape(1, n * c, h, w)
    k = kernel.repeat_interleave(c, dim=0)  # (N*3, 5)
    x = F.pad(x, (radius, radius, radius, radius), mode="replicate")
    x = F.conv2d(x, k[:, None, None, :], groups=n * c)  # horizontal
    x = F.conv2d(x, k[:, None, :, None], groups=n * c)  # vertical
    return x.reshape(n, c, h, w)


def degrade(
    images: torch.Tensor,
    generator: torch.Generator,
    *,
    max_blur: float = 0.9,
    max_noise: float = 0.06,
    max_drift: float = 0.06,
) -> torch.Tensor:
    """Random blur (sigma up to ``max_blur`` px), Gaussian noise and per-image colour drift."""
    n = images.shape[0]
    sigma = torch.rand(n, generator=generator) * max_blur
    sigma = torch.where(torch.rand(n, generator=generator) < 0.3, torch.zeros(n), sigma)
    out = gaussian_blur(images, sigma)
    gain = 1 + (torch.rand(n, 3, 1, 1, generator=generator) * 2 - 1) * max_drift
    shift = (torch.rand(n, 3, 1, 1, generator=generator) * 2 - 1) * max_drift
    noise = torch.randn(out.shape, generator=generator) * (
        torch.rand(n, 1, 1, 1, generator=generator) * max_noise
    )
    return (out * gain + shift + noise).clamp(0, 1)


def free_objects(
    n: int, rng: np.random.Generator, sides: tuple[int, int] = (5, 12)
) -> tuple[torch.Tensor, list[str]]:
    """``n`` single-object images whose object has any side in ``[sides)`` and any placement.

    Off the world's grid and sizes on purpose: a generated sample's object is rarely exactly
    where and as large as the world would draw it.
    """
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    shapes = []
    backgrounds, colors = list(BACKGROUNDS.values()), list(COLORS.values())
    for i in range(n):
        shape = SHAPES[rng.integers(len(SHAPES))]
        side = int(rng.integers(*sides))
        top, left = rng.integers(0, IMAGE_SIZE - side + 1, size=2)
        images[i] = backgrounds[rng.integers(len(backgrounds))]
        patch = images[i, top : top + side, left : left + side]
        patch[shape_mask(shape, side)] = colors[rng.integers(len(colors))]
        shapes.append(shape)
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255), shapes
