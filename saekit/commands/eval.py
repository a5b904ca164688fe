"""``saekit eval``: measure dictionaries on held-out activations and in their model; write
``eval.json`` and PNG figures.

saekit eval runs/my-sae --cache runs/heldout-cache                 # every dictionary of the run
saekit eval runs/my-sae --hookpoint layers.3 --cache ... --labels labels.json   # + factor scores
saekit eval runs/clip-sae --testbed clip                           # + downstream on a testbed model
saekit eval runs/lm-sae --model pkg.mod:factory --tensors ids.npy  # + next-token loss recovered
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import torch

from ..configuration import ConfigError, add_arguments, collect_overrides, load_config
from .pull import add_source_arguments, as_user_errors, load_kwargs


@dataclass
class EvalConfig:
    """What to measure and on which data."""

    cache: str | None = None
    """A held-out activation cache (saekit cache) of the dictionary's hookpoint: reconstruction,
    sparsity and (with --labels) factor scores are measured on its rows."""

    cache_hookpoint: str | None = None
    """The cache's hookpoint to read; default: the one the dictionary was trained on."""

    max_rows: int = 1_000_000
    """Rows of the cache to evaluate (a seeded random subset); 0 reads them all."""

    batch_size: int = 4096
    """Rows per batch."""

    dense_threshold: float = 0.1
    """A latent active on more than this fraction of rows counts as dense."""

    labels: str | None = None
    """Factor labels of the cache's inputs (JSON or .npz: value_names and a presence matrix, one
    row per sample id): per latent and value AUROC and best F1."""

    coverage_auroc: float = 0.95
    """A factor value is covered when some latent reaches this AUROC for it."""

    track_auroc: float = 0.9
    """A live latent whose best AUROC over all values is below this tracks no factor value."""

    testbed: Literal["none", "clip", "pipeline", "vlm"] = "none"
    """Downstream on a shipped testbed model with held-out world data: clip (zero-shot and
    retrieval), pipeline (sample distance and oracle accuracy), vlm (caption loss recovered)."""

    testbed_samples: int = 0
    """Held-out inputs of the testbed task; 0: the task's default."""

    testbed_dir: str | None = None
    """Folder of the testbed model (default: the one shipped with saekit; the training scripts
    in scripts/ write others)."""

    model: str | None = None
    """A model for the next-token downstream ('package.module:factory' or what the adapter
    loads); needs --tensors."""

    adapter: str = "auto"
    """The model's adapter."""

    tensors: str | None = None
    """Token ids (N, T) (.npy / .safetensors) for the next-token loss of --model."""

    samples: int = 256
    """Inputs of --tensors to use."""

    training_metrics: str | None = None
    """A run's metrics.jsonl to plot training curves from (default: the run folder's own)."""

    plots: bool = True
    """Write PNG figures beside the report."""

    output_dir: str | None = None
    """Where eval.json and the figures go (default: <dictionary folder>/eval)."""

    device: str = "auto"
    """cpu, cuda, ... or auto."""

    seed: int = 0
    """Seed of the row subset."""

    def __post_init__(self) -> None:
        if self.max_rows < 0:
            raise ConfigError(f"max_rows must be 0 (all) or positive, got {self.max_rows}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {self.batch_size}")
        for name in ("dense_threshold", "coverage_auroc", "track_auroc"):
            if not 0 < getattr(self, name) <= 1:
                raise ConfigError(f"{name} must be in (0, 1], got {getattr(self, name)}")
        if self.labels and not self.cache:
            raise ConfigError("--labels scores latents on the rows of a cache: give --cache too")
        if bool(self.model) != bool(self.tensors):
            raise ConfigError(
                "the next-token downstream needs both --model and --tensors (token ids)"
            )


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="evaluate dictionaries: reconstruction, sparsity, splicing cost, factor alignment",
        description="Measure dictionaries on a held-out cache (FVU, MSE, cosine, L0, dead and "
        "dense latents, density histogram, shrinkage; with --labels per latent AUROC/F1 against "
        "known factors) and spliced into their model (--testbed, or --model with --tensors). "
        "Writes eval.json (read by `saekit push --eval_report`) and PNG figures.",
    )
    parser.add_argument(
        "source", help="a dictionary folder, a run folder (all its dictionaries), or a release"
    )
    parser.add_argument("--config", help="YAML file of settings (flags override it)")
    add_source_arguments(parser, format_flag="--source_format")
    add_arguments(parser, EvalConfig)
    parser.set_defaults(handler=run)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _dictionaries(
    args: argparse.Namespace, device: torch.device
) -> dict[str, tuple[Any, Path | None]]:
    """name -> (dictionary, its local folder or None) for every dictionary the source names."""
    from ..dictionaries.io import INDEX_FILE
    from ..hub import load_pretrained
    from ..hub.pull import folder_name
    from ..hub.push import dictionary_folders

    source = Path(args.source)
    out: dict[str, tuple[Any, Path | None]] = {}
    with as_user_errors():
        if source.is_dir() and (source / INDEX_FILE).is_file() and not args.hookpoint:
            for name, folder in dictionary_folders(source).items():
                out[name] = (load_pretrained(folder, device=device).sae, folder)
        else:
            pretrained = load_pretrained(
                args.source, args.hookpoint, device=device, **load_kwargs(args)
            )
            local = Path(pretrained.origin.path) if pretrained.origin.path else None
            out[folder_name(pretrained)] = (
                pretrained.sae,
                local if local and local.is_dir() else None,
            )
    return out


