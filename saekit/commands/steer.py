"""``saekit steer``: generate with a dictionary's latents edited, and write what was applied.

    saekit steer pretrained/pipeline --saes runs/mid --features 12 --strength 8 \
        --steps 0 10 --branch cond --prompts "a circle on a gray background" --output_dir out/
    saekit steer pretrained/vlm --saes runs/lm2 --kind set --relative true --strength 2 \
        --selection red.json --images a.png --prompts "describe :" --output_dir out/

A text-to-image pipeline writes ``images/NNN.png`` (and the unsteered ``clean/NNN.png`` with
``--compare``); a VLM writes ``texts.json``. ``applied.json`` records the model, the
dictionaries, every intervention with its scope, and the calls and rows it edited.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from ..configuration import ConfigError, add_arguments, collect_overrides, load_config


@dataclass
class GenerationConfig:
    """The model, its dictionaries, the inputs and where the outputs go (steer and unlearn)."""

    saes: str = ""
    """A dictionary folder, or a run folder with index.json (every dictionary in it)."""

    hookpoint: str | None = None
    """Take only this dictionary of --saes (a hookpoint or the folder name in the run)."""

    adapter: str = "auto"
    """The model's adapter (auto: detected)."""

    prompts: list[str] = field(default_factory=list)
    """Prompts (text-to-image), or questions asked about --images (VLM)."""

    prompts_file: str | None = None
    """A text file with one prompt per line (added to --prompts)."""

    images: list[str] = field(default_factory=list)
    """Image files for a VLM (one per prompt; one prompt is repeated for every image)."""

    output_dir: str = "steered"
    """Where images/, texts.json and applied.json go."""

    seed: int = 0
    """Seed of the starting noise (prompt i uses seed + i)."""

    num_inference_steps: int = 20
    """Denoising steps."""

    guidance_scale: float | None = None
    """Classifier-free guidance scale (None: the pipeline's default)."""

    max_new_tokens: int = 24
    """Tokens a VLM generates."""

    compare: bool = False
    """Also write the unsteered outputs (clean/ or texts.json's "clean")."""

    device: str = "cpu"
    """cpu, cuda, ..."""


@dataclass
class SteerConfig(GenerationConfig):
    """One intervention on the dictionary's latents, and where it acts."""

    features: list[int] = field(default_factory=list)
    """Latent ids (default: the latents of --selection at the hookpoint)."""

    selection: str | None = None
    """A selection file (saekit.steering.Selection): its latents and typical activations."""

    kind: Literal["add", "set", "clamp", "scale", "ablate"] = "add"
    """add: v + strength; set: v = strength; clamp: to [low, high]; scale: v * strength; ablate."""

    strength: float = 1.0
    """Amount added, value set, or factor."""

    low: float | None = None
    """clamp: lower bound."""

    high: float | None = None
    """clamp: upper bound."""

    relative: bool = False
    """Strength and bounds in units of each latent's typical activation (from --selection)."""

    keep_error: bool = True
    """Keep the SAE error (only the edit reaches the model)."""

    positions: list[int] = field(default_factory=list)
    """Only these token positions or feature-map indices h*W + w (default: all)."""

    tokens: Literal["all", "image", "text"] = "all"
    """Only image or text tokens."""

    mask_box: list[float] = field(default_factory=list)
    """A spatial mask: the box y0 x0 y1 x1 in fractions of the image (e.g. 0 0 0.5 0.5: top left)."""

    steps: list[int] = field(default_factory=list)
    """Denoising step window: start stop (stop excluded)."""

    branch: Literal["both", "cond", "uncond", "cond_minus_uncond"] = "both"
    """Which half of a guided batch."""

    phase: Literal["all", "prefill", "decode"] = "all"
    """VLM generation: the prompt's prefill, the decoding steps, or all."""

    decode_steps: list[int] = field(default_factory=list)
    """VLM decoding-call window: start stop."""


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "steer",
        help="generate with latents of a dictionary added, set, clamped, scaled or ablated",
        description="Generate images (text-to-image pipeline) or text (VLM) with an intervention "
        "on a dictionary's latents, scoped by tokens, region, denoising steps, guidance half or "
        "decoding phase. Writes the outputs and applied.json.",
    )
    parser.add_argument("model", help="a model folder or hub id (a pipeline or a VLM)")
    parser.add_argument("--config", help="YAML file of settings (flags override it)")
    add_arguments(parser, SteerConfig)
    parser.set_defaults(handler=run)


# ----------------------------------------------------------------------------- shared helpers


def load_saes(source: str, hookpoint: str | None, device: str) -> dict[str, Any]:
    """``hookpoint@capture -> dictionary`` from a dictionary folder or a run folder."""
    from ..dictionaries.io import INDEX_FILE, load_all
    from ..hub import load
    from ..steering.api import as_dictionaries

    if not source:
        raise ConfigError("give --saes: a dictionary folder or a run folder with index.json")
    root = Path(source)
    if root.is_dir() and (root / INDEX_FILE).is_file():
        found = load_all(root, device)
        if hookpoint is not None:
            found = {k: v for k, v in found.items() if hookpoint in (k, v.cfg.hookpoint)}
            if not found:
                raise ConfigError(f"{source} holds no dictionary for hookpoint {hookpoint!r}")
        out: dict[str, Any] = {}
        for sae in found.values():
            out.update(as_dictionaries(sae))
        return out
    return as_dictionaries(load(source, hookpoint, device=device))


