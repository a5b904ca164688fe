"""The testbed: a small world with known factors and three models trained on it.

saekit's embedded default. No CLIP, diffusion model or VLM can be downloaded offline, and a demo on
random weights shows nothing, so saekit ships its own small models, built from the library classes
that real models use and trained by ``scripts/train_testbed_*.py`` on a procedurally generated
world whose every factor is known:

- `world`: scenes (shape, colour, size, 3x3 position, background; one or two objects), rendering,
  template captions (canonical, shuffled, partial, single facts), labels;
- `oracle`: reads the factors back from pixels (and a small shape CNN); judges generated images;
- `models`: ``load_clip()`` (transformers ``CLIPModel``), ``load_pipeline()`` (diffusers
  ``UNet2DConditionModel`` in a `pipeline.TestbedPipeline`), ``load_vlm()`` (transformers
  ``LlavaForConditionalGeneration``), all from directories inside the package, offline;
- `pipeline.generate` and `vlm.caption` / `vlm.answer`: generation helpers;
- `evaluate`: each model's accuracy against the ground truth.

Because the factors are known, the testbed measures what real models cannot: whether a latent
tracks "red", whether steering toward "red" makes the generated shapes red, whether unlearning
"circle" removes circles and nothing else.
"""

from __future__ import annotations

from . import world
from .models import load_clip, load_pipeline, load_vlm
from .oracle import Oracle, Reading
from .world import (
    FACTOR_VALUES,
    FACTORS,
    Scene,
    SceneObject,
    describe,
    factor_prompts,
    parse_caption,
    presence,
    render,
    sample_scenes,
    value_names,
)

__all__ = [
    "FACTORS",
    "FACTOR_VALUES",
    "Oracle",
    "Reading",
    "Scene",
    "SceneObject",
    "describe",
    "factor_prompts",
    "load_clip",
    "load_pipeline",
    "load_vlm",
    "parse_caption",
    "presence",
    "render",
    "sample_scenes",
    "value_names",
    "world",
]
