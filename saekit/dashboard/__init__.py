"""The feature dashboard: a static site (no server, no network) with an index of latents and
one page per latent, built in one streaming pass over an activation cache.

* :mod:`.collect`: the pass (per-latent statistics, top and sampled inputs with their heatmaps);
* :mod:`.inputs`: what an input looks like (image, tokens, text) and where positions lie on it;
* :mod:`.vocabulary`: CLIP latents named by their nearest vocabulary words;
* :mod:`.steering_preview`: a latent's decoder direction added to a text-to-image model;
* :mod:`.render`: the HTML; :mod:`.build`: all of it, :func:`build_dashboard`.
"""

from .build import DashboardConfig, DashboardResult, SteeringSpec, build_dashboard
from .collect import CollectConfig, LatentCollection, collect
from .inputs import PositionLayout, SourceInputs, infer_layout
from .steering_preview import SteeringGrid, add_direction, steering_grid
from .vocabulary import clip_direction_map, latent_words, nearest_words

__all__ = [
    "CollectConfig",
    "DashboardConfig",
    "DashboardResult",
    "LatentCollection",
    "PositionLayout",
    "SourceInputs",
    "SteeringGrid",
    "SteeringSpec",
    "add_direction",
    "build_dashboard",
    "clip_direction_map",
    "collect",
    "infer_layout",
    "latent_words",
    "nearest_words",
    "steering_grid",
]
