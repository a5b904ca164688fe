"""``saekit dashboard``: a static site of a dictionary's latents, built from an activation cache.

saekit dashboard runs/my-sae --cache runs/heldout-cache --output_dir site   # open site/index.html
saekit dashboard runs/clip-sae --cache ... --labels labels.json --testbed clip
saekit dashboard runs/unet-sae --cache ... --testbed pipeline --steer_prompt "a large circle ..."
saekit dashboard runs/my-sae --cache ... --model MODEL --adapter clip --vocabulary words.txt
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import torch

from ..configuration import ConfigError, add_arguments, collect_overrides, load_config
from .pull import add_source_arguments, as_user_errors, load_kwargs


@dataclass
class DashboardSettings:
    """What the dashboard reads and shows."""

    cache: str = ""
    """The activation cache to read (the dictionary's hookpoint; held-out inputs are best)."""

    cache_hookpoint: str | None = None
    """The cache's hookpoint; default: the one the dictionary was trained on."""

    output_dir: str = "dashboard"
    """Where the site goes (index.html, latents/, thumbs/, assets/)."""

    labels: str | None = None
    """Factor labels of the cache's inputs (JSON or .npz, see `saekit eval --labels`): every
    latent's AUROC per factor value, and the index's best factor column."""

    testbed: Literal["none", "clip", "pipeline"] = "none"
    """Use a shipped testbed model: clip (nearest words from the world's vocabulary) or
    pipeline (steering previews; remade images of prompt inputs)."""

    testbed_dir: str | None = None
    """Folder of the testbed model (default: the one shipped with saekit)."""

    model: str | None = None
    """A model to load through its adapter (nearest words for a contrastive model, steering
    previews for a text-to-image model, tokens for text inputs)."""

    adapter: str = "auto"
    """The model's adapter."""

    vocabulary: str | None = None
    """A text file of words or phrases, one a line, to name CLIP latents with."""

    vocabulary_template: str = "{}"
    """How a vocabulary entry is phrased for the text tower (e.g. 'a photo of a {}')."""

    steer_prompt: str | None = None
    """The prompt of the steering previews (text-to-image models)."""

    steer_seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    """Seeds of the steering previews (columns)."""

    steer_multipliers: list[float] = field(default_factory=lambda: [0.0, 1.0, 2.0, 4.0])
    """Strengths of the steering previews (rows), in multiples of the latent's max activation."""

    steer_latents: int = 8
    """Latents that get a steering preview, the most frequently active first."""

    input_seed: int | None = None
    """Seed of input i's image when the samples of a text-to-image cache are remade (seed + i,
    as saekit's diffusion adapter seeds them); default: the cache's model_options seed, or 0."""

    top_k: int = 8
    """Top-activating inputs per latent."""

    quantiles: int = 4
    """Activation quantile bands per latent."""

    per_quantile: int = 4
    """Inputs per band."""

    max_pages: int = 0
    """Latent pages to write, most active first (0: every live latent)."""

    max_rows: int = 0
    """Rows of the cache to read (0: all)."""

    batch_size: int = 4096
    """Rows per batch."""

    device: str = "auto"
    """cpu, cuda, ... or auto."""

    def __post_init__(self) -> None:
        if self.testbed != "none" and self.model:
            raise ConfigError("give --testbed or --model, not both")


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "dashboard",
        help="build a static site of a dictionary's latents (opens from disk)",
        description="Read an activation cache once and write an index of latents (sortable by "
        "density, max activation, best factor) and a page per latent: top inputs and inputs "
        "across activation quantiles with heatmaps or highlighted tokens, activation "
        "histogram, factor scores, nearest words (CLIP), steering previews (text-to-image). "
        "No server and no network: open index.html.",
    )
    parser.add_argument("source", help="a dictionary folder (or a run folder with --hookpoint)")
    parser.add_argument("--config", help="YAML file of settings (flags override it)")
    add_source_arguments(parser, format_flag="--source_format")
    add_arguments(parser, DashboardSettings)
    parser.set_defaults(handler=run)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _load_dictionary(args: argparse.Namespace, device: torch.device) -> Any:
    from ..dictionaries.io import INDEX_FILE, read_index
    from ..hub import load_pretrained

    source = Path(args.source)
    if source.is_dir() and (source / INDEX_FILE).is_file() and not args.hookpoint:
        entries = read_index(source)
        if len(entries) != 1:
            names = ", ".join(e["path"] for e in entries)
            raise ConfigError(
                f"{source} holds {len(entries)} dictionaries; pick one with --hookpoint: {names}"
            )
        args.hookpoint = entries[0]["path"]
    with as_user_errors():
        return load_pretrained(args.source, args.hookpoint, device=device, **load_kwargs(args)).sae


