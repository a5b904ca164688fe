"""``saekit demo``: the whole path on the embedded default, offline, in minutes on a CPU.

The embedded default is the testbed (``saekit.testbed``): a procedurally generated world with
known factors and the small CLIP, text-to-image pipeline and VLM that ship with saekit. The demo
caches the CLIP image tower and the denoiser, trains TopK dictionaries on both, scores every
latent against every factor value and writes a report folder (see ``saekit.demo``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

from ..configuration import add_arguments, collect_overrides, load_config
from ..demo import DemoConfig, run_demo


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run the whole path on the shipped testbed models and write a report",
        description="Cache the testbed CLIP's image tower and its text-to-image denoiser, train "
        "TopK dictionaries on both, score their latents against the world's known factors and "
        "write report.html / report.json / PNG grids.",
    )
    parser.add_argument("--config", help="a YAML file of DemoConfig fields")
    parser.add_argument("--quick", action="store_true", help="a small run (under a minute)")
    add_arguments(parser, DemoConfig)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    overrides = collect_overrides(args, DemoConfig)
    cfg = load_config(DemoConfig, args.config, overrides)
    if args.quick:  # explicit flags win over the quick sizes
        cfg = dataclasses.replace(cfg.quick(), **{k: getattr(cfg, k) for k in overrides})
    report = run_demo(cfg)
    summary = {
        name: {
            "held_out_fvu": round(part["held_out"]["fvu"], 4),
            "factor_values_covered": f"{part['factors']['values_covered']}/{part['factors']['values_total']}",
        }
        for name, part in report["models"].items()
    }
    print(json.dumps(summary))
    print(f"[demo] report: {cfg.output_dir}/report.html (figures in {cfg.output_dir}/report.json)")
    return 0
