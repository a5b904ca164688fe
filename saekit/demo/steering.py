"""The demo's steering stage: steer the testbed's text-to-image model toward a colour with its
latents, and unlearn a shape, each shown as before/after grids with the oracle's verdicts.

The dictionary sits on the text tower's last layer (steering through the text encoder, as
Concept Steerers do, Kim & Ghadiyaram 2025): on this UNet, edits at the mid block barely move the
samples (see ``scripts/bench_steer.py``). Concept latents are selected with SAeUron's score
(Cywinski & Deja 2025) from captions with and without the value. The shape is unlearned by
replacing it with an anchor shape (Kumari et al. 2023), the setting that met the unlearning
targets in ``scripts/bench_steer.py``: negative scaling alone also erased the object's size and
position.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..steering import steer, unlearn
from ..steering.testbed import (
    diffusion_setup,
    factor_selections,
    generate_images,
    read_factors,
    selection_interventions,
    value_of,
)
from ..testbed import world
from ..testbed.oracle import Oracle
from . import report as report_files
from .config import DemoConfig

STEER_FACTOR, STEER_TARGET, STEER_STRENGTH = "color", "red", 2.0
UNLEARN_FACTOR, UNLEARN_TARGET, UNLEARN_ANCHOR, UNLEARN_ANCHOR_STRENGTH = (
    "shape",
    "circle",
    "cross",
    0.75,
)


def _read(oracle: Oracle, images: torch.Tensor, factor: str) -> list[str | None]:
    """The oracle's reading of ``factor`` for each image (None: no object found)."""
    return [facts[factor] for facts in read_factors(oracle, images)]


def _pair_grid(before: torch.Tensor, after: torch.Tensor, path: Path) -> str:
    """Two rows: the samples before (top) and after (bottom) the intervention."""
    return report_files.save_grid(torch.cat([before, after]), path, ncols=len(before))


def run_steering(cfg: DemoConfig, pipe: Any, out: Path, say: Any) -> dict[str, Any]:
    """Steer ``pipe`` toward red and unlearn circles; returns the report's ``steering`` section."""
    n_scenes = 240 if cfg.steering_prompts < 16 else 600
    setup = diffusion_setup(
        pipe,
        n_scenes=n_scenes,
        num_inference_steps=20,
        guidance_scale=cfg.guidance_scale,
        seed=cfg.seed,
    )
    oracle = Oracle()
    n = cfg.steering_prompts
    pool = world.sample_scenes(8 * n, seed=70_000_000 + cfg.seed, objects=1)

    # steering: prompts naming another colour, the same noise with and without the edit
    say(f"[demo]     steering {STEER_FACTOR} -> {STEER_TARGET} through {setup.hookpoint}")
    selection = factor_selections(
        setup.sae, setup.hookpoint, setup.rows, setup.scenes, STEER_FACTOR, count=4
    )[STEER_TARGET]
    scenes = [s for s in pool if value_of(s, STEER_FACTOR) != STEER_TARGET][:n]
    prompts = [s.caption() for s in scenes]
    clean = generate_images(setup.adapter, prompts, cfg.seed)
    interventions = selection_interventions(selection, kind="add", strength=STEER_STRENGTH)
    with steer(setup.adapter, setup.sae, interventions, typical=selection):
        steered = generate_images(setup.adapter, prompts, cfg.seed)
    before, after = _read(oracle, clean, STEER_FACTOR), _read(oracle, steered, STEER_FACTOR)
    steer_row = {
        "target": f"{STEER_FACTOR}={STEER_TARGET}",
        "strength (x typical activation)": STEER_STRENGTH,
        "prompts": n,
        "target read before": sum(v == STEER_TARGET for v in before) / n,
        "target read after": sum(v == STEER_TARGET for v in after) / n,
        "latents": len({f for e in selection.entries for f in e.features}),
    }

    # unlearning: prompts naming the shape (should lose it) and others (should keep theirs)
    say(f"[demo]     unlearning {UNLEARN_FACTOR}={UNLEARN_TARGET}")
    shapes = factor_selections(
        setup.sae, setup.hookpoint, setup.rows, setup.scenes, UNLEARN_FACTOR, count=8
    )
    named = [s for s in pool if value_of(s, UNLEARN_FACTOR) == UNLEARN_TARGET][: n // 2]
    other = [s for s in pool if value_of(s, UNLEARN_FACTOR) != UNLEARN_TARGET][: n - len(named)]
    scenes = named + other
    prompts = [s.caption() for s in scenes]
    clean_u = generate_images(setup.adapter, prompts, cfg.seed)
    with unlearn(
        setup.adapter,
        setup.sae,
        shapes[UNLEARN_TARGET],
        multiplier=0.0,
        anchor=shapes[UNLEARN_ANCHOR],
        anchor_strength=UNLEARN_ANCHOR_STRENGTH,
    ):
        forgot = generate_images(setup.adapter, prompts, cfg.seed)
    read_clean, read_forgot = (_read(oracle, x, UNLEARN_FACTOR) for x in (clean_u, forgot))
    k = len(named)
    asked = [value_of(s, UNLEARN_FACTOR) for s in other]
    unlearn_row = {
        "concept": f"{UNLEARN_FACTOR}={UNLEARN_TARGET}",
        "anchor (strength)": f"{UNLEARN_ANCHOR} ({UNLEARN_ANCHOR_STRENGTH})",
        "prompts naming it / others": f"{k} / {len(other)}",
        "named shape drawn, before": sum(v == UNLEARN_TARGET for v in read_clean[:k]) / max(k, 1),
        "named shape drawn, after": sum(v == UNLEARN_TARGET for v in read_forgot[:k]) / max(k, 1),
        "other shapes right, before": sum(
            v == a for v, a in zip(read_clean[k:], asked, strict=True)
        )
        / max(len(other), 1),
        "other shapes right, after": sum(
            v == a for v, a in zip(read_forgot[k:], asked, strict=True)
        )
        / max(len(other), 1),
    }
    grids = [
        {
            "png": _pair_grid(clean, steered, out / "steer_red.png"),
            "caption": f"top: samples of captions naming other colours; bottom: the same noise "
            f"with the red latents added at {STEER_STRENGTH}x their typical activation",
        },
        {
            "png": _pair_grid(clean_u, forgot, out / "unlearn_circle.png"),
            "caption": f"top: samples (left half: captions naming a circle); bottom: the same "
            f"with the circle latents replaced by the {UNLEARN_ANCHOR} latents "
            f"({UNLEARN_ANCHOR_STRENGTH}x typical) where circle fires",
        },
    ]
    return {
        "hookpoint": setup.hookpoint,
        "grids": grids,
        "tables": {"Steering": [steer_row], "Unlearning": [unlearn_row]},
    }
