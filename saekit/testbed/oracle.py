"""The oracle: read a testbed image's factors back from its pixels.

Background, colour, size and position are read from pixels: the background is the palette colour
nearest the image's median, objects are the 8-connected components of pixels far from it, an
object's cell is its centroid's, its size its bounding box's side and its colour the palette
colour nearest the median of its core pixels. On images rendered by `world.render` these rules
are exact by construction. Shape is read by a small CNN (`ShapeClassifier`) from a colour-free
"foreground strength" crop around the object, trained on the world with the blur, noise and
size/offset jitter that a generative model's samples show (``scripts/train_testbed_oracle.py``);
its accuracy is recorded beside its weights.

The same code judges what the text-to-image model draws: `Oracle.score` compares readings with
the scenes the prompts asked for, factor by factor.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .._io import atomic_write_json
from .world import (
    BACKGROUNDS,
    CELL_EDGES,
    COLORS,
    FACTORS,
    OBJECT_FACTORS,
    POSITIONS,
    SHAPES,
    SIZES,
    Scene,
    SceneObject,
)

CROP = 12
"""Side of the square crop around an object that the shape classifier sees."""

FOREGROUND_DISTANCE = 0.25
"""A pixel is foreground when its RGB distance (0-1 units) to the background exceeds this; the
closest object/background pair of the palette (purple on gray) is 0.42 apart."""

MIN_PIXELS = 8
"""Components smaller than this are specks, not objects (the smallest object has 18 pixels)."""

LARGE_SIDE = (SIZES["small"] + SIZES["large"]) / 2
"""A bounding box side at or above this reads as ``large``."""

ORACLE_DIR = Path(__file__).parent / "pretrained" / "oracle"

_COLOR_NAMES = tuple(COLORS)
_COLOR_RGB = torch.tensor([COLORS[c] for c in _COLOR_NAMES], dtype=torch.float32) / 255  # (6, 3)
_BACKGROUND_NAMES = tuple(BACKGROUNDS)
_BACKGROUND_RGB = torch.tensor([BACKGROUNDS[b] for b in _BACKGROUND_NAMES]) / 255  # (3, 3)


@dataclass(frozen=True)
class ObjectReading:
    """One object as the oracle reads it."""

    shape: str
    color: str
    size: str
    position: str
    pixels: int
    """Area of the object's connected component."""
    shape_confidence: float
    """The classifier's softmax probability of ``shape``."""

    def as_object(self) -> SceneObject:
        return SceneObject(self.shape, self.color, self.size, self.position)


@dataclass(frozen=True)
class Reading:
    """What the oracle reads from one image: any number of objects (a model may draw none)."""

    background: str
    objects: tuple[ObjectReading, ...]

    @property
    def main(self) -> ObjectReading | None:
        """The largest object, or None for an empty image."""
        return max(self.objects, key=lambda o: o.pixels, default=None)

    def to_scene(self) -> Scene:
        """The reading as a `Scene` (raises ValueError unless it holds one or two objects)."""
        return Scene(self.background, tuple(o.as_object() for o in self.objects))


