"""Train the testbed's VLM: a transformers ``LlavaForConditionalGeneration`` on the world.

    nice -n 10 python scripts/train_testbed_vlm.py              # needs pretrained/clip; writes pretrained/vlm

The image tower is the testbed CLIP's, copied and frozen (so its activations are the contrastive
model's); the projector and a small Llama language model learn, as in LLaVA's recipe (Liu et al.
2023) compressed into one stage, to write the canonical caption after ``<image> describe :`` and
to answer factor questions after ``<image> question : ... answer :``. Only the answer tokens
carry loss.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from saekit.testbed import world
from saekit.testbed.evaluate import vlm_caption_accuracy, vlm_qa_accuracy
from saekit.testbed.models import (
    CLIP_DIR,
    PATCH_SIZE,
    VLM_DIR,
    build_image_processor,
    build_tokenizer,
    llava_config,
    load_clip,
    pixel_values,
)
from saekit.testbed.recording import TrainingRecord, seed_everything
from saekit.testbed.vlm import CAPTION_PROMPT, encode_example, question_prompt


def batch_for(
    scenes: list[world.Scene], tokenizer: Any, rng: np.random.Generator, p_caption: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` for one example per scene."""
    examples = []
    for scene in scenes:
        if rng.random() < p_caption:
            examples.append(encode_example(tokenizer, CAPTION_PROMPT, scene.caption()))
        else:
            options = world.questions(scene)
            _, question, reply = options[int(rng.integers(len(options)))]
            examples.append(encode_example(tokenizer, question_prompt(question), reply))
    length = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), length), tokenizer.pad_token_id)
    labels = torch.full((len(examples), length), -100)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    for i, (x, y) in enumerate(examples):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
        mask[i, : len(x)] = 1
    return ids, mask, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clip", type=Path, default=CLIP_DIR, help="the trained CLIP directory")
    parser.add_argument("--out", type=Path, default=VLM_DIR)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--p_caption", type=float, default=0.5)
    parser.add_argument("--p_two", type=float, default=0.3)
    parser.add_argument("--eval_every", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    seed_everything(args.seed, args.threads)
    rng = np.random.default_rng(args.seed)
    record = TrainingRecord(
        "LlavaForConditionalGeneration", {k: str(v) for k, v in vars(args).items()}
    )

    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    clip, _ = load_clip(args.clip)
    tokenizer = build_tokenizer(add_eos=False)
    model = LlavaForConditionalGeneration(
        llava_config(clip.config, len(tokenizer), hidden=args.hidden, layers=args.layers)
    )
    vision = model.model.vision_tower
    vision.load_state_dict(clip.vision_model.state_dict())
    vision.requires_grad_(False).eval()
    processor = LlavaProcessor(
        image_processor=build_image_processor(),
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # the CLS token, which the projector does not see
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    print(
        f"LLaVA with {sum(p.numel() for p in model.parameters()):,} parameters, "
        f"{sum(p.numel() for p in trainable):,} trained",
        flush=True,
    )
    opt = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        t = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))

    val_scenes = world.sample_scenes(200, seed=1_000_000 + args.seed, p_two=args.p_two)
    running = 0.0
    for step in range(args.steps):
        model.train()
        vision.eval()
        scenes = world.sample_scenes(
            args.batch_size, seed=int(rng.integers(2**31)), p_two=args.p_two
        )
        ids, mask, labels = batch_for(scenes, tokenizer, rng, args.p_caption)
        out = model(
            input_ids=ids,
            attention_mask=mask,
            pixel_values=pixel_values(world.render(scenes)),
            labels=labels,
        )
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        running = out.loss.item() if step == 0 else 0.98 * running + 0.02 * out.loss.item()
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            model.eval()
            acc = vlm_caption_accuracy(model, processor, val_scenes)
            record.log(step + 1, loss=running, **{f"caption_{k}": v for k, v in acc.items()})

    model.eval()
    test = world.sample_scenes(1000, seed=3_000_000 + args.seed, p_two=args.p_two)
    single = [s for s in test if s.count == 1]
    double = [s for s in test if s.count == 2]
    record.final = {
        "caption_accuracy": vlm_caption_accuracy(model, processor, test),
        "caption_accuracy_one_object": vlm_caption_accuracy(model, processor, single),
        "caption_accuracy_two_objects": vlm_caption_accuracy(model, processor, double),
        "qa_accuracy": vlm_qa_accuracy(model, processor, test),
        "n_test_images": len(test),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    print(record.final, flush=True)
    model.save_pretrained(args.out)
    processor.save_pretrained(args.out)
    print(f"wrote {record.write(args.out)}")


if __name__ == "__main__":
    main()
