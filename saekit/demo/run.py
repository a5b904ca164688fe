"""``saekit demo`` end to end on the testbed's shipped models, offline.

1. world: fresh scenes with known factors; images for the contrastive model, captions for the
   text-to-image model;
2. cache: the CLIP image tower's residual stream at a middle block, and the denoiser's mid block
   over every sampling step (conditional half of the guided batch);
3. train: a TopK dictionary on each cache;
4. score: reconstruction on held-out caches, every latent against every factor value (AUROC,
   best F1), the best-aligned latents with their top-activating inputs;
5. report: ``report.json``, ``report.html`` and PNG grids in the output folder, with samples
   of the text-to-image model and, with ``steering``, before/after grids of steering toward a
   colour and unlearning a shape (``saekit.steering``), read by the oracle.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .._io import atomic_write_json, read_json
from ..cache import ImageFolder
from ..cache.rows import RowFilter
from ..configuration import ConfigError
from ..evaluation.plots import plot_density_histogram, plot_factor_coverage
from ..evaluation.report import machine_description
from ..testbed import models, world
from ..testbed.oracle import Oracle
from . import report as report_files
from .config import DemoConfig
from .stages import (
    Scored,
    TrainedDictionary,
    WorldSplit,
    cache_hookpoint,
    make_split,
    score_held_out,
    top_inputs,
    train_topk,
)

TOP_INPUTS = 8


def _seeds(seed: int) -> dict[str, int]:
    """Distinct world seeds per split, far from the ones the training scripts use."""
    base = 50_000_000 + 1000 * seed
    return {"clip": base, "clip_held_out": base + 1, "denoiser": base + 2, "held_out": base + 3}


def _summarise(
    trained: TrainedDictionary,
    scored: Scored,
    split: WorldSplit,
    out: Path,
    name: str,
    *,
    images: bool,
) -> dict[str, Any]:
    """The JSON of one model's dictionary, with the PNGs it refers to written."""
    evaluation = scored.evaluation
    assert evaluation.factors is not None  # scored with labels
    factor_report = evaluation.factors.report
    recon = asdict(evaluation.reconstruction)
    recon.pop("density_histogram")
    best: dict[str, Any] = {}
    rendered = world.render(split.scenes) if images else None  # (n, 3, H, W)
    for value, score in factor_report.per_value.items():
        entry: dict[str, Any] = {
            "latent": score.auroc_latent,
            "auroc": score.auroc,
            "f1": score.f1,
        }
        top = top_inputs(scored.sample_acts, score.auroc_latent, TOP_INPUTS)
        if rendered is not None:
            file = f"{name}_top_{value.replace('=', '_')}.png"
            entry["top_inputs_png"] = report_files.save_grid(
                rendered[top], out / file, ncols=TOP_INPUTS
            )
        else:
            entry["top_prompts"] = [split.prompts[i] for i in top[:3]]
        best[value] = entry
    figures = [
        (
            plot_density_histogram(
                evaluation.reconstruction.density_histogram,
                out / f"{name}_density.png",
                title=f"{name}: feature density on held-out rows",
            ).name,
            "feature density",
        ),
        (
            plot_factor_coverage(factor_report, out / f"{name}_factors.png").name,
            "best AUROC per factor value",
        ),
    ]
    return {
        "hookpoint": evaluation.data["hookpoint"],
        "dictionary": str(trained.path),
        "d_sae": trained.sae.d_sae,
        "k": trained.sae.cfg.k,
        "train_rows": trained.train_rows,
        "training": {k: v for k, v in trained.metrics.items() if isinstance(v, int | float)},
        "held_out": recon,
        "factors": {
            "values_covered": factor_report.values_covered,
            "values_total": factor_report.values_total,
            "per_factor_covered": factor_report.per_factor_covered,
            "live_latents": factor_report.live_latents,
            "untracked_latents": factor_report.untracked_latents,
        },
        "best_latents": best,
        "figures": figures,
    }


def _claim_output_dir(out: Path, cfg: DemoConfig) -> None:
    """Record the settings in ``out``, or refuse a folder that a run with other settings wrote:
    its images and caches would not match (a rerun with the same settings resumes the caches)."""
    record = out / "demo-config.json"
    wanted = asdict(cfg)
    del wanted["output_dir"]  # a moved folder is the same run
    if not record.exists():
        atomic_write_json(record, wanted)
        return
    held = read_json(record, "demo settings")
    changed = sorted(k for k in wanted if held.get(k) != wanted[k])
    if changed:
        raise ConfigError(
            f"{out} holds a demo run with other settings ({', '.join(changed)}); its images and "
            "caches would not match. Choose another --output_dir, or delete this one"
        )