def _metrics_file(cfg: EvalConfig, source: Path) -> Path | None:
    if cfg.training_metrics:
        return Path(cfg.training_metrics)
    for candidate in (source / "metrics.jsonl", source.parent / "metrics.jsonl"):
        if candidate.is_file():
            return candidate
    return None


def _downstream(cfg: EvalConfig, sae: Any, device: torch.device) -> dict[str, Any]:
    from ..evaluation import testbed_tasks

    results: dict[str, Any] = {}
    n = cfg.testbed_samples
    sized = {"n": n} if n > 0 else {}
    if cfg.testbed != "none":
        from ..testbed import models

    if cfg.testbed == "clip":
        model, tokenizer = models.load_clip(cfg.testbed_dir or models.CLIP_DIR)
        results["testbed_clip"] = testbed_tasks.contrastive_on_testbed(
            sae, model=cast(Any, model).to(device), tokenizer=tokenizer, **sized
        )
    elif cfg.testbed == "pipeline":
        pipe = models.load_pipeline(cfg.testbed_dir or models.PIPELINE_DIR).to(device)
        results["testbed_pipeline"] = testbed_tasks.diffusion_on_testbed(sae, pipe=pipe, **sized)
    elif cfg.testbed == "vlm":
        vlm, processor = models.load_vlm(cfg.testbed_dir or models.VLM_DIR)
        results["testbed_vlm"] = testbed_tasks.next_token_on_testbed(
            sae, model=cast(Any, vlm).to(device), processor=processor, **sized
        )
    if cfg.model and cfg.tensors:
        results["next_token"] = _next_token(cfg, sae, device)
    return results


def _next_token(cfg: EvalConfig, sae: Any, device: torch.device) -> Any:
    from ..adapters import InputBatch, Sample, load_adapter
    from ..evaluation import SpliceSite, evaluate_next_token
    from ..sources import open_array

    if str(Path.cwd()) not in sys.path:  # custom factories live in the user's project
        sys.path.insert(0, str(Path.cwd()))
    adapter = load_adapter(cfg.model or "", cfg.adapter, device=device)
    ids = torch.as_tensor(
        np.array(open_array(cfg.tensors or "", None)[: cfg.samples])
    ).long()  # (N, T)
    if ids.ndim != 2:
        raise ConfigError(f"--tensors must hold token ids of shape (N, T), got {tuple(ids.shape)}")
    feed = getattr(adapter, "feed", None)

    def model(input_ids: torch.Tensor) -> Any:
        if feed is not None:  # a custom adapter knows how its model takes inputs
            samples = [Sample(i, tensor=row) for i, row in enumerate(input_ids)]
            return feed(adapter.root(), InputBatch(samples))
        return adapter.root()(input_ids=input_ids.to(device))

    batches = ({"input_ids": ids[i : i + 32]} for i in range(0, len(ids), 32))
    return evaluate_next_token(model, SpliceSite(adapter, sae), batches)


