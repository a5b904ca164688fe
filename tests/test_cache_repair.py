"""A damaged cache (a truncated, missing or corrupt shard): `saekit cache info` says so without
--verify, and rerunning `saekit cache` rewrites exactly the damaged shards, byte-identical to a
clean run, leaving every intact shard untouched."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_cache_support import token_inputs

from saekit.cache import load_manifest
from saekit.cli import main

TESTS = Path(__file__).resolve().parent


@pytest.fixture
def cache_command(tmp_path, monkeypatch):
    """The arguments of one `saekit cache` run into a given folder (a tiny model, 2 hookpoints)."""
    monkeypatch.syspath_prepend(str(TESTS))
    tokens = tmp_path / "tokens.npy"
    np.save(tokens, token_inputs(240).numpy())

    def command(out: Path) -> list[str]:
        return [
            "cache",
            "--model",
            "test_cache_support:tiny_transformer",
            "--hookpoints",
            "blocks.0",
            "blocks.1",
            "--tensors",
            str(tokens),
            "--rows_per_shard",
            "256",
            "--shuffle_buffer_rows",
            "1024",
            "--dtype",
            "float32",
            "--progress",
            "false",
            "--output_dir",
            str(out),
        ]

    return command


def _shard_files(path: Path) -> list[str]:
    manifest = load_manifest(path)
    return sorted(s.file for h in manifest.hookpoints.values() for s in h.shards)


def test_a_rerun_rewrites_exactly_the_damaged_shards(tmp_path, cache_command, capsys):
    clean, damaged = tmp_path / "clean", tmp_path / "damaged"
    assert main(cache_command(clean)) == 0
    assert main(cache_command(damaged)) == 0
    files = _shard_files(clean)
    assert len(files) >= 6 and files == _shard_files(damaged)

    truncated, missing, corrupt = (damaged / files[i] for i in (0, 3, -1))
    truncated.write_bytes(truncated.read_bytes()[:-100])
    missing.unlink()
    data = bytearray(corrupt.read_bytes())
    data[-50] ^= 1  # same size, same header: only its block checksum tells
    corrupt.write_bytes(bytes(data))
    capsys.readouterr()

    # `cache info` checks sizes without --verify: damaged, not complete; the flipped bit needs it
    assert main(["cache", "info", str(damaged)]) == 2
    out, err = capsys.readouterr()
    assert "DAMAGED: 2 shard(s)" in out and "complete" not in out.split("\n")[0]
    assert f"{truncated} is truncated" in err and f"{missing} is listed" in err
    assert main(["cache", "info", str(damaged), "--verify"]) == 2
    assert f"{corrupt.name} is corrupt" in capsys.readouterr().err

    intact = {
        f: (damaged / f).stat().st_ino
        for f in files
        if damaged / f not in (truncated, missing, corrupt)
    }
    assert main(cache_command(damaged)) == 0
    assert "rewrote 3 damaged shard(s)" in capsys.readouterr().out
    assert _shard_files(damaged) == files
    assert load_manifest(damaged).hookpoints == load_manifest(clean).hookpoints
    assert load_manifest(damaged).groups == load_manifest(clean).groups
    for f in files:
        assert (damaged / f).read_bytes() == (clean / f).read_bytes(), f
    assert {f: (damaged / f).stat().st_ino for f in intact} == intact  # not rewritten
    assert main(["cache", "info", str(damaged), "--verify"]) == 0
    assert capsys.readouterr().out.splitlines()[0].endswith(": complete")

    # and an intact cache is still left alone
    assert main(cache_command(damaged)) == 0
    assert "rewrote" not in capsys.readouterr().out


def test_a_train_that_failed_on_a_damaged_shard_starts_again_after_the_repair(
    tmp_path, cache_command, capsys
):
    cache = tmp_path / "cache"
    assert main(cache_command(cache)) == 0
    shard = cache / _shard_files(cache)[0]
    data = bytearray(shard.read_bytes())
    data[8 + int.from_bytes(data[:8], "little") + 100] ^= 1  # in the activations, which train reads
    shard.write_bytes(bytes(data))
    train = [
        "train",
        "--cache",
        str(cache),
        "--hookpoint",
        "blocks.0",
        "--d_sae",
        "32",
        "--k",
        "4",
        "--batch_size",
        "128",
        "--progress",
        "false",
        "--output_dir",
        str(tmp_path / "run"),
    ]
    assert main(train) == 2
    assert "is corrupt" in capsys.readouterr().err
    assert (tmp_path / "run" / "run.json").exists()  # the failed run left its record, no checkpoint

    assert main(cache_command(cache)) == 0  # repairs the shard
    assert main(train) == 0, capsys.readouterr().err  # the same command starts it over
    assert (tmp_path / "run" / "index.json").exists()
    assert main(train) == 2  # a finished run is still protected
    assert "already holds a training run" in capsys.readouterr().err
