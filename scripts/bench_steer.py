"""Steering and unlearning on the testbed (JSON lines on stdout, and --out).

    nice -n 10 python scripts/bench_steer.py [--pipeline DIR] [--vlm DIR] [--parts ...] [--quick]

Trains TopK dictionaries with saekit's Trainer on activations collected in memory (the
pipeline's text tower: its input, the token embeddings, and its last layer; CLIP's image
embeddings; a VLM language-model layer), selects each colour's and shape's latents with the
scenes' factor labels (SAeUron's score; per denoising step for UNet hookpoints), then measures
(see ``saekit.steering.testbed``):

* ``steer_diffusion``: per colour / shape, mode (``add`` the target's latents everywhere, or
  ``replace`` the factor's other values by it where they fire) and strength (units of each
  latent's typical activation): oracle success rate, other factors preserved, pixel distance
  to the unsteered sample;
* ``steer_heldout``: a setting that met the target, again on other prompts and noise
  (``--heldout_seed``);
* ``steer_prompt_edit``: the reference for steering: the same prompts and noise with the
  factor's word itself changed to the target (how much of a sample the pipeline keeps when
  only that word changes);
* ``unlearn_diffusion``: UA / IRA / CRA for one shape and one colour: SAeUron's negative
  multipliers, and replacement by an anchor value (Kumari et al. 2023) swept over anchor value,
  latents per concept and anchor strength on tuning prompts; the best few are measured again on
  validation prompts (``unlearn_validation``), the best of them over both sets is then measured
  on held-out prompts and noise (``unlearn_heldout``), so the reported figure is not the one it
  was picked on;
* ``steer_clip``: share of image embeddings whose zero-shot colour label becomes the target;
* ``steer_vlm``: share of captions whose colour word becomes the target (latents set).

Each line carries the machine; a ``*_best`` line per factor gives the strength that clears the
issue's target (>= 80% success with >= 90% of other factors kept) by the widest margin, or the
best found.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from functools import partial
from pathlib import Path
from statistics import mean
from typing import Any

import torch

from saekit.steering import DEFAULT_MIN_SPECIFICITY
from saekit.steering import testbed as bench
from saekit.testbed import models


def machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.machine()}, {os.cpu_count()} CPU cores, {torch.get_num_threads()} threads, {gpu}"


class Emitter:
    def __init__(self, out: Path | None) -> None:
        self.file = out.open("a") if out is not None else None
        self.records: list[dict[str, Any]] = []

    def __call__(self, name: str, record: dict[str, Any]) -> None:
        self.records.append({"bench": name, **record})
        line = json.dumps({"bench": name, **record, "machine": machine()})
        print(line, flush=True)
        if self.file is not None:
            self.file.write(line + "\n")
            self.file.flush()


def best_strength(records: list[dict[str, Any]], key: str = "success") -> dict[str, Any]:
    """Per factor: the mean over targets at each strength, and the strength that meets the
    target (>= 0.8 success, >= 0.9 preserved) by the widest margin, else the strength with the
    best success. (The lowest strength that only just meets it missed on held-out prompts.)"""
    by_strength: dict[float, list[dict[str, Any]]] = {}
    for r in records:
        by_strength.setdefault(r["strength"], []).append(r)
    table = {
        s: {
            key: round(sum(r[key] for r in rs) / len(rs), 4),
            "others_preserved": round(sum(r["others_preserved"] for r in rs) / len(rs), 4),
            "others_correct": round(sum(r["others_correct"] for r in rs) / len(rs), 4),
            "pixel_distance": round(sum(r["pixel_distance"] for r in rs) / len(rs), 4),
        }
        for s, rs in sorted(by_strength.items())
    }
    meets = [s for s, v in table.items() if v[key] >= 0.8 and v["others_preserved"] >= 0.9]
    best = (
        max(meets, key=lambda s: min(table[s][key] - 0.8, table[s]["others_preserved"] - 0.9))
        if meets
        else max(table, key=lambda s: table[s][key])
    )
    return {
        "best_strength": best,
        "meets_target": bool(meets),
        **table[best],
        "per_strength": table,
    }


def markdown(records: list[dict[str, Any]]) -> str:
    """The README's tables from the run's records."""
    lines = [f"Measured by `scripts/bench_steer.py` on {machine()}.", ""]
    best = [r for r in records if r["bench"] == "steer_diffusion_best"]
    if best:
        lines += [
            "| steer toward | hookpoint | mode | strength | success | other factors kept "
            "| other factors as prompted | pixel distance |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in (r for r in records if r["bench"] == "steer_prompt_edit"):
            lines.append(
                f"| {r['factor']} | the prompt's word edited (reference) | - | - | "
                f"{r['success']:.2f} | {r['others_preserved']:.2f} | - | - |"
            )
        for r in best:
            for strength, v in r["per_strength"].items():
                lines.append(
                    f"| {r['factor']} | `{r['hookpoint']}` | {r['mode']} | {strength} | "
                    f"{v['success']:.2f} | "
                    f"{v['others_preserved']:.2f} | {v['others_correct']:.2f} | "
                    f"{v['pixel_distance']:.3f} |"
                )
        for r in (r for r in records if r["bench"] == "steer_heldout"):
            strength = r["best_strength"]
            # (float keys in this process; strings when read back from a JSON lines file)
            v = r["per_strength"].get(strength) or r["per_strength"][str(strength)]
            lines.append(
                f"| {r['factor']} | `{r['hookpoint']}` | {r['mode']}, held-out prompts | "
                f"{strength} | {v['success']:.2f} | {v['others_preserved']:.2f} | "
                f"{v['others_correct']:.2f} | {v['pixel_distance']:.3f} |"
            )
        lines.append("")
    unlearned = [
        r
        for r in records
        if r["bench"] in ("unlearn_diffusion", "unlearn_validation", "unlearn_heldout")
    ]
    swept = [r for r in unlearned if r["anchor"] and r["bench"] == "unlearn_diffusion"]
    if swept:  # the SAeUron rows, the three best anchored settings per concept, held-out rows
        lines += [
            f"Anchored settings tried on the tuning prompts: {len(swept)}; the three best per "
            "concept and hookpoint (ranked by their worst margin over the three targets, ties by "
            "the next) are shown.",
            "",
        ]
        shown = {
            id(r)
            for group in {(r["target"], r.get("hookpoint")) for r in swept}
            for r in sorted(
                (r for r in swept if (r["target"], r.get("hookpoint")) == group),
                key=rank,
                reverse=True,
            )[:3]
        }
        unlearned = [
            r
            for r in unlearned
            if not r["anchor"] or r["bench"] != "unlearn_diffusion" or id(r) in shown
        ]
    if unlearned:
        lines += [
            "| unlearn | hookpoint | prompts | latents | multiplier | anchor (strength) | UA | IRA "
            "| CRA | IRA / clean | CRA / clean |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in unlearned:
            anchor = f"{r['anchor']} ({r['anchor_strength']})" if r["anchor"] else "-"
            clean = not r["anchor"] and r["multiplier"] == 0
            multiplier = "none (clean)" if clean else r["multiplier"]
            prompts = {"unlearn_heldout": "held out", "unlearn_validation": "validation"}.get(
                r["bench"], "tuning"
            )
            lines.append(
                f"| {r['target']} | `{r.get('hookpoint', '-')}` | {prompts} | "
                f"{r['latents_per_step']} | {multiplier} | "
                f"{anchor} | {r['UA']:.3f} | {r['IRA']:.3f} | {r['CRA']:.3f} | "
                f"{r['IRA_vs_clean']:.2f} | {r['CRA_vs_clean']:.2f} |"
            )
        lines.append("")
    for name, what in (("steer_clip_mean", "CLIP zero-shot colour label = target"),):
        for r in (r for r in records if r["bench"] == name):
            lines += [f"| strength | {what} |", "|---|---|"]
            lines += [f"| {s} | {v:.2f} |" for s, v in r["per_strength"].items()]
            lines.append("")
    vlm = [r for r in records if r["bench"] == "steer_vlm"]
    if vlm:
        by: dict[float, list[dict[str, Any]]] = {}
        for r in vlm:
            by.setdefault(r["strength"], []).append(r)
        lines += [
            "| latents set to (x typical) | caption colour = target | caption colour changed |",
            "|---|---|---|",
        ]
        for strength, rs in sorted(by.items()):
            hit = sum(r["caption_color_is_target"] for r in rs) / len(rs)
            changed = sum(r["caption_color_changed"] for r in rs) / len(rs)
            lines.append(f"| {strength} | {hit:.2f} | {changed:.2f} |")
        lines.append("")
    return "\n".join(lines)


def run_steering(setup: Any, args: Any, emit: Emitter) -> None:
    """Steering toward every colour and shape at ``setup``'s hookpoint, in each mode."""
    for factor in ("color", "shape"):
        for mode in args.modes:
            t = time.time()
            steering = partial(
                bench.diffusion_steering,
                setup,
                factor,
                prompts_per_target=args.prompts,
                count=args.count,
                branch=args.branch,
                mode=mode,
                min_specificity=args.min_specificity,
            )
            records = steering(
                strengths=args.strengths if mode == "add" else args.replace_strengths
            )
            for r in records:
                emit("steer_diffusion", {**r, "hookpoint": setup.hookpoint})
            best = best_strength(records)
            emit(
                "steer_diffusion_best",
                {
                    "factor": factor,
                    "mode": mode,
                    "hookpoint": setup.hookpoint,
                    **best,
                    "seconds": round(time.time() - t, 1),
                },
            )
            if best["meets_target"]:  # again on other prompts and noise than it was found on
                again = steering(strengths=[best["best_strength"]], seed=args.heldout_seed)
                emit(
                    "steer_heldout",
                    {
                        "factor": factor,
                        "mode": mode,
                        "hookpoint": setup.hookpoint,
                        "seed": args.heldout_seed,
                        **best_strength(again),
                    },
                )


