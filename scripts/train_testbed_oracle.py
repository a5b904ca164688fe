"""Train the oracle's shape classifier on the testbed world (about a minute on 2 CPU cores).

    nice -n 10 python scripts/train_testbed_oracle.py            # writes saekit/testbed/pretrained/oracle

Data: world renders (exact sizes and cells) and free renders (any side 5-11 px, any placement),
half of them degraded (blur, noise, colour drift, see `saekit.testbed.degrade`), all cut into
crops by the oracle's own `locate`, so the classifier sees exactly what it will see at test time.
Deterministic for a given seed and thread count.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from saekit.testbed import world
from saekit.testbed.degrade import degrade, free_objects
from saekit.testbed.oracle import ORACLE_DIR, Oracle, ShapeClassifier, locate
from saekit.testbed.recording import TrainingRecord, seed_everything


def crops_and_labels(
    n: int, rng: np.random.Generator, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images (half world scenes, half free objects; half of all degraded) -> crops, labels."""
    scenes = world.sample_scenes(n // 2, seed=int(rng.integers(2**31)), objects=1)
    free, free_shapes = free_objects(n - n // 2, rng)
    images = torch.cat([world.render(scenes), free])  # (n, 3, H, W)
    shapes = [s.objects[0].shape for s in scenes] + free_shapes
    degraded = torch.rand(n, generator=gen) < 0.5
    images[degraded] = degrade(images[degraded], gen)
    _, blobs = locate(images)
    largest: dict[int, torch.Tensor] = {}
    pixels: dict[int, int] = {}
    for b in blobs:  # one object per image: keep its largest component
        if b.pixels > pixels.get(b.image, 0):
            largest[b.image], pixels[b.image] = b.crop, b.pixels
    keep = sorted(largest)
    crops = torch.stack([largest[i] for i in keep])[:, None]  # (M, 1, CROP, CROP)
    labels = torch.tensor([world.SHAPES.index(shapes[i]) for i in keep])
    return crops, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ORACLE_DIR)
    parser.add_argument("--train_images", type=int, default=40_000)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    seed_everything(args.seed, args.threads)
    rng = np.random.default_rng(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    record = TrainingRecord("oracle shape classifier", {k: str(v) for k, v in vars(args).items()})

    crops, labels = crops_and_labels(args.train_images, rng, gen)
    val_crops, val_labels = crops_and_labels(4000, np.random.default_rng(10**6 + args.seed), gen)
    print(f"{len(crops)} training crops, {len(val_crops)} validation crops", flush=True)

    model = ShapeClassifier()
    steps_per_epoch = len(crops) // args.batch_size
    total = steps_per_epoch * args.epochs
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=total)
    step = 0
    for _epoch in range(args.epochs):
        order = torch.randperm(len(crops), generator=gen)
        for b in range(steps_per_epoch):
            idx = order[b * args.batch_size : (b + 1) * args.batch_size]
            loss = F.cross_entropy(model(crops[idx]), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
        with torch.no_grad():
            val_acc = (model(val_crops).argmax(1) == val_labels).float().mean()
        record.log(step, loss=loss.item(), val_accuracy=val_acc.item())
    model.eval()

    # Final: the whole oracle on fresh world images, clean and degraded.
    oracle = Oracle(model)
    scenes = world.sample_scenes(5000, seed=2_000_000 + args.seed)
    clean = world.render(scenes)
    record.final = {
        "clean_world_images": oracle.score(oracle.read(clean), scenes).as_dict(),
        "degraded_world_images": oracle.score(
            oracle.read(degrade(clean, torch.Generator().manual_seed(7))), scenes
        ).as_dict(),
        "held_out_crops_accuracy": record.curve[-1]["val_accuracy"],
    }
    print(record.final, flush=True)
    model.save(args.out)
    print(f"wrote {record.write(args.out)}")


if __name__ == "__main__":
    main()
