"""``saekit cache``: cache hookpoint activations of a model to disk; inspect and merge caches.

saekit cache --config configs/cache-custom.yaml [--flags that override it]
saekit cache info DIR [--verify] [--json]
saekit cache merge DIR [--parts A B ...]
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch

from .. import _dist
from ..configuration import ConfigError, add_arguments, collect_overrides, load_config, to_dict
from ..dictionaries.config import StorageDtype

log = logging.getLogger("saekit.cache")


def register(subparsers: Any) -> None:
    from ..cache import CacheConfig

    parser = subparsers.add_parser(
        "cache",
        help="cache hookpoint activations of a model to disk (and inspect or merge caches)",
        description="Run a model over images, prompts or tensors with hooks on named modules "
        "and write per-token activations into shuffled safetensors shards. Settings come from "
        "--config FILE (YAML) and flags, which override it. Rerunning the same command resumes "
        "an interrupted run. Under torchrun each rank caches its slice of the inputs.",
    )
    parser.add_argument("--config", help="YAML file of settings (see configs/cache-*.yaml)")
    add_arguments(parser, CacheConfig)
    parser.set_defaults(handler=run, cache_action=None)
    actions = parser.add_subparsers(dest="cache_action", metavar="{info,merge}")

    info = actions.add_parser("info", help="describe a cache directory (and check it)")
    info.add_argument("directory", help="the cache directory")
    info.add_argument(
        "--verify", action="store_true", help="read every shard and check every checksum"
    )
    info.add_argument("--json", action="store_true", help="print the description as JSON")
    info.set_defaults(handler=run_info)

    merge = actions.add_parser(
        "merge", help="present the rank directories of a sharded run as one cache (no copy)"
    )
    merge.add_argument("directory", help="the output_dir of the sharded run")
    merge.add_argument(
        "--parts",
        nargs="*",
        help="rank directories to merge (default: every rank-*-of-* folder in DIRECTORY)",
    )
    merge.set_defaults(handler=run_merge)


def _device(name: str) -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
    return torch.device("cpu")


def _dtype(name: StorageDtype) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _init_process_group() -> None:
    """Join the launcher's process group (torchrun sets MASTER_ADDR): ranks then read their
    rank from it. Caching itself needs no communication."""
    import torch.distributed as dist

    if (
        int(os.environ.get("WORLD_SIZE", "1")) > 1
        and "MASTER_ADDR" in os.environ
        and dist.is_available()
        and not dist.is_initialized()
    ):
        # Ranks may finish hours apart: no collective waits on another.
        dist.init_process_group("gloo", timeout=datetime.timedelta(days=7))
        _dist.joined()  # the process then ends through _dist.exit_process (gloo's worker threads)


def run(args: argparse.Namespace) -> int:
    from ..adapters import load_adapter
    from ..cache import CacheConfig, cache_activations, open_inputs

    cfg = load_config(CacheConfig, args.config, collect_overrides(args, CacheConfig))
    if not cfg.model:
        raise ConfigError(
            "no model to cache: give --model (a hub id or path, or 'package.module:factory' "
            "for a custom model) or model: in the --config file"
        )
    if not cfg.data.given:
        raise ConfigError(
            "no inputs: give --images DIR, --prompts FILE, --pairs FILE.jsonl or --tensors FILE"
        )
    _init_process_group()
    if str(Path.cwd()) not in sys.path:  # custom factories live in the user's project
        sys.path.insert(0, str(Path.cwd()))
    adapter = load_adapter(
        cfg.model,
        cfg.adapter,
        revision=cfg.revision,
        device=_device(cfg.device),
        dtype=_dtype(cfg.model_dtype),
        local_files_only=cfg.local_files_only,
        trust_remote_code=cfg.trust_remote_code,
        **cfg.model_options,
    )
    inputs = open_inputs(cfg.data)
    if _dist.is_rank_zero():
        print(f"saekit cache: {cfg.model} on {inputs.description} -> {cfg.output_dir}", flush=True)
    result = cache_activations(adapter, inputs, cfg)
    rows = ", ".join(f"{name}: {n:,}" for name, n in result.rows.items())
    skipped = (
        f"; skipped {sum(result.skipped.values())} inputs ({result.skipped})"
        if result.skipped
        else ""
    )
    print(
        f"saekit cache: {result.shards} shards ({rows} rows) in {result.path}"
        f"{skipped}; {result.seconds:.1f} s"
    )
    if result.repaired:
        print(
            f"saekit cache: rewrote {len(result.repaired)} damaged shard(s): "
            f"{', '.join(result.repaired[:5])}{' ...' if len(result.repaired) > 5 else ''}"
        )
    if result.merged:
        print(f"saekit cache: merged all ranks into {result.merged}")
    return 0


def describe(directory: str | Path, *, verify: bool = False) -> dict[str, Any]:
    """A JSON-able description of a cache (what ``saekit cache info`` prints)."""
    from ..cache import open_cache
    from ..cache.check import shard_problem

    view = open_cache(directory)
    first = view.first
    hookpoints = {}
    damaged: list[dict[str, str]] = []
    for name, hookpoint in view.hookpoints.items():
        shard_bytes = sum(s.bytes for _, s in hookpoint.shards)
        hookpoints[name] = {
            "module": hookpoint.record.module,
            "capture": hookpoint.record.capture,
            "d": hookpoint.d,
            "rows": hookpoint.rows,
            "shards": len(hookpoint.shards),
            "bytes": shard_bytes,
            "sample_shape": hookpoint.record.sample_shape,
            "description": hookpoint.record.description,
        }
        for path, s in hookpoint.shards:  # sizes and headers always; checksums with verify
            problem = shard_problem(
                path,
                s,
                d=hookpoint.d,
                dtype=first.dtype,
                cache_id=view.cache_id,
                hookpoint=name,
                full=verify,
            )
            if problem:
                damaged.append({"file": str(path), "problem": problem})
    return {
        "path": str(view.path),
        "complete": view.complete and not damaged,
        "damaged": damaged,
        "parts": len(view.parts),
        "merged": view.merged,
        "model": first.model,
        "model_revision": first.model_revision,
        "adapter": first.adapter,
        "dtype": first.dtype,
        "streams": first.streams,
        "inputs": sum(m.inputs for _, m in view.parts),
        "skipped_inputs": view.skipped,
        "hookpoints": hookpoints,
        "config": to_dict(first.config),
        "verified": verify,
    }


def run_info(args: argparse.Namespace) -> int:
    from ..cache.disk import human_bytes

    info = describe(args.directory, verify=args.verify)
    if args.json:
        print(json.dumps(info, indent=2))
        return 2 if info["damaged"] else 0
    damaged = info["damaged"]
    if damaged:
        state = (
            f"DAMAGED: {len(damaged)} shard(s) missing, truncated or corrupt (rerun its "
            "`saekit cache` command to rewrite exactly those)"
        )
    elif info["complete"]:
        state = "complete"
    else:
        state = "INCOMPLETE (rerun its command to finish it)"
    parts = (
        f", {info['parts']} ranks" + (" (merged)" if info["merged"] else "")
        if info["parts"] > 1
        else ""
    )
    print(f"{info['path']}: {state}{parts}")
    revision = f"@{info['model_revision']}" if info["model_revision"] else ""
    print(f"  model {info['model']}{revision} ({info['adapter']}), stored as {info['dtype']}")
    skipped = info["skipped_inputs"]
    skipped_text = f", skipped {sum(skipped.values())} ({skipped})" if skipped else ""
    print(f"  inputs {info['inputs']:,}{skipped_text}")
    for name, h in info["hookpoints"].items():
        print(
            f"  {name}: {h['capture']} of {h['module']}, d={h['d']}, {h['rows']:,} rows in "
            f"{h['shards']} shards ({human_bytes(h['bytes'])}); {h['description']}"
        )
    for item in damaged:
        print(f"saekit cache info: error: {item['problem']}", file=sys.stderr)
    if damaged:
        return 2
    if info["verified"]:
        print("  every shard matches its checksums")
    return 0


def run_merge(args: argparse.Namespace) -> int:
    from ..cache import merge_cache

    view = merge_cache(args.directory, args.parts)
    rows = ", ".join(f"{name}: {h.rows:,}" for name, h in view.hookpoints.items())
    print(
        f"saekit cache: merged {len(view.parts)} ranks into {view.path} ({rows} rows); no data copied"
    )
    return 0
