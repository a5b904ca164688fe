"""Faults and scale: a disk too small is refused up front, a disk that fills during the run
stops it cleanly (every complete shard intact and readable) and the same command resumes it;
two gloo ranks write one coherent cache."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess

import pytest
import torch
import torch.multiprocessing as mp
from test_cache_support import SEQ, reference_outputs, tiny_transformer, token_inputs

from saekit.adapters import CustomAdapter
from saekit.cache import (
    CacheConfig,
    CacheReader,
    DiskFullError,
    InsufficientDiskError,
    cache_activations,
    load_manifest,
    merge_cache,
    open_cache,
)
from saekit.cache.shards import CacheError, ShardFile


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MB tmpfs: a real file system that fills up (needs root, as CI and dev machines run)."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _cfg(path, **overrides) -> CacheConfig:
    base = dict(
        output_dir=str(path),
        hookpoints=["blocks.0", "blocks.1"],
        batch_size=25,
        rows_per_shard=100,
        shuffle_buffer_rows=400,
        dtype="float32",
        progress=False,
    )
    return CacheConfig(**{**base, **overrides})


def test_a_cache_larger_than_the_free_space_is_refused(small_disk, capsys):
    ids = token_inputs(5000)  # 5000 inputs x 8 tokens x 2 hookpoints x ~84 B = ~6.7 MB
    with pytest.raises(InsufficientDiskError, match=r"about 6\.\d MB to write.*not enough space"):
        cache_activations(CustomAdapter(tiny_transformer()), ids, _cfg(small_disk / "cache"))
    assert not list((small_disk / "cache").glob("*/*.safetensors"))  # nothing was written
    # The user may override the check (e.g. when freeing space while it runs).
    cache_activations(
        CustomAdapter(tiny_transformer()), ids[:100], _cfg(small_disk / "ok", disk_check=False)
    )


def test_a_full_disk_stops_cleanly_and_the_run_resumes(small_disk, tmp_path):
    model, ids = tiny_transformer(), token_inputs(1000)
    cache_activations(CustomAdapter(model), ids, _cfg(tmp_path / "reference"))

    filler = small_disk / "filler"
    batches = []

    def feed_then_fill(m, batch):
        batches.append(1)
        if len(batches) == 12:  # another program fills the disk in the middle of the run
            free = shutil.disk_usage(small_disk).free
            with open(filler, "wb") as handle:
                handle.write(b"\0" * (free - 12_000))
        return m(batch.stacked_tensors())

    target = small_disk / "cache"
    with pytest.raises(
        DiskFullError, match=r"is full.*stopped cleanly.*run the same command again"
    ):
        cache_activations(CustomAdapter(model, feed=feed_then_fill), ids, _cfg(target))

    manifest = load_manifest(target)
    assert not manifest.complete and manifest.shard_count > 0
    assert not list(target.glob("*/.*.tmp"))  # no temporary file left behind
    for name, record in manifest.hookpoints.items():  # every listed shard is complete and intact
        for s in record.shards:
            ShardFile(
                target / s.file,
                rows=s.rows,
                size=s.bytes,
                header_xxh3=s.header_xxh3,
                d=record.d,
                dtype=torch.float32,
                cache_id=manifest.cache_id,
                hookpoint=name,
            ).verify()
    readable = sum(b.shape[0] for b in CacheReader(target, "blocks.0", batch_size=256))
    assert readable == manifest.hookpoints["blocks.0"].rows > 0

    filler.unlink()
    result = cache_activations(CustomAdapter(model), ids, _cfg(target))
    assert result.rows == {"blocks.0": 1000 * SEQ, "blocks.1": 1000 * SEQ}
    reference = load_manifest(tmp_path / "reference")
    resumed = load_manifest(target)
    for name in ("blocks.0", "blocks.1"):
        expected = sorted((s.file, s.header_xxh3) for s in reference.hookpoints[name].shards)
        assert sorted((s.file, s.header_xxh3) for s in resumed.hookpoints[name].shards) == expected


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_config(output_dir) -> CacheConfig:
    """The cache of one rank of a two-rank run (small shards, so each rank writes several)."""
    return _cfg(
        output_dir,
        hookpoints=["blocks.1"],
        batch_size=10,
        rows_per_shard=64,
        shuffle_buffer_rows=128,
    )


def _rank_worker(rank: int, world_size: int, port: int, output_dir: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        cache_activations(
            CustomAdapter(tiny_transformer()), token_inputs(90), _rank_config(output_dir)
        )  # rank from dist
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_write_one_coherent_cache(tmp_path):
    root = tmp_path / "sharded"
    mp.spawn(_rank_worker, args=(2, _free_port(), str(root)), nprocs=2, join=True)

    view = open_cache(root)
    assert view.merged and len(view.parts) == 2  # the last rank to finish merged them
    assert [m.rank for _, m in view.parts] == [0, 1]
    assert {d.name for d, _ in view.parts} == {"rank-00000-of-00002", "rank-00001-of-00002"}
    for directory, manifest in view.parts:  # each rank cached every other input
        assert manifest.inputs == 45
        part = CacheReader(directory, batch_size=10_000, metadata=True)
        samples = torch.cat([b.metadata["sample"] for b in part])
        assert set((samples % 2).tolist()) == {manifest.rank} and samples.unique().numel() == 45
    reader = CacheReader(root, batch_size=100, metadata=True, seed=2)
    rows, samples, positions = [], [], []
    for batch in reader:
        rows.append(batch.activations)
        samples.append(batch.metadata["sample"])
        positions.append(batch.metadata["position"])
    x, sample, position = torch.cat(rows), torch.cat(samples).long(), torch.cat(positions).long()
    assert x.shape == (90 * SEQ, 16)
    assert sorted((sample * 100 + position).tolist()) == sorted(
        s * 100 + p for s in range(90) for p in range(SEQ)
    )
    expected = reference_outputs(tiny_transformer(), "blocks.1", token_inputs(90))
    torch.testing.assert_close(x, expected[sample, position], rtol=0, atol=0)

    # Merging again (e.g. by hand) gives the same manifest; a part changed afterwards is caught.
    before = (root / "manifest.json").read_bytes()
    merge_cache(root)
    assert (root / "manifest.json").read_bytes() == before


def test_a_rank_that_has_not_written_its_manifest_leaves_the_merge_for_later(tmp_path):
    """The first rank to finish may find a sibling's directory created but still empty: that is
    an unfinished part, so it leaves the merge to the last rank instead of failing."""
    root = tmp_path / "sharded"
    (root / "rank-00001-of-00002").mkdir(parents=True)  # rank 1: started, nothing written yet
    result = cache_activations(
        CustomAdapter(tiny_transformer()),
        token_inputs(20),
        _rank_config(root),
        rank=0,
        world_size=2,
    )
    assert result.merged is None
    assert (root / "rank-00000-of-00002" / "manifest.json").exists()
    with pytest.raises(CacheError, match=r"rank-00001-of-00002 has no manifest\.json yet"):
        merge_cache(root)
