"""Steering and unlearning: put a dictionary's features back into generation.

* :mod:`.config`: :class:`Intervention` (add / set / clamp / scale / ablate latents, strength
  absolute or relative to a latent's typical activation) and :class:`Scope` (token positions,
  image vs text tokens, a spatial mask, a denoising-step window, the CFG half, prefill vs
  decoding);
* :mod:`.hooks`: the transform at one hookpoint (the SAE error kept, so only the edit reaches
  the model; nothing in scope leaves the model bit for bit);
* :mod:`.context`: which call of generation a hook is in (step, CFG half, decoding step);
* :mod:`.selection`: a concept's latents per hookpoint and step (SAeUron's score), saved as a
  small JSON file;
* :mod:`.unlearn`: suppress selected concepts wherever their latents fire;
* :mod:`.api`: :func:`steer`, the handle that removes every hook on exit.
"""

from __future__ import annotations

from .api import SteeringHandle, steer
from .config import Intervention, Scope
from .hooks import SteeringTransform, add_vector, feature_values, resize_mask
from .selection import (
    LatentStats,
    Selection,
    SelectionEntry,
    collect_rows,
    latent_stats,
    pick,
    saeuron_scores,
    select_concept,
    specificities,
)
from .unlearn import DEFAULT_MIN_SPECIFICITY, unlearn, unlearn_interventions

__all__ = [
    "DEFAULT_MIN_SPECIFICITY",
    "Intervention",
    "LatentStats",
    "Scope",
    "Selection",
    "SelectionEntry",
    "SteeringHandle",
    "SteeringTransform",
    "add_vector",
    "collect_rows",
    "feature_values",
    "latent_stats",
    "pick",
    "resize_mask",
    "saeuron_scores",
    "select_concept",
    "specificities",
    "steer",
    "unlearn",
    "unlearn_interventions",
]
