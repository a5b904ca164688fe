"""Measure the testbed models against the world's ground truth.

- `clip_zero_shot`: for each factor, classify single-object images by the most similar of that
  factor's prompts (`world.factor_prompts`: "a red shape", "a circle", "a shape at the top left").
- `pipeline_accuracy`: generate from canonical captions and let the `Oracle` read the samples.
- `vlm_caption_accuracy`: caption images greedily, parse the captions, compare factor by factor.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from . import world
from .models import pixel_values
from .oracle import Oracle, OracleScore

if TYPE_CHECKING:
    from transformers import CLIPModel, PreTrainedTokenizerBase

    from .pipeline import TestbedPipeline


@torch.no_grad()
def clip_text_embeddings(
    model: CLIPModel, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]
) -> torch.Tensor:
    """Unit-norm text embeddings ``(T, d)``."""
    batch = tokenizer(list(texts), padding=True, return_tensors="pt")
    out = model.get_text_features(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    )
    emb = out if isinstance(out, torch.Tensor) else out.pooler_output
    return torch.nn.functional.normalize(emb, dim=-1)


@torch.no_grad()
def clip_image_embeddings(
    model: CLIPModel, images: torch.Tensor, batch_size: int = 512
) -> torch.Tensor:
    """Unit-norm image embeddings ``(N, d)`` of world images ``(N, 3, H, W)`` in [0, 1]."""
    chunks = []
    for i in range(0, len(images), batch_size):
        out = model.get_image_features(pixel_values=pixel_values(images[i : i + batch_size]))
        emb = out if isinstance(out, torch.Tensor) else out.pooler_output
        chunks.append(torch.nn.functional.normalize(emb, dim=-1))
    return torch.cat(chunks)


def zero_shot_predict(
    model: CLIPModel,
    tokenizer: PreTrainedTokenizerBase,
    images: torch.Tensor,
    factor: str,
) -> list[str]:
    """The predicted value of ``factor`` for every image (argmax over `world.factor_prompts`)."""
    text = clip_text_embeddings(model, tokenizer, world.factor_prompts(factor))  # (V, d)
    image = clip_image_embeddings(model, images)  # (N, d)
    values = world.FACTOR_VALUES[factor]
    return [values[int(i)] for i in (image @ text.T).argmax(dim=1)]


def clip_zero_shot(
    model: CLIPModel,
    tokenizer: PreTrainedTokenizerBase,
    scenes: Sequence[world.Scene],
    images: torch.Tensor | None = None,
) -> dict[str, float]:
    """Zero-shot accuracy per factor on single-object ``scenes`` (rendered unless given)."""
    if any(s.count != 1 for s in scenes):
        raise ValueError("zero-shot factor accuracy is defined on single-object scenes")
    images = world.render(scenes) if images is None else images
    accuracy = {}
    for factor in world.FACTORS:
        predicted = zero_shot_predict(model, tokenizer, images, factor)
        truth = [
            s.background if factor == "background" else getattr(s.objects[0], factor)
            for s in scenes
        ]
        accuracy[factor] = sum(p == t for p, t in zip(predicted, truth, strict=True)) / len(scenes)
    return accuracy


@dataclass(frozen=True)
class PipelineEval:
    """The oracle's verdict on samples generated from canonical captions."""

    score: OracleScore
    images: torch.Tensor  # (N, 3, H, W) in [0, 1]
    prompts: list[str]

    def as_dict(self) -> dict[str, Any]:
        return {**self.score.as_dict(), "n_prompts": len(self.prompts)}


def pipeline_accuracy(
    pipe: TestbedPipeline,
    scenes: Sequence[world.Scene],
    oracle: Oracle | None = None,
    *,
    seed: int = 0,
    batch_size: int = 64,
    **generate_kwargs: Any,
) -> PipelineEval:
    """Generate one image per scene from its canonical caption and score it with the oracle."""
    from .pipeline import generate

    oracle = oracle or Oracle()
    prompts = [s.caption() for s in scenes]
    images = generate(pipe, prompts, seed=seed, batch_size=batch_size, **generate_kwargs)
    return PipelineEval(oracle.score(oracle.read(images), scenes), images, prompts)


def caption_factor_accuracy(
    captions: Sequence[str], scenes: Sequence[world.Scene]
) -> dict[str, float]:
    """Share of factors a set of captions gets right, per factor and ``overall``.

    Each true object is compared with the described object in the same cell, else with the
    described object at the same place in reading order (its position then counts as wrong), else
    counts wrong on every factor. ``overall`` is the mean over every (object, factor) and
    (image, background) pair.
    """
    if len(captions) != len(scenes):
        raise ValueError(f"{len(captions)} captions but {len(scenes)} scenes")
    hits = dict.fromkeys(world.FACTORS, 0)
    totals = dict.fromkeys(world.FACTORS, 0)
    for text, scene in zip(captions, scenes, strict=True):
        said = world.parse_caption(text)
        totals["background"] += 1
        hits["background"] += said.background == scene.background
        ordered = sorted(scene.objects, key=lambda o: world.POSITIONS.index(o.position))
        for k, obj in enumerate(ordered):
            same_cell = [o for o in said.objects if o.position == obj.position]
            facts = (
                same_cell[0]
                if same_cell
                else (said.objects[k] if k < len(said.objects) else world.ObjectFacts())
            )
            for f in world.OBJECT_FACTORS:
                totals[f] += 1
                hits[f] += getattr(facts, f) == getattr(obj, f)
    accuracy = {f: hits[f] / max(totals[f], 1) for f in world.FACTORS}
    accuracy["overall"] = sum(hits.values()) / max(sum(totals.values()), 1)
    return accuracy


def vlm_caption_accuracy(
    model: Any, processor: Any, scenes: Sequence[world.Scene], images: torch.Tensor | None = None
) -> dict[str, float]:
    """Caption ``scenes`` (rendered unless ``images`` given) and score the captions."""
    from .vlm import caption

    images = world.render(scenes) if images is None else images
    return caption_factor_accuracy(caption(model, processor, images), scenes)


def vlm_qa_accuracy(
    model: Any, processor: Any, scenes: Sequence[world.Scene], seed: int = 0
) -> dict[str, float]:
    """Ask one random question (`world.questions`) per scene; accuracy per question kind."""
    import numpy as np

    from .vlm import answer

    rng = np.random.default_rng(seed)
    asked = []
    for scene in scenes:
        options = world.questions(scene)
        asked.append(options[int(rng.integers(len(options)))])
    replies = answer(model, processor, world.render(scenes), [q for _, q, _ in asked])
    hits: dict[str, list[bool]] = {k: [] for k in world.QUESTION_KINDS}
    for (kind, _, truth), reply in zip(asked, replies, strict=True):
        hits[kind].append(reply == truth)
    out = {k: sum(v) / len(v) for k, v in hits.items() if v}
    out["overall"] = sum(sum(v) for v in hits.values()) / max(len(asked), 1)
    return out
