"""How fast evaluation and the dashboard read a cache (JSON lines on stdout).

    nice -n 10 python scripts/bench_eval.py [--rows 262144 --d 256 --d_sae 4096 --k 32]

Measures, on a cache of random rows written by the real cache writer (float32):
* ``encode_only``: the dictionary's encoder over the same rows from memory (the ceiling);
* ``eval``: ``evaluate_on_cache`` (shuffled read, encode, decode, metrics) in rows/s;
* ``eval_with_factors``: the same with per-input maxima for factor scores;
* ``dashboard_collect``: the dashboard's single pass (storage-order read, encode, top lists,
  samples, heatmaps per shuffle group);
* ``dashboard_build``: the whole site (pass, thumbnails-free pages, index) for ``--pages`` pages.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from saekit.adapters import CustomAdapter
from saekit.cache import CacheConfig, cache_activations
from saekit.dashboard import DashboardConfig, build_dashboard, collect
from saekit.dictionaries import SAEConfig, build_dictionary
from saekit.evaluation import FactorLabels, evaluate_on_cache


def machine() -> str:
    import os

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.machine()}, {os.cpu_count()} CPU cores, {torch.get_num_threads()} threads, {gpu}"


def emit(name: str, seconds: float, rows: int, **extra) -> None:
    print(
        json.dumps(
            {
                "bench": name,
                "rows": rows,
                "seconds": round(seconds, 3),
                "rows_per_s": round(rows / seconds),
                **extra,
                "machine": machine(),
            }
        ),
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=262_144)
    parser.add_argument("--tokens", type=int, default=64, help="rows per input")
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--d_sae", type=int, default=4096)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--pages", type=int, default=200)
    args = parser.parse_args()
    shape = {"d": args.d, "d_sae": args.d_sae, "k": args.k}

    inputs = args.rows // args.tokens
    data = torch.randn(inputs, args.tokens, args.d, generator=torch.Generator().manual_seed(0))
    sae = build_dictionary(
        SAEConfig(architecture="topk", d_in=args.d, d_sae=args.d_sae, k=args.k, hookpoint="")
    ).eval()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = CacheConfig(
            hookpoints=[""],
            output_dir=str(Path(tmp) / "cache"),
            batch_size=256,
            dtype="float32",
            progress=False,
            rows_per_shard=65_536,
            shuffle_buffer_rows=131_072,
        )
        cache_activations(CustomAdapter(nn.Identity(), name="identity"), data, cfg)
        cache = Path(tmp) / "cache"
        rows = inputs * args.tokens

        with torch.no_grad():
            flat = data.reshape(-1, args.d)
            began = time.perf_counter()
            for start in range(0, rows, 4096):
                sae.encode(flat[start : start + 4096])
            emit("encode_only", time.perf_counter() - began, rows, **shape)

        began = time.perf_counter()
        evaluate_on_cache(sae, cache, max_rows=0)
        emit("eval", time.perf_counter() - began, rows, **shape)

        labels = FactorLabels(
            [f"f={i}" for i in range(16)], torch.rand(inputs, 16, generator=torch.Generator()) < 0.3
        )
        began = time.perf_counter()
        evaluate_on_cache(sae, cache, max_rows=0, labels=labels)
        emit("eval_with_factors", time.perf_counter() - began, rows, **shape, inputs=inputs)

        began = time.perf_counter()
        collect(sae, cache)
        emit("dashboard_collect", time.perf_counter() - began, rows, **shape)

        began = time.perf_counter()
        result = build_dashboard(
            sae, cache, Path(tmp) / "site", config=DashboardConfig(max_pages=args.pages)
        )
        emit("dashboard_build", time.perf_counter() - began, rows, **shape, pages=result.pages)


if __name__ == "__main__":
    main()
