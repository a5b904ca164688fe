"""The README's evaluation report and dashboard screenshot, reproducibly: a TopK dictionary on
the testbed CLIP's image tower, evaluated on held-out images with the world's factor labels.

    nice -n 10 python scripts/eval_dashboard_example.py            # writes runs/example/ and docs/

1. render training and held-out scenes of the testbed world to image folders (factor labels of
   the held-out ones as saekit factor labels);
2. ``saekit cache`` (Python API) the CLIP image tower's residual stream at a middle block on both;
3. ``saekit train`` a TopK dictionary on the training cache;
4. ``saekit eval`` on the held-out cache with the labels and the testbed CLIP downstream task;
5. ``saekit dashboard`` on the held-out cache (factor scores, nearest words of the vocabulary);
6. screenshots of the index and of the page of the best factor-aligned latent (headless
   Chromium), and the report, into ``docs/``.

``--clip DIR`` uses another CLIP folder (default: the one shipped with the testbed).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from saekit.adapters.clip import CLIPAdapter
from saekit.cache import CacheConfig, ImageFolder, InputConfig, cache_activations
from saekit.cli import main
from saekit.evaluation import FactorLabels, write_labels
from saekit.testbed import models, world

REPO = Path(__file__).resolve().parents[1]
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def render_folder(folder: Path, n: int, seed: int) -> FactorLabels:
    """Scenes ``0..n-1`` as ``00000.png`` ... (an image folder's sample id is its index)."""
    scenes = world.sample_scenes(n, seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(world.to_pil(world.render(scenes))):
        image.save(folder / f"{i:05d}.png")
    return FactorLabels(world.value_names(), torch.from_numpy(world.presence(scenes)))


def cache(adapter: CLIPAdapter, folder: Path, output: Path, hookpoint: str) -> Path:
    data = InputConfig(images=str(folder))
    cfg = CacheConfig(
        hookpoints=[hookpoint],
        output_dir=str(output),
        batch_size=256,
        dtype="float32",
        shuffle_buffer_rows=131_072,
        rows_per_shard=32_768,
        data=data,
    )
    cache_activations(adapter, ImageFolder(folder), cfg)
    return output


def screenshots(site: Path, latent_page: str, docs: Path) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        profile = site.parent / "chromium-profile"
        shutil.rmtree(profile, ignore_errors=True)
        context = playwright.chromium.launch_persistent_context(
            str(profile),
            executable_path="/usr/bin/chromium",
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 860},
        )
        page = context.new_page()
        page.goto((site / "index.html").as_uri())
        page.wait_for_load_state("load")
        page.click("th[data-key=auroc]")
        page.fill("#filter", "color=")
        page.screenshot(path=str(docs / "dashboard-index.png"))
        page.goto((site / latent_page).as_uri())
        page.wait_for_load_state("load")
        page.screenshot(path=str(docs / "dashboard-latent.png"), full_page=True)
        context.close()


def run(args: argparse.Namespace) -> None:
    out = Path(args.output_dir).resolve()
    docs = REPO / "docs"
    docs.mkdir(exist_ok=True)
    began = time.perf_counter()
    train_labels = render_folder(out / "images-train", args.train_images, seed=20_001)
    held_labels = render_folder(out / "images-heldout", args.heldout_images, seed=20_002)
    del train_labels
    write_labels(out / "labels-heldout.json", held_labels)
    adapter = CLIPAdapter.load(str(args.clip), local_files_only=True)
    adapter.image_processor  # noqa: B018 (built from the config when the folder has none)
    cache(adapter, out / "images-train", out / "cache-train", args.hookpoint)
    cache(adapter, out / "images-heldout", out / "cache-heldout", args.hookpoint)
    print(f"cached in {time.perf_counter() - began:.0f} s", flush=True)

    run_dir = out / "sae"
    assert main([
        "train", "--cache", str(out / "cache-train"), "--hookpoint", args.hookpoint,
        "--architecture", "topk", "--k", str(args.k), "--expansion_factor", str(args.expansion),
        "--batch_size", "2048", "--epochs", str(args.epochs), "--checkpoint_every", "0",
        "--log_every", "20", "--output_dir", str(run_dir), "--resume",
    ]) == 0  # fmt: skip
    testbed = ["--testbed", "clip", "--testbed_dir", str(args.clip)]
    assert main([
        "eval", str(run_dir), "--cache", str(out / "cache-heldout"),
        "--labels", str(out / "labels-heldout.json"), *testbed, "--output_dir", str(out / "eval"),
    ]) == 0  # fmt: skip
    (folder,) = [p for p in run_dir.iterdir() if (p / "cfg.json").is_file()]
    assert main([
        "dashboard", str(folder), "--cache", str(out / "cache-heldout"),
        "--labels", str(out / "labels-heldout.json"), *testbed, "--output_dir", str(out / "site"),
    ]) == 0  # fmt: skip
    report = json.loads((out / "eval" / "eval.json").read_text())
    entry = next(iter(report["dictionaries"].values()))
    colors = {k: v for k, v in entry["factors"]["per_value"].items() if k.startswith("color=")}
    best = max(colors.values(), key=lambda score: score["auroc"])  # a colour latent: a clear page
    latent = best["auroc_latent"]
    width = len(str(entry["dictionary"]["d_sae"] - 1))
    screenshots(out / "site", f"latents/{latent:0{width}d}.html", docs)
    text = (out / "eval" / "eval.json").read_text().replace(f"{REPO}/", "")  # repository paths
    (docs / "eval-example.json").write_text(text)
    for figure in entry["figures"]:
        if figure.endswith(("density.png", "factors.png", "training.png")):
            shutil.copyfile(out / "eval" / figure, docs / f"eval-{figure.split('.')[-2]}.png")
    print(f"done in {time.perf_counter() - began:.0f} s; docs/ updated")


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clip", default=str(models.CLIP_DIR), help="a CLIP folder")
    parser.add_argument("--hookpoint", default="vision_model.encoder.layers.2")
    parser.add_argument("--train_images", type=int, default=6000)
    parser.add_argument("--heldout_images", type=int, default=1500)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--expansion", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--output_dir", default="runs/example")
    return parser.parse_args()


if __name__ == "__main__":
    run(parse())