def run_demo(cfg: DemoConfig, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every stage; returns the report (also written to ``output_dir/report.json``)."""
    began = time.perf_counter()
    out = Path(cfg.output_dir)
    seeds = _seeds(cfg.seed)
    clip_dir = models.require_model_dir(cfg.clip_dir or models.CLIP_DIR, "train_testbed_clip.py")
    pipeline_dir = models.require_model_dir(
        cfg.pipeline_dir or models.PIPELINE_DIR, "train_testbed_diffusion.py"
    )
    out.mkdir(parents=True, exist_ok=True)
    _claim_output_dir(out, cfg)
    train_kwargs = dict(
        expansion=cfg.expansion,
        k=cfg.k,
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
    )

    say(
        f"[demo] 1/5 world: {cfg.clip_images} + {cfg.held_out} images, {cfg.denoiser_prompts} + {cfg.held_out} captions"
    )
    clip_train = make_split(cfg.clip_images, seeds["clip"], out / "inputs" / "clip_train")
    clip_held = make_split(cfg.held_out, seeds["clip_held_out"], out / "inputs" / "clip_held_out")
    text_train = make_split(cfg.denoiser_prompts, seeds["denoiser"])
    text_held = make_split(cfg.held_out, seeds["held_out"])

    say(f"[demo] 2/5 cache: CLIP {cfg.clip_block}")
    caches = out / "caches"
    for split, tag in ((clip_train, "train"), (clip_held, "held_out")):
        assert split.images_dir is not None
        cache_hookpoint(
            clip_dir,
            ImageFolder(split.images_dir),
            cfg.clip_block,
            caches / f"clip_{tag}",
            seed=cfg.seed,
        )
    say(f"[demo] 2/5 cache: denoiser {cfg.denoiser_block} ({cfg.denoising_steps} steps)")
    diffusion_options = dict(
        num_inference_steps=cfg.denoising_steps, guidance_scale=cfg.guidance_scale, seed=cfg.seed
    )
    for split, tag in ((text_train, "train"), (text_held, "held_out")):
        cache_hookpoint(
            pipeline_dir,
            split.prompts,
            cfg.denoiser_block,
            caches / f"denoiser_{tag}",
            seed=cfg.seed,
            # the unconditional half of a guided batch never saw the prompt
            rows=RowFilter(branches=["cond"]) if cfg.guidance_scale != 1.0 else None,
            model_options=diffusion_options,
        )

    report: dict[str, Any] = {"machine": machine_description(), "config": asdict(cfg)}
    report["models"] = {}
    for name, held_split, images in (("clip", clip_held, True), ("denoiser", text_held, False)):
        say(f"[demo] 3/5 train: TopK on the {name} cache")
        trained = train_topk(caches / f"{name}_train", out / "dictionaries" / name, **train_kwargs)
        say(f"[demo] 4/5 score: {name} latents against the factors of held-out inputs")
        scored = score_held_out(trained.sae, caches / f"{name}_held_out", held_split)
        report["models"][name] = _summarise(trained, scored, held_split, out, name, images=images)
        f = report["models"][name]["factors"]
        say(
            f"[demo]     {name}: held-out FVU {report['models'][name]['held_out']['fvu']:.3f}, "
            f"{f['values_covered']}/{f['values_total']} factor values with a latent at AUROC >= 0.95"
        )

    say("[demo] 5/5 report: samples of the text-to-image model, read by the oracle")
    report["inputs"] = {
        "grid_png": report_files.save_grid(
            world.render(clip_held.scenes[:32]), out / "inputs.png", ncols=16
        )
    }
    pipe = models.load_pipeline(pipeline_dir)  # once, for the samples and the steering
    report["generation"] = _generation(cfg, pipe, text_held, out)
    if cfg.steering:
        from .steering import run_steering

        say("[demo] 5/5 report: steering toward a colour and unlearning a shape")
        report["steering"] = run_steering(cfg, pipe, out, say)
    report["seconds"] = time.perf_counter() - began
    atomic_write_json(out / "report.json", report)
    report_files.write_html(report, out / "report.html")
    return report


def _generation(cfg: DemoConfig, pipe: Any, split: WorldSplit, out: Path) -> dict[str, Any]:
    """Samples of held-out captions and the oracle's verdict on each factor."""
    from ..testbed.evaluate import pipeline_accuracy

    scenes = split.scenes[: max(cfg.steering_prompts, 16)]
    result = pipeline_accuracy(
        pipe, scenes, Oracle(), seed=cfg.seed, guidance_scale=cfg.guidance_scale
    )
    accuracy = {k: round(v, 3) for k, v in result.score.accuracy.items()}
    grid = report_files.save_grid(result.images, out / "samples.png", ncols=8)
    return {"prompts": result.prompts, "oracle_accuracy": accuracy, "grid_png": grid}
