"""``saekit unlearn``: generate with one or more concepts suppressed (SAeUron, Cywinski & Deja
2025), from selection files; optionally select the concept first.

    saekit unlearn pretrained/pipeline --saes runs/mid --selections circle.json red.json \
        --multiplier -2 --prompts "a large circle at the center" --output_dir out/
    saekit unlearn pretrained/pipeline --saes runs/mid --concept circle \
        --with_prompts circles.txt --without_prompts others.txt --count 8 \
        --save_selection circle.json --prompts "a circle" --output_dir out/
    saekit unlearn pretrained/pipeline --saes runs/text --selections circle.json \
        --multiplier 0 --anchor square.json --prompts "a large circle" --output_dir out/

Writes the images (or texts) and ``applied.json`` (the concepts, their latents per hookpoint
and step, the calls and rows edited).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..configuration import ConfigError, add_arguments, collect_overrides, load_config
from .steer import GenerationConfig, generate_outputs, load_model, load_saes, write_applied


@dataclass
class UnlearnConfig(GenerationConfig):
    """Which concepts to suppress, and how strongly."""

    selections: list[str] = field(default_factory=list)
    """Selection files (saekit.steering.Selection), one per concept."""

    multiplier: float = -1.0
    """Factor of the concepts' latents where they fire (negative: pushed away; 0 with --anchor)."""

    anchor: str | None = None
    """Selection file of a concept put in the unlearned concepts' place where they fire (Kumari
    et al. 2023's anchor concept; e.g. --multiplier 0 --anchor square.json)."""

    anchor_strength: float = 1.0
    """The anchor's latents, in units of their typical activation, on a row where the concepts
    fire as strongly as typical (less where they fire less)."""

    min_specificity: float = 0.9
    """Selected latents at least this specific to their concept are its detectors; the others
    (shared with other concepts) are edited only where a detector fires. 0: every latent is
    edited wherever it fires (SAeUron as published)."""

    concept: str | None = None
    """Select this concept first, from --with_prompts and --without_prompts."""

    with_prompts: str | None = None
    """Prompts with the concept (one per line)."""

    without_prompts: str | None = None
    """Prompts without it."""

    count: int | None = None
    """Latents selected per hookpoint and step (or --percentile)."""

    percentile: float | None = None
    """Select the latents above this percentile of scores (SAeUron)."""

    save_selection: str | None = None
    """Where to write the new selection file (default: <output_dir>/<concept>.json)."""


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "unlearn",
        help="generate with concepts suppressed wherever their latents fire (SAeUron)",
        description="Scale the latents of selected concepts by a negative multiplier, per "
        "hookpoint and denoising step, keeping the SAE error; select a concept from prompts with "
        "and without it first if asked. Writes the outputs and applied.json.",
    )
    parser.add_argument("model", help="a model folder or hub id (a pipeline or a VLM)")
    parser.add_argument("--config", help="YAML file of settings (flags override it)")
    add_arguments(parser, UnlearnConfig)
    parser.set_defaults(handler=run)


def _lines(path: str | None, flag: str) -> list[str]:
    if not path:
        raise ConfigError(f"--concept needs {flag} (a file of prompts, one per line)")
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"no prompts file at {file}")
    return [line.strip() for line in file.read_text().splitlines() if line.strip()]


def _select(cfg: UnlearnConfig, adapter: Any, saes: dict[str, Any]) -> Any:
    from ..steering import collect_rows, select_concept

    assert cfg.concept is not None
    if (cfg.count is None) == (cfg.percentile is None):
        raise ConfigError("selecting a concept needs exactly one of --count or --percentile")
    positive = collect_rows(adapter, list(saes), _lines(cfg.with_prompts, "--with_prompts"))
    negative = collect_rows(adapter, list(saes), _lines(cfg.without_prompts, "--without_prompts"))
    selection = select_concept(
        cfg.concept, saes, positive, negative, count=cfg.count, percentile=cfg.percentile
    )
    selection.meta["num_inference_steps"] = cfg.num_inference_steps
    path = cfg.save_selection or str(Path(cfg.output_dir) / f"{cfg.concept}.json")
    selection.save(path)
    print(f"[unlearn] selected {cfg.concept!r}: wrote {path}")
    return selection


def run(args: argparse.Namespace) -> int:
    from ..steering import Selection, unlearn

    cfg = load_config(UnlearnConfig, args.config, collect_overrides(args, UnlearnConfig))
    if not 0 <= cfg.min_specificity <= 1:
        raise ConfigError(
            f"--min_specificity must be in [0, 1] (a share of a latent's activation; 0: edit "
            f"every selected latent wherever it fires), got {cfg.min_specificity}"
        )
    saes = load_saes(cfg.saes, cfg.hookpoint, cfg.device)
    adapter = load_model(args.model, cfg.adapter, cfg)
    selections = [Selection.load(p) for p in cfg.selections]
    anchor = Selection.load(cfg.anchor) if cfg.anchor else None
    if cfg.concept:
        selections.append(_select(cfg, adapter, saes))
    if not selections:
        raise ConfigError("give --selections (files) or --concept with prompts to select it")
    named = [*selections, *([anchor] if anchor is not None else [])]
    unknown = {e.hookpoint for s in named for e in s.entries} - set(saes)
    if unknown:
        raise ConfigError(
            f"the selections name hookpoints {sorted(unknown)} but --saes has {sorted(saes)}"
        )
    record: dict[str, Any] = {
        "command": "unlearn",
        "model": args.model,
        "saes": cfg.saes,
        "concepts": [s.concept for s in selections],
        "multiplier": cfg.multiplier,
        "anchor": None if anchor is None else anchor.concept,
        "anchor_strength": None if anchor is None else cfg.anchor_strength,
        "min_specificity": cfg.min_specificity,
    }
    if cfg.compare:
        record["clean"] = generate_outputs(adapter, cfg, "clean")
    handle = unlearn(
        adapter,
        saes,
        selections,
        multiplier=cfg.multiplier,
        anchor=anchor,
        anchor_strength=cfg.anchor_strength,
        min_specificity=cfg.min_specificity,
    )
    with handle:
        record["outputs"] = generate_outputs(adapter, cfg, "images")
    record["interventions"] = handle.report()
    path = write_applied(cfg, record)
    print(f"[unlearn] {', '.join(record['concepts'])} suppressed; wrote {path}")
    return 0
