"""Name CLIP latents by the vocabulary words whose text embedding is nearest to their direction.

Discover-then-Name (Rao et al. 2024) names the latents of a dictionary trained on CLIP image
embeddings by the word whose text embedding has the highest cosine with the decoder row. A
dictionary at an earlier layer writes into the residual stream, not the embedding space, so its
decoder rows are first carried to the embedding space by the rest of the tower's linear head:
the final layer norm's scale and the projection (the bias and the norm's centring and division
are not linear in the direction and are left out; a "logit lens" for CLIP). This is a first
approximation for early layers, exact for dictionaries on the embeddings themselves.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

DirectionMap = Callable[[Tensor], Tensor]
"""``(m, d_in)`` decoder rows -> ``(m, e)`` directions in the joint embedding space."""


def clip_direction_map(model: Any, hookpoint: str, d_in: int) -> DirectionMap | None:
    """The linear head from ``hookpoint`` of a transformers ``CLIPModel`` or an open_clip
    ``CLIP`` to its joint embedding space, or None when saekit does not know this model."""
    # transformers CLIPModel
    if hasattr(model, "visual_projection") and hasattr(model, "text_projection"):
        if hookpoint.startswith("visual_projection") or hookpoint.startswith("text_projection"):
            return lambda rows: rows
        if hookpoint.startswith("vision_model"):
            norm, projection = model.vision_model.post_layernorm, model.visual_projection
        elif hookpoint.startswith("text_model"):
            norm, projection = model.text_model.final_layer_norm, model.text_projection
        else:
            return None
        if norm.weight.numel() != d_in:
            return None
        return lambda rows: projection(rows.to(norm.weight) * norm.weight)
    # open_clip CLIP: visual.ln_post + visual.proj, ln_final + text_projection (d, e) matrices
    visual = getattr(model, "visual", None)
    if visual is not None and hasattr(model, "ln_final"):
        if hookpoint.startswith("visual") and getattr(visual, "proj", None) is not None:
            norm, matrix = visual.ln_post, visual.proj
        elif (
            hookpoint.startswith("transformer")
            and getattr(model, "text_projection", None) is not None
        ):
            norm, matrix = model.ln_final, model.text_projection
        else:
            return None
        if norm.weight.numel() != d_in:
            return None
        weight = matrix.weight.T if hasattr(matrix, "weight") else matrix
        return lambda rows: (rows.to(norm.weight) * norm.weight) @ weight
    return None


@torch.no_grad()
def nearest_words(
    directions: Tensor, word_embeddings: Tensor, words: Sequence[str], k: int = 5
) -> list[list[tuple[str, float]]]:
    """For each direction ``(m, e)``, the ``k`` words (embeddings ``(W, e)``) of highest cosine."""
    if word_embeddings.shape[0] != len(words):
        raise ValueError(f"{word_embeddings.shape[0]} embeddings for {len(words)} words")
    cosine = (
        F.normalize(directions.float(), dim=-1) @ F.normalize(word_embeddings.float(), dim=-1).T
    )
    top = cosine.topk(min(k, len(words)), dim=1)
    return [
        [(words[int(i)], round(float(c), 4)) for i, c in zip(idx, val, strict=True)]
        for idx, val in zip(top.indices, top.values, strict=True)
    ]


@torch.no_grad()
def latent_words(
    decoder: Tensor,
    direction_map: DirectionMap,
    encode_texts: Callable[[Sequence[str]], Tensor],
    vocabulary: Sequence[str],
    *,
    template: str = "{}",
    k: int = 5,
    batch: int = 4096,
) -> list[list[tuple[str, float]]]:
    """The ``k`` nearest vocabulary words of every decoder row ``(m, d_in)``; words are embedded
    as ``template.format(word)`` (e.g. ``"a photo of a {}"``)."""
    words = list(vocabulary)
    if not words:
        raise ValueError("the vocabulary is empty")
    embeddings = encode_texts([template.format(w) for w in words])  # (W, e)
    out: list[list[tuple[str, float]]] = []
    for start in range(0, decoder.shape[0], batch):
        mapped = direction_map(decoder[start : start + batch])  # (b, e)
        out += nearest_words(mapped, embeddings.to(mapped), words, k)
    return out