class ShapeClassifier(nn.Module):
    """A small CNN: ``(N, 1, CROP, CROP)`` foreground strength -> logits over `SHAPES`."""

    def __init__(self, width: int = 32, hidden: int = 64) -> None:
        super().__init__()
        self.config = {"width": width, "hidden": hidden, "crop": CROP, "classes": list(SHAPES)}
        self.features = nn.Sequential(
            nn.Conv2d(1, width // 2, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width // 2, width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # (N, width, CROP/2, CROP/2)
            nn.Conv2d(width, width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # (N, width, CROP/4, CROP/4)
        )
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(width * (CROP // 4) ** 2, hidden),
            nn.ReLU(),
            nn.Linear(hidden, len(SHAPES)),
        )

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(crops))

    def save(self, directory: str | Path, record: dict[str, Any] | None = None) -> None:
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file(
            {k: v.contiguous() for k, v in self.state_dict().items()},
            directory / "shape_classifier.safetensors",
        )
        atomic_write_json(directory / "config.json", {**self.config, **(record or {})})

    @classmethod
    def load(cls, directory: str | Path = ORACLE_DIR) -> ShapeClassifier:
        from safetensors.torch import load_file

        directory = Path(directory)
        weights = directory / "shape_classifier.safetensors"
        if not weights.exists():
            raise FileNotFoundError(
                f"no shape classifier at {weights}; train one with "
                "`python scripts/train_testbed_oracle.py`"
            )
        config = json.loads((directory / "config.json").read_text())
        if config.get("classes") != list(SHAPES) or config.get("crop") != CROP:
            raise ValueError(
                f"the classifier at {directory} was trained for shapes {config.get('classes')} "
                f"and crop {config.get('crop')}, not {list(SHAPES)} and {CROP}; retrain it"
            )
        model = cls(width=config["width"], hidden=config["hidden"])
        model.load_state_dict(load_file(weights))
        return model.eval()


# --------------------------------------------------------------------------------------------
# pixel reading


def connected_components(mask: torch.Tensor) -> torch.Tensor:
    """8-connected component labels of ``(N, H, W)`` bool masks; 0 = background.

    Label propagation by 3x3 max-pooling (every pixel takes the largest label among its
    foreground neighbours) until nothing changes: vectorised over the batch and exact.
    """
    n, h, w = mask.shape
    ids = torch.arange(1, h * w + 1, dtype=torch.float32).view(1, h, w).expand(n, h, w)
    labels = torch.where(mask, ids, torch.zeros(()))  # (N, H, W)
    fg = mask.float()
    while True:
        grown = F.max_pool2d(labels[:, None], 3, stride=1, padding=1)[:, 0] * fg
        if torch.equal(grown, labels):
            return labels.long()
        labels = grown


def _cell(y: float, x: float) -> str:
    row = int(y >= CELL_EDGES[0] - 0.5) + int(y >= CELL_EDGES[1] - 0.5)
    col = int(x >= CELL_EDGES[0] - 0.5) + int(x >= CELL_EDGES[1] - 0.5)
    return POSITIONS[3 * row + col]


@dataclass(frozen=True)
class _Blob:
    """A located object before its shape is classified."""

    image: int
    color: str
    size: str
    position: str
    pixels: int
    crop: torch.Tensor  # (CROP, CROP) foreground strength


def locate(images: torch.Tensor) -> tuple[list[str], list[_Blob]]:
    """Backgrounds and every object's pixel-read factors and shape crop.

    ``images``: ``(N, 3, H, W)`` in [0, 1]. Returns one background name per image and the blobs of
    all images (``blob.image`` says whose), at most one per grid cell (the largest).
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (N, 3, H, W), got {tuple(images.shape)}")
    images = images.detach().float().cpu().clamp(0, 1)
    n = images.shape[0]
    median = images.flatten(2).median(dim=2).values  # (N, 3)
    bg_index = torch.cdist(median, _BACKGROUND_RGB).argmin(dim=1)  # (N,)
    bg_rgb = _BACKGROUND_RGB[bg_index]  # (N, 3)
    distance = (images - bg_rgb[:, :, None, None]).norm(dim=1)  # (N, H, W)
    labels = connected_components(distance > FOREGROUND_DISTANCE)
    backgrounds = [_BACKGROUND_NAMES[int(i)] for i in bg_index]

    blobs: list[_Blob] = []
    for i in range(n):
        ids, counts = labels[i].unique(return_counts=True)
        by_cell: dict[str, _Blob] = {}
        for label, count in zip(ids.tolist(), counts.tolist(), strict=True):
            if label == 0 or count < MIN_PIXELS:
                continue
            component = labels[i] == label  # (H, W)
            ys, xs = component.nonzero(as_tuple=True)
            position = _cell(ys.float().mean().item(), xs.float().mean().item())
            if position in by_cell and by_cell[position].pixels >= count:
                continue
            top, bottom = int(ys.min()), int(ys.max())
            left, right = int(xs.min()), int(xs.max())
            side = max(bottom - top, right - left) + 1
            # colour: median of the component's core (its pixels farthest from the background)
            d = distance[i][component]
            core = images[i][:, component][:, d >= 0.5 * d.max()]  # (3, P)
            rgb = core.median(dim=1).values
            color_index = int(torch.cdist(rgb[None], _COLOR_RGB).argmin())
            # shape crop: foreground strength relative to this colour's contrast, this component
            # (grown by one pixel to keep soft edges) only, centred on the bounding box
            contrast = (_COLOR_RGB[color_index] - bg_rgb[i]).norm().clamp_min(1e-3)
            keep = F.max_pool2d(component[None, None].float(), 3, stride=1, padding=1)[0, 0]
            strength = (distance[i] / contrast).clamp(0, 1) * keep
            padded_strength = F.pad(strength, (CROP, CROP, CROP, CROP))  # room at the border
            cy = (top + bottom + 1) / 2 + CROP
            cx = (left + right + 1) / 2 + CROP
            y0, x0 = round(cy - CROP / 2), round(cx - CROP / 2)
            crop = padded_strength[y0 : y0 + CROP, x0 : x0 + CROP]
            by_cell[position] = _Blob(
                image=i,
                color=_COLOR_NAMES[color_index],
                size="large" if side >= LARGE_SIDE else "small",
                position=position,
                pixels=count,
                crop=crop.clone(),
            )
        blobs += [by_cell[p] for p in POSITIONS if p in by_cell]
    return backgrounds, blobs


# --------------------------------------------------------------------------------------------
# the oracle


@dataclass(frozen=True)
class OracleScore:
    """Agreement between readings and the scenes they should show."""

    accuracy: dict[str, float]
    """Per factor: background and count per image; shape/color/size per target object (compared
    with the object read in its cell, else the nearest one); position = share of target objects
    with an object read in their cell."""
    n_images: int
    n_objects: int

    def as_dict(self) -> dict[str, Any]:
        return {"accuracy": self.accuracy, "n_images": self.n_images, "n_objects": self.n_objects}


class Oracle:
    """Reads factors from images; `score` compares readings with the intended scenes.

    >>> oracle = Oracle()                       # loads the shipped shape classifier
    >>> readings = oracle.read(images)          # images: (N, 3, 32, 32) in [0, 1]
    >>> oracle.score(readings, scenes).accuracy # {"shape": 1.0, "color": 1.0, ...}
    """

    def __init__(self, classifier: ShapeClassifier | None = None) -> None:
        self.classifier = classifier if classifier is not None else ShapeClassifier.load()

    @torch.no_grad()
    def read(self, images: torch.Tensor) -> list[Reading]:
        backgrounds, blobs = locate(images)
        probs = (
            self.classifier(torch.stack([b.crop for b in blobs])[:, None]).softmax(dim=1)
            if blobs
            else torch.zeros(0, len(SHAPES))
        )  # (B, shapes)
        per_image: list[list[ObjectReading]] = [[] for _ in backgrounds]
        for blob, p in zip(blobs, probs, strict=True):
            k = int(p.argmax())
            per_image[blob.image].append(
                ObjectReading(
                    SHAPES[k], blob.color, blob.size, blob.position, blob.pixels, float(p[k])
                )
            )
        return [Reading(bg, tuple(objs)) for bg, objs in zip(backgrounds, per_image, strict=True)]

    @staticmethod
    def score(readings: Sequence[Reading], scenes: Sequence[Scene]) -> OracleScore:
        """Factor accuracies of ``readings`` against the ``scenes`` they should show."""
        if len(readings) != len(scenes):
            raise ValueError(f"{len(readings)} readings but {len(scenes)} scenes")
        hits = dict.fromkeys((*FACTORS, "count"), 0)
        n_objects = 0
        for reading, scene in zip(readings, scenes, strict=True):
            hits["background"] += reading.background == scene.background
            hits["count"] += len(reading.objects) == scene.count
            for target in scene.objects:
                n_objects += 1
                read = _nearest(reading.objects, target.position)
                if read is None:
                    continue
                hits["position"] += read.position == target.position
                for f in ("shape", "color", "size"):
                    hits[f] += getattr(read, f) == getattr(target, f)
        n = max(len(scenes), 1)
        accuracy = {
            f: hits[f] / (max(n_objects, 1) if f in OBJECT_FACTORS else n)
            for f in (*FACTORS, "count")
        }
        return OracleScore(accuracy, len(scenes), n_objects)

    def accuracy(self, images: torch.Tensor, scenes: Sequence[Scene]) -> dict[str, float]:
        """``score(read(images), scenes).accuracy``."""
        return self.score(self.read(images), scenes).accuracy


def _nearest(objects: Sequence[ObjectReading], position: str) -> ObjectReading | None:
    """The object read in ``position``'s cell, else the one in the nearest cell (ties: larger)."""
    if not objects:
        return None
    r, c = divmod(POSITIONS.index(position), 3)

    def key(o: ObjectReading) -> tuple[float, int]:
        orow, ocol = divmod(POSITIONS.index(o.position), 3)
        return (float(np.hypot(orow - r, ocol - c)), -o.pixels)

    return min(objects, key=key)