def load_model(model: str, adapter: str, cfg: GenerationConfig) -> Any:
    from ..adapters import load_adapter

    options: dict[str, Any] = {"device": cfg.device}
    name = adapter
    if name == "auto":
        from ..adapters import detect_adapter

        name = detect_adapter(model, local_files_only=Path(model).is_dir())
    if name == "diffusion":
        options.update(num_inference_steps=cfg.num_inference_steps, seed=cfg.seed)
        if cfg.guidance_scale is not None:
            options["guidance_scale"] = cfg.guidance_scale
    if Path(model).is_dir():
        options["local_files_only"] = True
    return load_adapter(model, name, **options)


def read_prompts(cfg: GenerationConfig) -> list[str]:
    prompts = list(cfg.prompts)
    if cfg.prompts_file:
        path = Path(cfg.prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"no prompts file at {path}")
        prompts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return prompts


def _to_pil(images: Any) -> list[Any]:
    from PIL import Image

    if isinstance(images, torch.Tensor):  # (B, 3, H, W) in [0, 1]
        arrays = (images.clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round()
        return [Image.fromarray(a.astype(np.uint8)) for a in arrays]
    if isinstance(images, np.ndarray):
        return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in images]
    return list(images)


def generate_outputs(adapter: Any, cfg: GenerationConfig, folder: str) -> dict[str, Any]:
    """Run the adapter's generation on the configured inputs; write images into ``folder`` (or
    return texts). Returns what to record in applied.json."""
    prompts = read_prompts(cfg)
    out_dir = Path(cfg.output_dir)
    if adapter.family == "diffusion":
        if not prompts:
            raise ConfigError("give --prompts or --prompts_file")
        result = adapter.generate(prompts, seed=cfg.seed)
        images = _to_pil(getattr(result, "images", result))
        paths = []
        (out_dir / folder).mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(images):
            path = out_dir / folder / f"{i:03d}.png"
            image.save(path)
            paths.append(str(path.relative_to(out_dir)))
        return {"prompts": prompts, "images": paths}
    if adapter.family == "vlm":
        from PIL import Image

        pictures = [Image.open(p).convert("RGB") for p in cfg.images] if cfg.images else None
        if pictures is not None and len(prompts) <= 1:
            prompts = prompts * len(pictures) if prompts else None  # type: ignore[assignment]
        if pictures is None and not prompts:
            raise ConfigError("give --images and/or --prompts")
        texts = adapter.generate(pictures, prompts, max_new_tokens=cfg.max_new_tokens)
        return {"prompts": prompts, "images": list(cfg.images), "texts": texts}
    raise ConfigError(
        f"saekit steer writes images or text: the {adapter.family} adapter does not generate; "
        "use saekit.steer(model, sae, ...) in Python around your own calls"
    )


def write_applied(cfg: GenerationConfig, record: dict[str, Any]) -> Path:
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if "texts" in record.get("outputs", {}):
        texts = {"steered": record["outputs"]["texts"]}
        if "clean" in record:
            texts["clean"] = record["clean"]["texts"]
        (out / "texts.json").write_text(json.dumps(texts, indent=1) + "\n")
    path = out / "applied.json"
    path.write_text(json.dumps(record, indent=1, default=str) + "\n")
    return path


# ----------------------------------------------------------------------------- steer


def _window(values: list[int], name: str) -> tuple[int, int] | None:
    if not values:
        return None
    if len(values) != 2:
        raise ConfigError(f"--{name} takes two numbers: start stop")
    return values[0], values[1]


def build_intervention(cfg: SteerConfig, saes: dict[str, Any]) -> tuple[list[Any], Any]:
    from ..steering import Intervention, Scope, Selection

    selection = Selection.load(cfg.selection) if cfg.selection else None
    mask = None
    if cfg.mask_box:
        if len(cfg.mask_box) != 4:
            raise ConfigError("--mask_box takes four fractions: y0 x0 y1 x1")
        y0, x0, y1, x1 = cfg.mask_box
        mask = torch.zeros(64, 64)
        mask[round(y0 * 64) : round(y1 * 64), round(x0 * 64) : round(x1 * 64)] = 1.0
    scope = Scope(
        positions=tuple(cfg.positions) or None,
        tokens=cfg.tokens,
        mask=mask,
        steps=_window(cfg.steps, "steps"),
        branch=cfg.branch,
        phase=cfg.phase,
        decode_steps=_window(cfg.decode_steps, "decode_steps"),
    )
    interventions = []
    for hookpoint in saes:
        features = list(cfg.features)
        if not features and selection is not None:
            features = sorted(set(selection.features(hookpoint)))
        if not features:
            if len(saes) == 1:
                raise ConfigError("give --features, or a --selection with latents at the hookpoint")
            continue
        interventions.append(
            Intervention(
                tuple(features),
                kind=cfg.kind,
                strength=cfg.strength,
                low=cfg.low,
                high=cfg.high,
                relative=cfg.relative,
                hookpoint=hookpoint,
                scope=scope,
                keep_error=cfg.keep_error,
            )
        )
    return interventions, selection


def run(args: argparse.Namespace) -> int:
    from ..steering import steer

    cfg = load_config(SteerConfig, args.config, collect_overrides(args, SteerConfig))
    saes = load_saes(cfg.saes, cfg.hookpoint, cfg.device)
    adapter = load_model(args.model, cfg.adapter, cfg)
    interventions, selection = build_intervention(cfg, saes)
    record: dict[str, Any] = {"command": "steer", "model": args.model, "saes": cfg.saes}
    if cfg.compare:
        record["clean"] = generate_outputs(adapter, cfg, "clean")
    with steer(adapter, saes, interventions, typical=selection) as handle:
        record["outputs"] = generate_outputs(adapter, cfg, "images")
    record["interventions"] = handle.report()
    path = write_applied(cfg, record)
    print(f"[steer] {len(interventions)} intervention(s) applied; wrote {path}")
    return 0