def _read_lines(path: str) -> list[str]:
    try:
        lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    except OSError as err:
        raise ConfigError(f"cannot read {path}: {err.strerror}") from err
    words = [w for w in lines if w]
    if not words:
        raise ConfigError(f"{path} holds no words")
    return words


def _tokenizer_of(adapter: Any) -> Any:
    tokenizer = getattr(adapter, "tokenizer", None)
    if tokenizer is None:
        tokenizer = getattr(getattr(adapter, "processor", None), "tokenizer", None)
    return tokenizer


def _tokenize_with(tokenizer: Any) -> Any:
    def tokenize(text_or_ids: Any) -> list[str]:
        if isinstance(text_or_ids, str):
            ids = tokenizer(text_or_ids)["input_ids"]
        else:
            ids = [int(i) for i in text_or_ids]
        return [str(t) for t in tokenizer.convert_ids_to_tokens(ids)]

    return tokenize


def run(args: argparse.Namespace) -> int:
    from ..cache import open_cache
    from ..dashboard import DashboardConfig, SteeringSpec, build_dashboard
    from ..dashboard.inputs import SourceInputs
    from ..dashboard.vocabulary import clip_direction_map, latent_words
    from ..evaluation import read_labels

    cfg = load_config(DashboardSettings, args.config, collect_overrides(args, DashboardSettings))
    if not cfg.cache:
        raise ConfigError("give --cache: the dashboard is built from an activation cache")
    config = DashboardConfig(
        top_k=cfg.top_k,
        quantiles=cfg.quantiles,
        per_quantile=cfg.per_quantile,
        max_pages=cfg.max_pages,
        max_rows=cfg.max_rows,
        batch_size=cfg.batch_size,
    )
    device = _device(cfg.device)
    sae = _load_dictionary(args, device).eval()
    hookpoint = sae.cfg.hookpoint or ""
    view = open_cache(cfg.cache)
    labels = read_labels(cfg.labels) if cfg.labels else None

    options = dict((view.first.config or {}).get("model_options") or {})
    words = None
    steering = None
    tokenize = None
    generate_image = None
    if cfg.testbed == "clip":
        from ..adapters.clip import CLIPAdapter
        from ..testbed import models, world

        model, tokenizer = models.load_clip(cfg.testbed_dir or models.CLIP_DIR)
        model = cast(Any, model).to(device)
        vocabulary = _read_lines(cfg.vocabulary) if cfg.vocabulary else testbed_vocabulary(world)
        direction = clip_direction_map(model, hookpoint, sae.d_in)
        if direction is not None:
            words = latent_words(
                sae.W_dec.detach(),
                direction,
                CLIPAdapter(model, tokenizer=tokenizer).encode_texts,
                vocabulary,
                template=cfg.vocabulary_template,
            )
        tokenize = _tokenize_with(tokenizer)
    elif cfg.testbed == "pipeline":
        from ..evaluation.downstream import pipeline_generator
        from ..evaluation.testbed_tasks import pipeline_site
        from ..testbed import models

        pipe = models.load_pipeline(cfg.testbed_dir or models.PIPELINE_DIR)
        pipe.to(device)
        # Remake samples as they were cached: the cache records its adapter's settings.
        generate = pipeline_generator(
            pipe,
            num_inference_steps=int(options.get("num_inference_steps", 20)),
            guidance_scale=options.get("guidance_scale"),
        )
        site = pipeline_site(pipe, sae)
        steering = SteeringSpec(
            generate,
            site.model,
            cfg.steer_prompt or "a large circle at the center on a gray background",
            seeds=cfg.steer_seeds,
            multipliers=cfg.steer_multipliers,
            latents=cfg.steer_latents,
            hookpoint=site.resolved_hookpoint,
        )
        generate_image = _remake(generate, _input_seed(cfg, options))
        tokenize = _tokenize_with(pipe.tokenizer)
    elif cfg.model:
        words, steering, tokenize, generate_image = _from_adapter(cfg, sae, device, options)

    inputs = None
    data = (view.first.config or {}).get("data")
    if data and (tokenize is not None or generate_image is not None):
        from ..cache import InputConfig, open_inputs
        from ..configuration import from_dict

        inputs = SourceInputs(
            open_inputs(from_dict(InputConfig, data)), tokenize=tokenize, generate=generate_image
        )
    result = build_dashboard(
        sae,
        view,
        cfg.output_dir,
        hookpoint=cfg.cache_hookpoint,
        config=config,
        inputs=inputs,
        labels=labels,
        words=words,
        steering=steering,
        device=device,
        progress=lambda message: print(f"saekit dashboard: {message}", flush=True),
    )
    print(
        f"saekit dashboard: {result.pages} latent pages, {result.thumbnails} thumbnails from "
        f"{result.rows:,} rows in {result.seconds:.1f} s; open {result.index}"
    )
    return 0


