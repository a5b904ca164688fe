"""What the dashboard can show of an input (its image, its tokens, its text), and how a
hookpoint's positions lie on it (a patch grid, a spatial feature map, a token sequence).

A cache row records the input it came from (its id in the input source) and its position in the
hooked tensor: a token index, a ViT patch index (after the CLS token), or ``h·W + w`` for a
feature map. :func:`infer_layout` reads the hookpoint's recorded shape to place positions on the
image or the text; :class:`SourceInputs` reads the inputs back from the source the cache was
built from (recorded in its manifest).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from .._optional import require

THUMBNAIL = 128
"""Side of a thumbnail in pixels (small images are enlarged without smoothing)."""


@dataclass(frozen=True)
class PositionLayout:
    """How positions map onto an input."""

    kind: Literal["grid", "tokens", "none"]
    """grid: a heatmap over the image; tokens: highlighted text; none: one value per input."""
    grid: tuple[int, int] | None = None
    """(rows, columns) of the grid."""
    offset: int = 0
    """Positions before the grid (a ViT's CLS token), shown as a number."""

    def grid_values(self, positions: Tensor, values: Tensor) -> list[float]:
        """The ``rows x columns`` heatmap (row-major) of one input's (positions, values)."""
        assert self.grid is not None
        h, w = self.grid
        cells = torch.zeros(h * w)
        inside = (positions >= self.offset) & (positions < self.offset + h * w)
        cells[positions[inside] - self.offset] = values[inside].float()
        return [round(float(v), 4) for v in cells]


def _square(n: int) -> int | None:
    root = math.isqrt(n) if n > 0 else 0
    return root if root > 1 and root * root == n else None


def infer_layout(
    sample_shape: Sequence[int], d: int, positions: int, modality: str
) -> PositionLayout:
    """The layout of a hookpoint whose tensor had ``sample_shape`` per input (recorded in the
    cache), ``d`` features, and ``positions`` positions per input.

    ``modality``: ``image`` (the inputs are images, or generated images), ``text``, ``mixed``.
    A feature map ``(C, H, W)`` with ``C == d`` is an ``H x W`` grid; image tokens ``(T, d)`` are
    a square grid of patches, after a CLS token when ``T - 1`` is square; text is tokens.
    """
    shape = list(sample_shape)
    if len(shape) == 3 and shape[0] == d:
        return PositionLayout("grid", (shape[1], shape[2]))
    count = shape[0] if len(shape) == 2 else positions
    if modality == "text":
        return PositionLayout("tokens")
    if modality == "image":
        side = _square(count)
        if side:
            return PositionLayout("grid", (side, side))
        side = _square(count - 1)
        if side:
            return PositionLayout("grid", (side, side), offset=1)
    return PositionLayout("none")


# ----------------------------------------------------------------------------- inputs


Tokenize = Callable[[Any], list[str]]
"""``tokenize(text or token ids) -> the token strings`` at the model's positions."""

GenerateImage = Callable[[str, int], Any]
"""``generate(prompt, sample_id) -> image`` (PIL or ``(3, H, W)`` in [0, 1]): the image a
text-to-image model made from an input while the cache was written."""


def tensor_to_pil(image: Tensor) -> Any:
    """A ``(3, H, W)`` / ``(1, H, W)`` / ``(H, W, 3)`` tensor as a PIL image; values in [0, 1]
    are taken as they are, anything else is min-max scaled (normalised pixel values)."""
    pil = require("PIL.Image", "dashboard thumbnails")
    x = image.detach().float().cpu()
    if x.ndim == 3 and x.shape[0] in (1, 3):
        x = x.permute(1, 2, 0)
    if x.ndim == 2:
        x = x[..., None]
    if x.min() < 0 or x.max() > 1:
        x = (x - x.min()) / (x.max() - x.min()).clamp_min(1e-12)
    array = (x.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    if array.shape[-1] == 1:
        array = array[..., 0]
    return pil.fromarray(array).convert("RGB")


def looks_like_image(tensor: Tensor) -> bool:
    return tensor.is_floating_point() and (
        (tensor.ndim == 3 and tensor.shape[0] in (1, 3))
        or (tensor.ndim == 3 and tensor.shape[-1] == 3)
    )


class SourceInputs:
    """Inputs read back from an input source (image folder, prompts, pairs, tensors, ...).

    ``tokenize`` gives a text input's (or token-id tensor's) tokens as the model saw them;
    ``generate`` remakes a prompt's generated image (diffusion caches)."""

    def __init__(
        self,
        source: Any,
        *,
        tokenize: Tokenize | None = None,
        generate: GenerateImage | None = None,
    ) -> None:
        self.source = source
        self.tokenize = tokenize
        self.generate = generate
        self._cache: dict[int, Any] = {}

    def _sample(self, sample: int) -> Any:
        if sample not in self._cache:
            try:
                self._cache[sample] = self.source.load(sample)
            except Exception:  # an input that is gone or unreadable: show its id only
                self._cache[sample] = None
        return self._cache[sample]

    @property
    def modality(self) -> str:
        """image, text or mixed, judged from the first input."""
        first = self._sample(0)
        if first is None:
            return "none"
        if first.image is not None and first.prompt is not None:
            return "mixed"
        if first.image is not None or (first.tensor is not None and looks_like_image(first.tensor)):
            return "image"
        if first.prompt is not None and self.generate is not None:
            return "image"  # generated images
        return "text"

    def image(self, sample: int) -> Any:
        item = self._sample(sample)
        if item is None:
            return None
        if item.image is not None:
            return item.image
        if item.tensor is not None and looks_like_image(item.tensor):
            return tensor_to_pil(item.tensor)
        if item.prompt is not None and self.generate is not None:
            made = self.generate(item.prompt, sample)
            return tensor_to_pil(made) if isinstance(made, Tensor) else made
        return None

    def text(self, sample: int) -> str:
        item = self._sample(sample)
        if item is None:
            return f"input {sample} (unavailable)"
        return item.prompt or Path(item.source).name or f"input {sample}"

    def tokens(self, sample: int) -> list[str] | None:
        item = self._sample(sample)
        if item is None or self.tokenize is None:
            return None
        if item.prompt is not None:
            return self.tokenize(item.prompt)
        if item.tensor is not None and not item.tensor.is_floating_point():
            return self.tokenize(item.tensor)
        return None


def save_thumbnail(image: Any, path: Path, size: int = THUMBNAIL) -> Path:
    """Write ``image`` as a PNG whose longer side is ``size`` (nearest-neighbour when enlarging,
    so a 32x32 testbed image stays crisp)."""
    pil = require("PIL.Image", "dashboard thumbnails")
    image = image.convert("RGB")
    w, h = image.size
    scale = size / max(w, h)
    resample = pil.Resampling.NEAREST if scale >= 1 else pil.Resampling.LANCZOS
    image = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), resample)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
    return path
