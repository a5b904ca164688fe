"""Unlearning: suppress a concept's latents wherever they fire, keeping everything else.

SAeUron (Cywinski & Deja 2025) removes a concept from a diffusion model by selecting the
concept's latents per denoising step (:mod:`.selection`) and, at inference, multiplying their
activations by a negative factor while the SAE error is kept, so nothing but the concept's
latents changes. A latent that does not fire on a row has value 0 and stays 0: the edit acts
only where the concept is present. Several concepts are unlearned at once by taking the union
of their latents per hookpoint and step (a latent shared by two concepts is scaled once).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..dictionaries import SparseAutoencoder
from .api import SteeringHandle, steer
from .config import Intervention, Scope
from .selection import Selection, merge_features

DEFAULT_MULTIPLIER = -1.0
"""SAeUron's negative multiplier: the concept's latents are flipped, not only zeroed, which
pushes the activation away from the concept (the paper tunes it per model; -1 to -5 here)."""


def unlearn_interventions(
    selections: Selection | Sequence[Selection], *, multiplier: float = DEFAULT_MULTIPLIER
) -> list[Intervention]:
    """``scale`` interventions for ``selections``: one per hookpoint and selected step."""
    if isinstance(selections, Selection):
        selections = [selections]
    label = "unlearn " + ", ".join(s.concept for s in selections)
    out = []
    for (hookpoint, step), features in merge_features(selections).items():
        if not features:
            continue
        scope = Scope() if step is None else Scope(steps=(step, step + 1))
        out.append(
            Intervention(
                tuple(features),
                kind="scale",
                strength=multiplier,
                hookpoint=hookpoint,
                scope=scope,
                label=label,
            )
        )
    return out


def unlearn(
    model: Any,
    saes: SparseAutoencoder | Mapping[str, SparseAutoencoder],
    selections: Selection | Sequence[Selection],
    *,
    multiplier: float = DEFAULT_MULTIPLIER,
) -> SteeringHandle:
    """Install the unlearning of ``selections`` on ``model`` (a context manager, like
    :func:`~.api.steer`)."""
    return steer(model, saes, unlearn_interventions(selections, multiplier=multiplier))
