"""Downstream measurements on the testbed's three models, with held-out data drawn from its world.

* contrastive (``CLIPModel``): zero-shot accuracy for every factor (``"a red shape"``, ``"a
  circle"``, ... over single-object images) and retrieval of canonical captions;
* text-to-image (``TestbedPipeline``): samples from canonical captions, their pixel distance to
  the clean samples of the same seed, and the oracle's accuracy for every factor;
* generative VLM (``LlavaForConditionalGeneration``): next-token loss of the canonical caption
  given the image, loss recovered and KL.

Each takes the model (default: the shipped one) and a dictionary trained on one of its
hookpoints; the held-out scenes come from a seed the training scripts do not use.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from ..dictionaries import SparseAutoencoder
from .downstream import (
    ContrastiveResult,
    DiffusionResult,
    NextTokenResult,
    SpliceSite,
    ZeroShotTask,
    evaluate_contrastive,
    evaluate_diffusion,
    evaluate_next_token,
    pipeline_generator,
)

HELD_OUT_SEED = 9_009
"""Seed of the evaluation scenes (the testbed's training scripts draw from other seeds)."""


def contrastive_on_testbed(
    sae: SparseAutoencoder,
    *,
    model: Any = None,
    tokenizer: Any = None,
    n: int = 256,
    seed: int = HELD_OUT_SEED,
) -> ContrastiveResult:
    """Zero-shot accuracy per factor and caption retrieval, clean and spliced."""
    from ..testbed import models, world

    if model is None:
        model, tokenizer = models.load_clip()
    scenes = world.sample_scenes(n, seed, objects=1)
    images = world.render(scenes)  # (n, 3, 32, 32)
    tasks = {}
    for factor in world.FACTORS:
        values = world.FACTOR_VALUES[factor]
        truth = [
            s.background if factor == "background" else getattr(s.objects[0], factor)
            for s in scenes
        ]
        tasks[factor] = ZeroShotTask(
            world.factor_prompts(factor), torch.tensor([values.index(t) for t in truth])
        )
    from ..adapters.clip import CLIPAdapter

    clip = CLIPAdapter(model, tokenizer=tokenizer)
    return evaluate_contrastive(
        clip,
        SpliceSite(clip, sae),
        models.pixel_values(images),  # the adapter takes a tensor as pixel values
        zero_shot=tasks,
        captions=[s.caption() for s in scenes],
    )


def pipeline_site(pipe: Any, sae: SparseAutoencoder) -> SpliceSite:
    """Where the dictionary goes in a pipeline: through saekit's diffusion adapter, whose
    ``named_modules()`` namespace is the one caches of the pipeline were written with (the
    denoiser's blocks unprefixed, ``unet.*``, ``text_encoder.*``), and whose flatten rule tells
    a feature map from tokens."""
    from ..adapters.diffusion import DiffusionAdapter

    return SpliceSite(DiffusionAdapter(pipe), sae)


def diffusion_on_testbed(
    sae: SparseAutoencoder,
    *,
    pipe: Any = None,
    oracle: Any = None,
    n: int = 32,
    seed: int = HELD_OUT_SEED,
    num_inference_steps: int = 20,
) -> DiffusionResult:
    """Samples of canonical captions with the dictionary spliced into the denoiser (or the
    text encoder): pixel RMSE to the clean samples and the oracle's factor accuracy."""
    from ..testbed import models, world
    from ..testbed.oracle import Oracle

    pipe = pipe if pipe is not None else models.load_pipeline()
    oracle = oracle if oracle is not None else Oracle()
    scenes = world.sample_scenes(n, seed, objects=1)
    return evaluate_diffusion(
        pipeline_generator(pipe, num_inference_steps=num_inference_steps),
        pipeline_site(pipe, sae),
        [s.caption() for s in scenes],
        [seed + i for i in range(n)],
        scenes=scenes,
        oracle=oracle,
    )


def caption_batches(
    processor: Any, scenes: list[Any], images: Tensor, batch_size: int = 32
) -> Iterator[dict[str, Tensor]]:
    """Batches of ``<image> describe : <canonical caption> <eos>`` with labels on the caption."""
    from ..testbed import models, vlm

    tokenizer = getattr(processor, "tokenizer", processor)
    pad = tokenizer.pad_token_id
    for start in range(0, len(scenes), batch_size):
        examples = [
            vlm.encode_example(tokenizer, vlm.CAPTION_PROMPT, s.caption())
            for s in scenes[start : start + batch_size]
        ]
        width = max(len(ids) for ids, _ in examples)
        ids = torch.full((len(examples), width), pad, dtype=torch.long)
        labels = torch.full((len(examples), width), -100, dtype=torch.long)
        mask = torch.zeros((len(examples), width), dtype=torch.long)
        for i, (row, target) in enumerate(examples):
            ids[i, : len(row)] = torch.tensor(row)
            labels[i, : len(target)] = torch.tensor(target)
            mask[i, : len(row)] = 1
        yield {
            "input_ids": ids,
            "attention_mask": mask,
            "pixel_values": models.pixel_values(images[start : start + batch_size]),
            "labels": labels,
        }


def next_token_on_testbed(
    sae: SparseAutoencoder,
    *,
    model: Any = None,
    processor: Any = None,
    n: int = 128,
    seed: int = HELD_OUT_SEED,
) -> NextTokenResult:
    """Caption loss of the VLM (labels on the caption tokens), clean, spliced, zero-ablated."""
    from ..testbed import models, world

    if model is None:
        model, processor = models.load_vlm()
    scenes = world.sample_scenes(n, seed)
    images = world.render(scenes)
    return evaluate_next_token(
        model, SpliceSite(model, sae), caption_batches(processor, scenes, images)
    )
