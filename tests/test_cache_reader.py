"""The cache reader: every row once per epoch, shuffled, deterministic for a seed, resumable;
corrupt, truncated, tampered and foreign files detected with the file named; and the trainer
trains from a cache (``saekit train --cache``), resuming with the reader's position."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from test_cache_support import tiny_transformer, token_inputs

from saekit.adapters import CustomAdapter
from saekit.cache import CacheConfig, CacheError, CacheReader, cache_activations, load_manifest
from saekit.cli import main
from saekit.dictionaries import SAEConfig, load_dictionary
from saekit.training import TrainConfig, Trainer


def _make_cache(path, n_inputs=200, **overrides):
    cfg = dict(
        output_dir=str(path),
        hookpoints=["blocks.1"],
        batch_size=20,
        rows_per_shard=96,
        shuffle_buffer_rows=400,
        dtype="float32",
        progress=False,
    )
    model = tiny_transformer()
    cache_activations(
        CustomAdapter(model, name="tiny"),
        token_inputs(n_inputs),
        CacheConfig(**{**cfg, **overrides}),
    )
    return path


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return _make_cache(tmp_path_factory.mktemp("reader") / "cache")


def _ids(batches) -> list[int]:
    """A row identity per row: sample * 100 + position."""
    return [
        int(s) * 100 + int(p)
        for b in batches
        for s, p in zip(b.metadata["sample"], b.metadata["position"], strict=True)
    ]


# The test cache is small: its shards are one block each. A mixing buffer of 0.01 MB makes every
# block its own window, so batches straddle windows; 128 MB mixes the whole cache in one window.
WINDOWS = pytest.mark.parametrize("mixing_buffer_mb", [128, 0.01])


def _small_reader(cache, **kwargs) -> CacheReader:
    return CacheReader(cache, batch_size=kwargs.pop("batch_size", 64), metadata=True, **kwargs)


@WINDOWS
def test_every_row_once_per_epoch_shuffled_and_deterministic(cache_dir, mixing_buffer_mb):
    reader = _small_reader(cache_dir, epochs=3, seed=7, mixing_buffer_mb=mixing_buffer_mb)
    assert reader.window_blocks == (1 if mixing_buffer_mb < 1 else reader.window_blocks)
    batches = list(reader)
    assert reader.n_rows == 1600 and len(reader) == 25
    assert len(batches) == reader.total_batches == 75
    assert all(b.activations.shape == (64, 16) for b in batches)
    epochs = [_ids(batches[i * 25 : (i + 1) * 25]) for i in range(3)]
    everything = sorted(s * 100 + p for s in range(200) for p in range(8))
    for order in epochs:
        assert sorted(order) == everything  # every row exactly once per epoch
    storage = _ids(CacheReader(cache_dir, batch_size=64, metadata=True, shuffle=False, epochs=1))
    assert epochs[0] != storage and epochs[0] != epochs[1] != epochs[2]  # shuffled, anew each epoch
    # Batches mix inputs: a batch of 64 rows holds tokens of many inputs (the writer shuffled
    # each group of ~400 rows, the reader mixes blocks across the cache).
    assert min(b.metadata["sample"].unique().numel() for b in batches) > 12  # in order: 8

    again = list(_small_reader(cache_dir, epochs=3, seed=7, mixing_buffer_mb=mixing_buffer_mb))
    for a, b in zip(batches, again, strict=True):
        assert torch.equal(a.activations, b.activations)
    other_seed = _ids(_small_reader(cache_dir, epochs=1, seed=8))
    assert other_seed != epochs[0]

    # The rows themselves match their metadata (rows are not detached from their labels).
    first = batches[0]
    model = tiny_transformer()
    ids = token_inputs(200)
    from test_cache_support import reference_outputs

    reference = reference_outputs(model, "blocks.1", ids)
    expected = reference[first.metadata["sample"].long(), first.metadata["position"].long()]
    torch.testing.assert_close(first.activations, expected, rtol=0, atol=0)


def test_last_batch_of_an_epoch_is_smaller_and_epochs_stay_exact(cache_dir):
    reader = CacheReader(cache_dir, batch_size=300, epochs=2, seed=1)
    sizes = [b.shape[0] for b in reader]
    assert sizes == [300] * 5 + [100] + [300] * 5 + [100]


@WINDOWS
def test_resume_from_a_position_continues_the_same_batches(cache_dir, mixing_buffer_mb):
    make = lambda: CacheReader(  # noqa: E731
        cache_dir, batch_size=64, epochs=2, seed=3, mixing_buffer_mb=mixing_buffer_mb
    )
    full = list(make())
    reader = make()
    taken = []
    for batch in reader:
        taken.append(batch)
        if len(taken) == 31:  # into the second epoch
            break
    state = reader.state_dict()
    assert state["epoch"] == 1 and state["position"] == 6 * 64
    resumed = make()
    resumed.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON checkpoint
    rest = list(resumed)
    assert len(taken) + len(rest) == len(full)
    for a, b in zip(taken + rest, full, strict=True):
        assert torch.equal(a, b)

    with pytest.raises(ValueError, match="seed"):
        CacheReader(cache_dir, batch_size=64, seed=4).load_state_dict(state)


def test_reads_are_contiguous_blocks_of_at_least_a_mebibyte(tmp_path):
    path = _make_cache(
        tmp_path / "wide", n_inputs=300, rows_per_shard=2048, shuffle_buffer_rows=2400
    )
    record = load_manifest(path).hookpoints["blocks.1"]
    assert record.block_rows * record.d * 4 >= 1 << 20 or record.block_rows >= max(
        s.rows for s in record.shards
    )
    reader = CacheReader(path, batch_size=100)
    reads = []
    for shard in reader.shards:
        original = shard.read_block

        def spy(block, out, *, verify=True, _original=original):
            reads.append(out.shape[0])
            return _original(block, out, verify=verify)

        shard.read_block = spy
    assert sum(b.shape[0] for b in reader) == 2400
    assert sum(reads) == 2400 and len(reads) == len(reader.shards)  # one read per shard's block


def _copy(cache_dir, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(cache_dir, target)
    return target


def _first_shard(path):
    return path / load_manifest(path).hookpoints["blocks.1"].shards[0].file


def test_a_truncated_shard_is_named(cache_dir, tmp_path):
    path = _copy(cache_dir, tmp_path)
    shard = _first_shard(path)
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CacheError, match=rf"{shard.name} is truncated"):
        CacheReader(path)


def test_a_corrupt_block_is_named_when_read(cache_dir, tmp_path):
    path = _copy(cache_dir, tmp_path)
    shard = _first_shard(path)
    data = bytearray(shard.read_bytes())
    data[-2000] ^= 0x40  # one bit of one activation
    shard.write_bytes(bytes(data))
    reader = CacheReader(path, batch_size=64)  # size and header still check out
    with pytest.raises(CacheError, match=rf"{shard.name} is corrupt: rows"):
        list(reader)
    # Unchecked reading is possible, but only when asked for.
    assert sum(b.shape[0] for b in CacheReader(path, batch_size=64, verify=False)) == 1600


def test_a_tampered_manifest_is_refused(cache_dir, tmp_path):
    path = _copy(cache_dir, tmp_path)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["hookpoints"]["blocks.1"]["shards"][0]["rows"] += 1
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match=r"manifest.json does not match its checksum"):
        CacheReader(path)
    (path / "manifest.json").write_text(json.dumps(manifest)[:-50])
    with pytest.raises(CacheError, match="not valid JSON"):
        CacheReader(path)


def test_a_foreign_or_swapped_shard_is_refused(cache_dir, tmp_path):
    path = _copy(cache_dir, tmp_path)
    other = _make_cache(tmp_path / "other", dtype="float32", seed=1)
    shards = load_manifest(path).hookpoints["blocks.1"].shards
    foreign = other / load_manifest(other).hookpoints["blocks.1"].shards[0].file
    target = path / shards[0].file
    shutil.copy(foreign, target)
    with pytest.raises(CacheError, match=rf"{target.name}"):
        CacheReader(path)
    shutil.copy(path / shards[1].file, target)  # a shard of the same cache in the wrong place
    with pytest.raises(CacheError, match=rf"{target.name}"):
        CacheReader(path)


def _train_cfg(**overrides) -> TrainConfig:
    base = dict(batch_size=64, lr_warmup_steps=5, log_every=5, progress=False, checkpoint_every=0)
    return TrainConfig(**{**base, **overrides})


class _Crash(Exception):
    pass


class _CrashingReader(CacheReader):
    crash_after = 10**9

    def __iter__(self):
        for i, batch in enumerate(super().__iter__()):
            if i == self.crash_after:
                raise _Crash
            yield batch


def test_trainer_resumes_from_the_cache_readers_position(cache_dir, tmp_path):
    cfgs = [SAEConfig(k=4, d_sae=64)]
    train = _train_cfg(checkpoint_every=4, epochs=2)
    source = lambda cls=CacheReader: cls(cache_dir, batch_size=64, epochs=2, seed=5)  # noqa: E731
    (reference,) = Trainer(cfgs, train, source(), tmp_path / "a").fit()

    crashing = source(_CrashingReader)
    crashing.crash_after = 30  # into the second epoch, between checkpoints 28 and 32
    with pytest.raises(_Crash):
        Trainer(cfgs, train, crashing, tmp_path / "b").fit()
    (resumed,) = Trainer(cfgs, train, source(), tmp_path / "b", resume=True).fit()
    for name, value in reference.sae.state_dict().items():
        torch.testing.assert_close(resumed.sae.state_dict()[name], value, rtol=0, atol=0)


def test_saekit_train_from_a_cache_records_provenance(tmp_path):
    path = _make_cache(tmp_path / "cache", hookpoints=["blocks.0", "blocks.2@update"])
    out = tmp_path / "sae"
    args = [
        "train",
        "--cache",
        str(path),
        "--d_sae",
        "64",
        "--k",
        "4",
        "--batch_size",
        "64",
        "--epochs",
        "2",
        "--lr_warmup_steps",
        "5",
        "--progress",
        "false",
        "--output_dir",
        str(out),
    ]
    assert main([*args, "--hookpoint", "blocks.2@update"]) == 0
    sae = load_dictionary(out / "blocks.2")
    assert sae.cfg.model == "tiny"
    assert sae.cfg.hookpoint == "blocks.2" and sae.cfg.capture == "update" and sae.cfg.d_in == 16

    # Several hookpoints and none chosen: a clear error naming them.
    assert main([*args[:-1], str(tmp_path / "other")]) == 2