def run(args: argparse.Namespace) -> int:
    from ..evaluation import DictionaryEval, EvalReport, evaluate_on_cache, read_labels
    from ..evaluation.report import REPORT_FILE, describe_dictionary, write_report
    from ..evaluation.suite import write_figures

    cfg = load_config(EvalConfig, args.config, collect_overrides(args, EvalConfig))
    device = _device(cfg.device)
    dictionaries = _dictionaries(args, device)
    source = Path(args.source)
    out = (
        Path(cfg.output_dir)
        if cfg.output_dir
        else (source / "eval" if source.is_dir() else Path("eval"))
    )
    labels = read_labels(cfg.labels) if cfg.labels else None
    if not cfg.cache and cfg.testbed == "none" and not cfg.model:
        raise ConfigError(
            "nothing to evaluate on: give --cache (held-out activations), --testbed, or --model "
            "with --tensors"
        )
    entries: dict[str, DictionaryEval] = {}
    metrics_file = _metrics_file(cfg, source) if source.is_dir() else None
    for i, (name, (sae, folder)) in enumerate(dictionaries.items()):
        began = time.perf_counter()
        sae.eval()
        entry = DictionaryEval(describe_dictionary(sae, folder))
        evaluation = None
        if cfg.cache:
            evaluation = evaluate_on_cache(
                sae,
                cfg.cache,
                hookpoint=cfg.cache_hookpoint,
                max_rows=cfg.max_rows,
                batch_size=cfg.batch_size,
                dense_threshold=cfg.dense_threshold,
                labels=labels,
                coverage_auroc=cfg.coverage_auroc,
                track_auroc=cfg.track_auroc,
                seed=cfg.seed,
                device=device,
            )
            entry.data = evaluation.data
            entry.reconstruction = evaluation.reconstruction
            if evaluation.factors is not None:
                entry.factors = evaluation.factors.report
                out.mkdir(parents=True, exist_ok=True)
                evaluation.factors.save(out / f"{name}.factors.safetensors")
        entry.downstream = _downstream(cfg, sae, device)
        if cfg.plots:
            entry.figures = write_figures(
                entry,
                evaluation,
                out,
                prefix=f"{name}.",
                metrics_file=metrics_file if i == 0 else None,
            )
        entry.seconds = round(time.perf_counter() - began, 2)
        entries[name] = entry
        _print_summary(name, entry)
    path = write_report(out / REPORT_FILE, EvalReport(entries))
    print(f"saekit eval: report {path}")
    return 0


def _print_summary(name: str, entry: Any) -> None:
    parts = []
    rec = entry.reconstruction
    if rec is not None:
        parts.append(
            f"FVU {rec.fvu:.4f}, L0 {rec.l0:.1f}, dead {100 * rec.dead_fraction:.1f}%, "
            f"dense {100 * rec.dense_fraction:.1f}% on {rec.rows:,} rows"
        )
    if entry.factors is not None:
        f = entry.factors
        parts.append(
            f"{f.values_covered}/{f.values_total} factor values with AUROC >= {f.coverage_auroc}"
        )
    for task, result in entry.downstream.items():
        in_model = getattr(result, "in_model", None)
        if in_model is not None:
            parts.append(f"{task}: in-model FVU {in_model.fvu:.4f}")
        recovered = getattr(result, "loss_recovered", None)
        if recovered is not None:
            parts.append(f"{task}: loss recovered {recovered:.3f}")
        drop = getattr(result, "zero_shot_accuracy_drop", None)
        if drop:
            parts.append(f"{task}: mean zero-shot drop {sum(drop.values()) / len(drop):.3f}")
        rmse = getattr(result, "pixel_rmse", None)
        if rmse and "spliced" in rmse:
            parts.append(f"{task}: spliced pixel RMSE {rmse['spliced']:.4f}")
    print(f"{name}: " + "; ".join(parts))