def testbed_vocabulary(world: Any) -> list[str]:
    """Every factor value of the testbed world as the prompt its zero-shot test uses."""
    return [prompt for factor in world.FACTORS for prompt in world.factor_prompts(factor)]


def _input_seed(cfg: DashboardSettings, options: dict[str, Any]) -> int:
    return cfg.input_seed if cfg.input_seed is not None else int(options.get("seed", 0))


def _remake(generate: Any, base_seed: int) -> Any:
    def remake(prompt: str, sample: int) -> Any:
        return generate([prompt], [base_seed + sample])[0]

    return remake


def _from_adapter(
    cfg: DashboardSettings, sae: Any, device: torch.device, options: dict[str, Any]
) -> tuple[Any, Any, Any, Any]:
    """Words, steering, tokenizer and image remaking from whatever the model's adapter offers."""
    from ..adapters import load_adapter
    from ..dashboard import SteeringSpec
    from ..dashboard.vocabulary import clip_direction_map, latent_words
    from ..evaluation.downstream import adapter_generator

    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    # The cache's adapter settings (steps, guidance, seed, ...) make remade samples its own.
    adapter = load_adapter(cfg.model or "", cfg.adapter, device=device, **options)
    words = steering = generate_image = None
    if hasattr(adapter, "encode_texts") and cfg.vocabulary:
        direction = clip_direction_map(adapter.root(), sae.cfg.hookpoint or "", sae.d_in)
        if direction is None:
            raise ConfigError(
                f"cannot carry {sae.cfg.hookpoint!r} to the embedding space of this model; "
                "nearest words need a CLIP tower hookpoint"
            )
        words = latent_words(
            sae.W_dec.detach(),
            direction,
            adapter.encode_texts,
            _read_lines(cfg.vocabulary),
            template=cfg.vocabulary_template,
        )
    if hasattr(adapter, "generate") and cfg.steer_prompt:
        generate = adapter_generator(adapter)
        steering = SteeringSpec(
            generate,
            adapter,
            cfg.steer_prompt,
            seeds=cfg.steer_seeds,
            multipliers=cfg.steer_multipliers,
            latents=cfg.steer_latents,
        )
        generate_image = _remake(generate, _input_seed(cfg, options))
    tokenizer = _tokenizer_of(adapter)
    tokenize = _tokenize_with(tokenizer) if tokenizer is not None else None
    return words, steering, tokenize, generate_image