UNLEARN_TARGET = {"UA": 0.90, "IRA": 0.85, "CRA": 0.90}


def margin(record: dict[str, Any]) -> float:
    """How far a record clears the issue's unlearning targets (negative: the worst miss)."""
    return min(record[k] - v for k, v in UNLEARN_TARGET.items())


def rank(record: dict[str, Any]) -> tuple[float, ...]:
    """Sort key of unlearning settings: the margins over the three targets, worst first, so ties
    on the worst are broken by the next. (The worst is often IRA, capped by how often the
    pipeline itself draws the other values, the same for every setting.)"""
    return tuple(sorted(record[k] - v for k, v in UNLEARN_TARGET.items()))


def setting(record: dict[str, Any]) -> tuple[str, int, float]:
    """An anchored record's (anchor, latents per concept, anchor strength)."""
    return record["anchor"], record["latents_per_step"], record["anchor_strength"]


TUNING_SEED, VALIDATION_SEED = 2, 5
"""Prompts and noise of the unlearning sweep and of its validation (held out: --heldout_seed)."""


def run_unlearning(setup: Any, factor: str, target: str, n: int, args: Any, emit: Emitter) -> None:
    """SAeUron's multipliers, the anchored sweep (anchor value, latents per concept, anchor
    strength) on tuning prompts, its best few again on validation prompts, and the best of those
    over both sets on held-out prompts and noise."""
    from saekit.testbed import world

    values = [v for v in world.FACTOR_VALUES[factor] if v != target]
    anchors = [a for a in args.anchors or values if a in values]
    t = time.time()
    where = {"hookpoint": setup.hookpoint}
    unlearning = partial(
        bench.diffusion_unlearning,
        setup,
        factor,
        target,
        clean_images={},  # the unedited images of each prompt set, generated once
        min_specificity=args.min_specificity,
    )
    tuning_size = {"n_target": n, "n_other": 2 * n}

    def measure(seed: int, count: int, anchor: str, strengths: list[float]) -> list[dict]:
        return unlearning(
            count=count, anchor=anchor, anchor_strengths=strengths, seed=seed, **tuning_size
        )[1:]  # (the first is the clean reference)

    for r in unlearning(
        multipliers=args.multipliers, count=args.unlearn_count, seed=TUNING_SEED, **tuning_size
    ):
        emit("unlearn_diffusion", {**r, **where, "seconds": round(time.time() - t, 1)})
    tuned: list[dict[str, Any]] = []
    for anchor in anchors:
        for count in args.anchor_counts:
            for r in measure(TUNING_SEED, count, anchor, args.anchor_strengths):
                emit("unlearn_diffusion", {**r, **where, "seconds": round(time.time() - t, 1)})
                tuned.append(r)
    # At 48 prompts a rate moves by 0.02 a sample and the sweep's top settings tie within noise:
    # the best few are measured again on other prompts and picked by both sets together.
    finalists = sorted(tuned, key=rank, reverse=True)[: args.validate_top]
    pooled = []
    for r in finalists:
        anchor, count, strength = setting(r)
        (again,) = measure(VALIDATION_SEED, count, anchor, [strength])
        emit("unlearn_validation", {**again, **where, "seconds": round(time.time() - t, 1)})
        pooled.append({**r, **{k: (r[k] + again[k]) / 2 for k in UNLEARN_TARGET}})
    best = max(pooled, key=rank)
    heldout = unlearning(
        count=best["latents_per_step"],
        anchor=best["anchor"],
        anchor_strengths=[best["anchor_strength"]],
        n_target=2 * (8 if args.quick else 24),
        n_other=4 * (8 if args.quick else 24),
        seed=args.heldout_seed,
    )
    for r in heldout:
        emit(
            "unlearn_heldout",
            {
                **r,
                **where,
                "heldout": True,
                "meets_target": r["anchor"] is not None and margin(r) >= 0,
                "seconds": round(time.time() - t, 1),
            },
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", default=str(models.PIPELINE_DIR))
    parser.add_argument("--vlm", default=str(models.VLM_DIR))
    parser.add_argument("--clip", default=str(models.CLIP_DIR))
    parser.add_argument("--parts", nargs="*", default=["clip", "diffusion", "unlearn", "vlm"])
    parser.add_argument(
        "--unlearn_hookpoints",
        nargs="*",
        default=[bench.TEXT_INPUT_HOOKPOINT, bench.TEXT_HOOKPOINT],
        help="hookpoints unlearning is measured at, a dictionary each",
    )
    parser.add_argument(
        "--steer_hookpoints",
        nargs="*",
        default=[bench.TEXT_HOOKPOINT, bench.TEXT_INPUT_HOOKPOINT],
        help="hookpoints steering is measured at, a dictionary each",
    )
    parser.add_argument("--steps", type=int, default=20, help="denoising steps")
    parser.add_argument(
        "--guidance", type=float, default=1.0, help="CFG scale (1: the testbed's default, unguided)"
    )
    parser.add_argument("--scenes", type=int, default=1000, help="scenes for training/selection")
    parser.add_argument("--prompts", type=int, default=16, help="prompts per steering target")
    parser.add_argument("--count", type=int, default=4, help="latents selected per step")
    parser.add_argument("--strengths", type=float, nargs="*", default=[1.0, 1.5, 2.0, 4.0])
    parser.add_argument("--multipliers", type=float, nargs="*", default=[-1.0, -1.5, -2.0, -4.0])
    parser.add_argument("--modes", nargs="*", default=["add", "replace"], help="steering modes")
    parser.add_argument(
        "--replace_strengths", type=float, nargs="*", default=[0.5, 1.0, 1.5, 2.0, 3.0, 4.0]
    )
    parser.add_argument(
        "--min_specificity",
        type=float,
        default=DEFAULT_MIN_SPECIFICITY,
        help="detectors of a concept (replace mode, unlearning); 0: every selected latent",
    )
    parser.add_argument("--unlearn_count", type=int, default=8, help="latents per concept")
    parser.add_argument(
        "--tune_prompts",
        type=int,
        default=48,
        help="tuning prompts with the concept (x2 without; at 24 the pick was noise-limited)",
    )
    parser.add_argument(
        "--heldout_seed",
        type=int,
        default=17,
        help="held-out prompts and noise of the checks (unlearning: 48 and 96)",
    )
    parser.add_argument(
        "--validate_top", type=int, default=5, help="unlearning settings validated on new prompts"
    )
    parser.add_argument("--unlearn_factors", nargs="*", default=["shape", "color"])
    parser.add_argument("--anchor_counts", type=int, nargs="*", default=[4, 6, 8])
    parser.add_argument("--anchor_strengths", type=float, nargs="*", default=[0.75, 1.0, 1.5])
    parser.add_argument(
        "--anchors",
        nargs="*",
        help="values tried in the unlearned one's place (default: all of its factor's others)",
    )
    parser.add_argument("--branch", default="cond")
    parser.add_argument("--unlearn_shape", default="circle")
    parser.add_argument("--unlearn_color", default="red")
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    parser.add_argument("--out", type=Path, help="also append the JSON lines to this file")
    parser.add_argument("--markdown", type=Path, help="write the README tables to this file")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.scenes, args.prompts, args.steps = 400, 6, 10
    emit = Emitter(args.out)
    started = time.time()

    if "clip" in args.parts:
        model, tokenizer = models.load_clip(args.clip)
        t = time.time()
        records = bench.clip_steering(
            model, tokenizer, n_train=600 if args.quick else 2000, n_test=60 if args.quick else 200
        )
        for r in records:
            emit("steer_clip", r)
        by: dict[float, list[float]] = {}
        for r in records:
            by.setdefault(r["strength"], []).append(r["zero_shot_is_target"])
        emit(
            "steer_clip_mean",
            {
                "per_strength": {s: round(sum(v) / len(v), 4) for s, v in sorted(by.items())},
                "seconds": round(time.time() - t, 1),
            },
        )

    if {"diffusion", "unlearn"} & set(args.parts):
        pipe = models.load_pipeline(args.pipeline)
        setups = {}
        steer_at = args.steer_hookpoints if "diffusion" in args.parts else []
        unlearn_at = args.unlearn_hookpoints if "unlearn" in args.parts else []
        for hookpoint in dict.fromkeys([*steer_at, *unlearn_at]):
            t = time.time()
            setup = setups[hookpoint] = bench.diffusion_setup(
                pipe,
                hookpoint=hookpoint,
                n_scenes=args.scenes,
                num_inference_steps=args.steps,
                guidance_scale=args.guidance,
            )
            emit(
                "steer_setup",
                {
                    "pipeline": args.pipeline,
                    "hookpoint": hookpoint,
                    "rows": len(setup.rows),
                    "d_sae": setup.sae.d_sae,
                    "k": setup.sae.cfg.k,
                    "min_specificity": args.min_specificity,
                    "seconds": round(time.time() - t, 1),
                },
            )
        if "diffusion" in args.parts:
            for factor in ("color", "shape"):
                t = time.time()
                reference = bench.prompt_edit_reference(
                    setups[steer_at[0]], factor, prompts_per_target=args.prompts
                )
                emit(
                    "steer_prompt_edit",
                    {
                        "factor": factor,
                        "success": round(mean(r["success"] for r in reference), 4),
                        "others_preserved": round(
                            mean(r["others_preserved"] for r in reference), 4
                        ),
                        "per_target": reference,
                        "seconds": round(time.time() - t, 1),
                    },
                )
            for hookpoint in steer_at:
                run_steering(setups[hookpoint], args, emit)
        if "unlearn" in args.parts:
            n = 8 if args.quick else args.tune_prompts
            for factor, target in (("shape", args.unlearn_shape), ("color", args.unlearn_color)):
                if factor in args.unlearn_factors:
                    for hookpoint in unlearn_at:
                        run_unlearning(setups[hookpoint], factor, target, n, args, emit)

    if "vlm" in args.parts:
        model, processor = models.load_vlm(args.vlm)
        t = time.time()
        for r in bench.vlm_steering(
            model, processor, n_train=100 if args.quick else 300, n_test=16 if args.quick else 48
        ):
            emit("steer_vlm", {**r, "seconds": round(time.time() - t, 1)})
    emit("total", {"seconds": round(time.time() - started, 1)})
    if args.markdown is not None:
        args.markdown.write_text(markdown(emit.records) + "\n")


if __name__ == "__main__":
    main()
