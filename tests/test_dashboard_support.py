"""A labelled image cache of a tiny real CLIP vision tower, and a headless Chromium, for the
dashboard tests (no tests here)."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from test_eval_support import tiny_clip

from saekit.adapters import CustomAdapter, InputBatch
from saekit.cache import CacheConfig, InputConfig, cache_activations, open_inputs
from saekit.evaluation import FactorLabels

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    # Without these Chromium phones home at start-up, which this closed network refuses.
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"

COLORS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 80, 230)}
SHAPES = ("square", "circle")
BACKGROUNDS = {"black": (0, 0, 0), "white": (255, 255, 255)}


def draw_images(folder: Path, n: int, seed: int = 0) -> FactorLabels:
    """``n`` 16x16 PNGs of one coloured square or circle, and their factor labels (the sample id
    of ``img-00007.png`` is 7: the image folder sorts by name)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = [f"color={c}" for c in COLORS] + [f"shape={s}" for s in SHAPES]
    names += [f"background={b}" for b in BACKGROUNDS]
    presence = torch.zeros(n, len(names), dtype=torch.bool)
    yy, xx = np.mgrid[0:16, 0:16]
    for i in range(n):
        color = list(COLORS)[rng.integers(3)]
        shape = SHAPES[rng.integers(2)]
        background = list(BACKGROUNDS)[rng.integers(2)]
        cy, cx = rng.integers(4, 12, size=2)
        if shape == "square":
            mask = (np.abs(yy - cy) <= 3) & (np.abs(xx - cx) <= 3)
        else:
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= 12
        pixels = np.empty((16, 16, 3), dtype=np.uint8)
        pixels[:] = BACKGROUNDS[background]
        pixels[mask] = COLORS[color]
        Image.fromarray(pixels).save(folder / f"img-{i:05d}.png")
        for name in (f"color={color}", f"shape={shape}", f"background={background}"):
            presence[i, names.index(name)] = True
    return FactorLabels(names, presence)


def feed_images(model, batch: InputBatch):
    """PIL images -> pixel values in [-1, 1] -> the CLIP vision tower."""
    pixels = torch.stack(
        [torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1) for im in batch.images]
    )
    return model.vision_model(pixel_values=pixels / 127.5 - 1)


def image_cache(tmp_path: Path, n: int = 48) -> tuple[Path, FactorLabels, torch.nn.Module]:
    """A cache of ``vision_model.encoder.layers.1`` (17 tokens: CLS + 4x4 patches, d=32)."""
    labels = draw_images(tmp_path / "images", n)
    model = tiny_clip(20)
    data = InputConfig(images=str(tmp_path / "images"))
    cfg = CacheConfig(
        hookpoints=["vision_model.encoder.layers.1"],
        output_dir=str(tmp_path / "cache"),
        batch_size=16,
        rows_per_shard=256,
        shuffle_buffer_rows=512,
        dtype="float32",
        progress=False,
        data=data,
    )
    adapter = CustomAdapter(model, feed=feed_images, name="tiny-clip")
    cache_activations(adapter, open_inputs(data), cfg)
    return tmp_path / "cache", labels, model


@contextlib.contextmanager
def chromium(user_data_dir: Path) -> Iterator[object]:
    """A persistent headless Chromium context (Debian's package) with a fresh profile.

    Fails, never skips, when the browser is missing: `make test` installs it (`make browser`)."""
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists() and shutil.which("chromium") is None:
        raise RuntimeError(
            f"{CHROMIUM} is missing; install it with `make browser` (apt-get install chromium)"
        )
    os.environ.setdefault("PLAYWRIGHT_BROWSERS_PATH", str(user_data_dir / "ms-playwright"))
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(user_data_dir),
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 900},
        )
        try:
            yield context
        finally:
            context.close()
