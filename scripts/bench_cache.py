"""Activation-cache benchmark (issue: activation cache). Prints JSON lines:

1. ``cache_write``: shard-writer throughput (MB/s) for a synthetic producer, beside the disk's
   own sequential write speed (fsynced 16 MB writes) measured in the same run and directory;
2. ``cache_overhead``: a caching run over a transformer that does real work per batch, against
   a bare forward pass of the same model on the same batches (early stop off, so both run the
   whole model; and on, which skips the layers after the hookpoint);
3. ``cache_read``: the reader's shuffled throughput (rows/s, MB/s), against ``train_consume``:
   the real Trainer's consumption rate on the shape of scripts/bench_train.py (d_in=256, 4096
   latents, k=8, batch 4096) from memory, and ``train_from_cache``: the same training reading
   the cache, which shows whether the reader slows training down.

    python scripts/bench_cache.py [--dir /tmp/saekit-bench] [--write_gb 1] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from datetime import date
from pathlib import Path

import torch
from torch import nn

from saekit._malloc import keep_large_allocations_in_heap
from saekit.adapters import CustomAdapter
from saekit.cache import CacheConfig, CacheReader, cache_activations
from saekit.cache.disk import sequential_write_speed
from saekit.cache.manifest import HookpointRecord, Manifest, save_manifest
from saekit.cache.rows import COLUMNS
from saekit.cache.shards import block_rows_for
from saekit.cache.writer import ShardWriter
from saekit.dictionaries import SAEConfig
from saekit.sources import ArraySource
from saekit.synthetic import make_sparse_dataset
from saekit.training import TrainConfig, Trainer


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores, no GPU"


def emit(record: dict) -> None:
    print(json.dumps({**record, "device": machine(), "date": date.today().isoformat()}), flush=True)


def synthetic_cache(
    directory: Path, rows: int, d: int, dtype: torch.dtype, *, rows_per_shard: int, buffer_rows: int
) -> float:
    """Write ``rows`` random rows through the ShardWriter as fast as a producer can hand them
    over; return the seconds from the first row to the last byte on disk."""
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    name = "synthetic"
    manifest = Manifest(
        cache_id="bench",
        config={},
        adapter="bench",
        model=None,
        model_revision=None,
        dtype={torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}[
            dtype
        ],  # type: ignore[arg-type]
    )
    manifest.hookpoints[name] = HookpointRecord(name, "output", d, block_rows_for(d, dtype))
    save_manifest(directory, manifest)
    batch = 4096
    pool = torch.randn(batch * 8, d).to(dtype)  # reused: the producer's own cost is not measured
    columns = {c: torch.zeros(batch, dtype=dt) for c, (dt, _) in COLUMNS.items()}
    writer = ShardWriter(directory, manifest, rows_per_shard=rows_per_shard, seed=0)
    began = time.perf_counter()
    written = buffered = group = 0
    from saekit.cache.manifest import GroupRecord

    while written < rows:
        start = (written // batch % 8) * batch
        writer.add(name, pool[start : start + batch].clone(), columns)
        written += batch
        buffered += batch
        if buffered >= buffer_rows:
            writer.end_group(GroupRecord(group, written // batch, written))
            group += 1
            buffered = 0
    writer.end_group(GroupRecord(group, written // batch, written))
    writer.close()
    manifest.complete = True
    save_manifest(directory, manifest)
    return time.perf_counter() - began


def bench_write(args, root: Path) -> None:
    d, dtype = 768, torch.bfloat16
    rows = int(args.write_gb * 1e9 / (d * 2))
    disk = sequential_write_speed(root, total_bytes=int(args.write_gb * 1e9))
    seconds = synthetic_cache(
        root / "write", rows, d, dtype, rows_per_shard=65536, buffer_rows=262144
    )
    total = sum(p.stat().st_size for p in (root / "write").rglob("*.safetensors"))
    mb_s = total / seconds / 1e6
    emit(
        {
            "benchmark": "cache_write",
            "rows": rows,
            "d": d,
            "dtype": "bfloat16",
            "rows_per_shard": 65536,
            "shuffle_buffer_rows": 262144,
            "bytes": total,
            "mb_per_s": round(mb_s, 1),
            "disk_sequential_mb_per_s": round(disk, 1),
            "fraction_of_disk": round(mb_s / disk, 3),
        }
    )
    shutil.rmtree(root / "write", ignore_errors=True)


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, 8, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class Transformer(nn.Module):
    def __init__(self, vocab=1000, d=384, layers=6):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(layers))
        self.head = nn.Linear(d, vocab)

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def bench_overhead(args, root: Path) -> None:
    torch.manual_seed(0)
    device = torch.device(args.device)
    if device.type == "cpu":
        # One intra-op thread: CPU time then measures work, not OpenMP spinning on a shared
        # machine, and the cache's copy/write threads must fit beside the model.
        torch.set_num_threads(args.threads)
    model = Transformer().to(device).eval()
    batch, seq, n_batches = 16, 128, args.overhead_batches
    ids = torch.randint(0, 1000, (batch * n_batches, seq))
    hookpoint = "blocks.3"

    def clocks() -> tuple[float, float]:
        return time.perf_counter(), time.process_time()

    def since(start: tuple[float, float]) -> tuple[float, float]:
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall, cpu = clocks()
        return wall - start[0], cpu - start[1]

    def bare() -> tuple[float, float]:
        start = clocks()
        with torch.no_grad():
            for i in range(n_batches):
                model(ids[i * batch : (i + 1) * batch].to(device))
        return since(start)

    def cached(early_stop: bool) -> tuple[float, float]:
        out = root / f"overhead-{early_stop}"
        shutil.rmtree(out, ignore_errors=True)
        cfg = CacheConfig(
            hookpoints=[hookpoint],
            output_dir=str(out),
            batch_size=batch,
            dtype="bfloat16",
            rows_per_shard=16384,
            shuffle_buffer_rows=65536,
            early_stop=early_stop,
            progress=False,
        )
        start = clocks()
        cache_activations(CustomAdapter(model), ids, cfg)  # everything: setup, threads, fsync
        took = since(start)
        shutil.rmtree(out, ignore_errors=True)
        return took

    bare()  # warm-up
    runs: dict[str, list[tuple[float, float]]] = {"bare": [], "cache": [], "cache_early_stop": []}
    for _ in range(args.repeats):  # interleaved, best of N: the CPU may be shared
        runs["bare"].append(bare())
        runs["cache"].append(cached(False))
        runs["cache_early_stop"].append(cached(True))
    wall = {k: min(w for w, _ in v) for k, v in runs.items()}
    cpu = {k: min(c for _, c in v) for k, v in runs.items()}
    rows = batch * n_batches * seq
    emit(
        {
            "benchmark": "cache_overhead",
            "model": "transformer d=384 x6 layers, seq 128",
            "hookpoint": hookpoint,
            "inputs": batch * n_batches,
            "rows": rows,
            "torch_threads": torch.get_num_threads(),
            "bare_forward_cpu_s": round(cpu["bare"], 3),
            "cache_cpu_s": round(cpu["cache"], 3),
            "overhead_cpu": round(cpu["cache"] / cpu["bare"] - 1, 4),
            "bare_forward_wall_s": round(wall["bare"], 3),
            "cache_wall_s": round(wall["cache"], 3),
            "overhead_wall": round(wall["cache"] / wall["bare"] - 1, 4),
            "cache_early_stop_wall_s": round(wall["cache_early_stop"], 3),
            "early_stop_wall_change": round(wall["cache_early_stop"] / wall["bare"] - 1, 4),
        }
    )


def bench_read(args, root: Path) -> None:
    rows, d = args.read_rows, 256
    data = make_sparse_dataset(rows, d, 4096, 8, seed=0)
    directory = root / "read"
    shutil.rmtree(directory, ignore_errors=True)
    # Cache the benchmark's own activations (fp32, as bench_train trains on).
    model = nn.Sequential(nn.Identity())
    cfg = CacheConfig(
        hookpoints=["0"],
        output_dir=str(directory),
        batch_size=65536,
        dtype="float32",
        rows_per_shard=65536,
        shuffle_buffer_rows=262144,
        progress=False,
    )
    cache_activations(CustomAdapter(model), data.activations, cfg)

    reader = CacheReader(directory, batch_size=4096, epochs=1, seed=0)
    began = time.perf_counter()
    n = sum(b.shape[0] for b in reader)
    seconds = time.perf_counter() - began
    emit(
        {
            "benchmark": "cache_read",
            "rows": n,
            "d": d,
            "dtype": "float32",
            "batch": 4096,
            "shuffled": True,
            "rows_per_s": round(n / seconds),
            "mb_per_s": round(n * d * 4 / seconds / 1e6, 1),
        }
    )

    def train(source) -> float:
        cfg = TrainConfig(
            batch_size=4096,
            lr_warmup_steps=20,
            log_every=10_000,
            checkpoint_every=0,
            progress=False,
            device=args.device,
            autocast=args.device != "cpu",
        )
        trainer = Trainer([SAEConfig(architecture="topk", k=8, d_sae=4096)], cfg, source)
        # as bench_train.py: the first Adam imports torch._dynamo (~2 s once per process)
        torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], fused=True)
        began = time.perf_counter()
        trainer.fit()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return trainer.tokens / (time.perf_counter() - began)

    memory, from_cache = 0.0, 0.0
    for _ in range(2):  # interleaved, best of 2: the CPU may be shared
        memory = max(memory, train(ArraySource(data.activations, 4096, epochs=1, seed=0)))
        from_cache = max(from_cache, train(CacheReader(directory, batch_size=4096, seed=0)))
    shape = {"rows": rows, "d_in": d, "latents": 4096, "k": 8, "batch": 4096}
    emit(
        {
            "benchmark": "train_consume",
            "source": "memory (ArraySource)",
            **shape,
            "tokens_per_s": round(memory),
        }
    )
    emit(
        {
            "benchmark": "train_from_cache",
            "source": "CacheReader (shuffled, checked)",
            **shape,
            "tokens_per_s": round(from_cache),
            "vs_memory": round(from_cache / memory, 3),
        }
    )
    shutil.rmtree(directory, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--dir", default="/tmp/saekit-bench-cache", help="scratch directory on the disk to measure"
    )
    parser.add_argument("--write_gb", type=float, default=1.0)
    parser.add_argument("--overhead_batches", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--read_rows", type=int, default=2**19)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads of the overhead benchmark on CPU"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--only", choices=["write", "overhead", "read"], nargs="*")
    args = parser.parse_args()
    keep_large_allocations_in_heap()
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    try:
        for name, bench in (
            ("write", bench_write),
            ("overhead", bench_overhead),
            ("read", bench_read),
        ):
            if not args.only or name in args.only:
                bench(args, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
