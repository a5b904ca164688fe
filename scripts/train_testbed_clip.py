"""Train the testbed's contrastive model: a tiny transformers ``CLIPModel`` on the world.

    nice -n 10 python scripts/train_testbed_clip.py             # writes saekit/testbed/pretrained/clip

Each step draws fresh scenes (30% with two objects) in groups of four that differ in one factor
(mostly shape or position: hard negatives, without which the model learns colour, size and
background in a few hundred steps and shape and position hardly at all), and one caption per
image: full captions in shuffled word orders and partial captions that state only some factors. A partial caption such
as "a red shape" is true of many images in a batch, so the loss is CLIP's symmetric
cross-entropy (Radford et al. 2021) with every *consistent* image-caption pair as a positive
(the targets spread uniformly over them; cf. supervised contrastive learning, Khosla et al.
2020), rather than only the diagonal. A quarter of the images are degraded (blur, noise, colour
drift) so the image tower also reads the diffusion model's samples.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch

from saekit.testbed import world
from saekit.testbed.degrade import degrade
from saekit.testbed.evaluate import clip_zero_shot
from saekit.testbed.models import (
    CLIP_DIR,
    build_image_processor,
    build_tokenizer,
    clip_config,
    pixel_values,
)
from saekit.testbed.recording import TrainingRecord, seed_everything


def caption_batch(
    scenes: list[world.Scene], rng: np.random.Generator, p_partial: float, p_single: float
) -> list[world.Caption]:
    """One caption per scene: a single fact, a partial caption, or a full shuffled caption."""
    out = []
    for scene in scenes:
        u = rng.random()
        if u < p_single:
            out.append(world.describe(scene, "single", rng))
        elif u < p_single + p_partial:
            out.append(world.describe(scene, "partial", rng))
        else:
            out.append(world.describe(scene, "shuffled", rng))
    return out


def contrastive_loss(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Symmetric cross-entropy of ``(B, B)`` image->text logits with soft multi-positive targets."""
    pos = positives.float()
    image_to_text = -(pos / pos.sum(1, keepdim=True) * logits.log_softmax(dim=1)).sum(1).mean()
    text_to_image = -(pos / pos.sum(0, keepdim=True) * logits.log_softmax(dim=0)).sum(0).mean()
    return (image_to_text + text_to_image) / 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=CLIP_DIR)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--p_partial", type=float, default=0.3)
    parser.add_argument("--p_single", type=float, default=0.3)
    parser.add_argument(
        "--group_size", type=int, default=4, help="scenes per group that differ in one factor"
    )
    parser.add_argument(
        "--locked_text_steps",
        type=int,
        default=300,
        help="steps at the start during which the text tower stays at its random initialisation",
    )
    parser.add_argument("--eval_every", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    seed_everything(args.seed, args.threads)
    rng = np.random.default_rng(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    record = TrainingRecord("CLIPModel", {k: str(v) for k, v in vars(args).items()})

    from transformers import CLIPModel

    tokenizer = build_tokenizer(add_eos=True)
    model = CLIPModel(clip_config(len(tokenizer), hidden=args.hidden, layers=args.layers))
    print(f"CLIPModel with {sum(p.numel() for p in model.parameters()):,} parameters", flush=True)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    other = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.05}, {"params": other, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.98),
    )

    def lr_at(step: int) -> float:  # linear warm-up, cosine decay to 5%
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        t = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))

    text_tower = torch.nn.ModuleList([model.text_model, model.text_projection])
    val_scenes = world.sample_scenes(500, seed=1_000_000 + args.seed, objects=1)
    running = 0.0
    for step in range(args.steps):
        scenes, _ = world.variant_groups(
            args.batch_size // args.group_size, args.group_size, seed=int(rng.integers(2**31))
        )
        images = world.render(scenes)  # (B, 3, H, W)
        degraded = torch.rand(len(images), generator=gen) < 0.25
        images[degraded] = degrade(images[degraded], gen)
        captions = caption_batch(scenes, rng, args.p_partial, args.p_single)
        text = tokenizer([c.text for c in captions], padding=True, return_tensors="pt")
        positives = torch.from_numpy(
            world.consistency([c.description for c in captions], scenes)
        ).T  # (images, captions)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        text_tower.requires_grad_(step >= args.locked_text_steps)
        out = model(
            input_ids=text["input_ids"],
            attention_mask=text["attention_mask"],
            pixel_values=pixel_values(images),
        )
        loss = contrastive_loss(out.logits_per_image, positives)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():  # CLIP clamps the learned temperature at 100
            model.logit_scale.clamp_(0, math.log(100))
        running = loss.item() if step == 0 else 0.98 * running + 0.02 * loss.item()
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            model.eval()
            acc = clip_zero_shot(model, tokenizer, val_scenes)
            model.train()
            record.log(
                step + 1,
                loss=running,
                logit_scale=model.logit_scale.exp().item(),
                **{f"zero_shot_{k}": v for k, v in acc.items()},
            )

    model.eval()
    test_scenes = world.sample_scenes(5000, seed=3_000_000 + args.seed, objects=1)
    test_images = world.render(test_scenes)
    record.final = {
        "zero_shot_accuracy_held_out": clip_zero_shot(model, tokenizer, test_scenes, test_images),
        "zero_shot_accuracy_degraded": clip_zero_shot(
            model, tokenizer, test_scenes, degrade(test_images, torch.Generator().manual_seed(7))
        ),
        "n_test_images": len(test_scenes),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    print(record.final, flush=True)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    build_image_processor().save_pretrained(args.out)
    print(f"wrote {record.write(args.out)}")


if __name__ == "__main__":
    main()
