"""Zero-shot classification and image-text retrieval with a contrastive model.

These are the downstream tasks CLIP was evaluated on (Radford et al. 2021, "Learning
Transferable Visual Models From Natural Language Supervision"), and what the evaluation
measures before and after splicing a dictionary into a tower: the helpers run the model through
its adapter, so any hook installed on it (a spliced SAE, a steering edit) is in effect.

Logits are ``logit_scale · cos(image, text) + logit_bias`` with the model's learned temperature
(``logit_bias`` is 0 for CLIP and learned for SigLIP, whose objective is a per-pair sigmoid,
Zhai et al. 2023).

    classifier = zero_shot_classifier(adapter, ["cat", "dog"], templates=("a photo of a {}.",))
    result = zero_shot_classify(adapter, images, labels, classifier)
    result.accuracy, result.logits          # (N, C) temperature-scaled logits
    retrieval(adapter, images, captions).image_to_text[1]   # recall@1
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..configuration import ConfigError
from .clip import ContrastiveAdapter

DEFAULT_TEMPLATES = ("a photo of a {}.",)
"""CLIP's single default prompt; pass the 80 ImageNet templates of Radford et al. for the
published numbers."""


@dataclass
class ZeroShotClassifier:
    """Class embeddings: one unit vector per class, the normalised mean of its templates'
    normalised text embeddings (CLIP's prompt ensembling)."""

    weights: Tensor
    """``(C, D)`` unit-norm class embeddings."""
    class_names: list[str]
    templates: tuple[str, ...]


@dataclass
class ZeroShotResult:
    """Zero-shot predictions on a labelled set of images."""

    logits: Tensor
    """``(N, C)`` temperature-scaled logits."""
    predictions: Tensor
    """``(N,)`` predicted class index."""
    labels: Tensor
    """``(N,)`` true class index."""
    accuracy: float
    """Top-1 accuracy."""
    top5_accuracy: float
    """Top-5 accuracy (top-C when there are fewer than 5 classes)."""


@dataclass
class RetrievalResult:
    """Image-text retrieval: for each query, is a matching item among the top k?"""

    image_to_text: dict[int, float] = field(default_factory=dict)
    """k -> recall@k of retrieving a matching caption for each image."""
    text_to_image: dict[int, float] = field(default_factory=dict)
    """k -> recall@k of retrieving the matching image for each caption."""
    logits: Tensor | None = None
    """``(N_images, N_texts)`` temperature-scaled logits."""


def similarity_logits(
    adapter: ContrastiveAdapter, image_embeddings: Tensor, text_embeddings: Tensor
) -> Tensor:
    """``(N, M)`` logits ``scale · cos + bias`` between image and text embeddings."""
    images = F.normalize(image_embeddings.float(), dim=-1)
    texts = F.normalize(text_embeddings.float(), dim=-1)
    return adapter.logit_scale() * images @ texts.T + adapter.logit_bias()


def zero_shot_classifier(
    adapter: ContrastiveAdapter,
    class_names: Sequence[str],
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    *,
    batch_size: int = 256,
) -> ZeroShotClassifier:
    """Embed every ``template.format(class_name)`` and average per class."""
    if not class_names:
        raise ConfigError("zero-shot classification needs at least one class name")
    if not templates or any("{}" not in t for t in templates):
        raise ConfigError(f"templates must each hold '{{}}' where the class name goes: {templates}")
    prompts = [t.format(name) for name in class_names for t in templates]
    texts = F.normalize(adapter.encode_texts(prompts, batch_size=batch_size), dim=-1)
    weights = texts.reshape(len(class_names), len(templates), -1).mean(1)  # (C, D)
    return ZeroShotClassifier(F.normalize(weights, dim=-1), list(class_names), tuple(templates))


def zero_shot_classify(
    adapter: ContrastiveAdapter,
    images: Sequence[Any] | Tensor,
    labels: Sequence[int] | Tensor,
    classifier: ZeroShotClassifier,
    *,
    batch_size: int = 64,
) -> ZeroShotResult:
    """Classify ``images`` (PIL or pixel values ``(N, 3, H, W)``) by their nearest class
    embedding; accuracy against ``labels`` (class indices)."""
    labels = torch.as_tensor(labels, dtype=torch.long)
    if len(images) != len(labels):
        raise ConfigError(f"{len(images)} images but {len(labels)} labels")
    embeddings = adapter.encode_images(images, batch_size=batch_size)
    logits = similarity_logits(adapter, embeddings, classifier.weights.to(embeddings.device))
    logits = logits.cpu()
    predictions = logits.argmax(-1)
    k = min(5, logits.shape[1])
    top = logits.topk(k, dim=-1).indices
    return ZeroShotResult(
        logits=logits,
        predictions=predictions,
        labels=labels,
        accuracy=float((predictions == labels).float().mean()),
        top5_accuracy=float((top == labels[:, None]).any(-1).float().mean()),
    )


def retrieval(
    adapter: ContrastiveAdapter,
    images: Sequence[Any] | Tensor,
    texts: Sequence[str],
    *,
    text_image: Sequence[int] | None = None,
    ks: Sequence[int] = (1, 5, 10),
    batch_size: int = 64,
) -> RetrievalResult:
    """Recall@k of image->text and text->image retrieval.

    ``text_image[j]`` is the index of the image that caption ``j`` describes (default: caption
    ``j`` describes image ``j``; COCO-style sets give several captions per image).
    """
    owner = torch.as_tensor(
        range(len(texts)) if text_image is None else text_image, dtype=torch.long
    )  # (M,)
    if len(owner) != len(texts):
        raise ConfigError(f"text_image has {len(owner)} entries for {len(texts)} texts")
    if len(owner) and (int(owner.min()) < 0 or int(owner.max()) >= len(images)):
        raise ConfigError(f"text_image indices must lie in [0, {len(images)})")
    logits = similarity_logits(
        adapter,
        adapter.encode_images(images, batch_size=batch_size),
        adapter.encode_texts(list(texts)),
    ).cpu()  # (N, M)
    match = owner[None, :] == torch.arange(len(images))[:, None]  # (N, M): caption j fits image i
    result = RetrievalResult(logits=logits)
    for k in ks:
        top_texts = logits.topk(min(k, logits.shape[1]), dim=1).indices  # (N, k)
        result.image_to_text[k] = float(match.gather(1, top_texts).any(1).float().mean())
        top_images = logits.topk(min(k, logits.shape[0]), dim=0).indices  # (k, M)
        result.text_to_image[k] = float((top_images == owner[None, :]).any(0).float().mean())
    return result
