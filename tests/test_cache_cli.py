"""``saekit cache``: a YAML config with flag overrides, a progress bar with rows/s and MB/s, a
SIGKILLed run resumed by the same command, ``info`` (and ``--verify``), ``merge``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_cache_support import SEQ, tiny_transformer, token_inputs

from saekit.adapters import CustomAdapter
from saekit.cache import CacheConfig, InputConfig, TensorInputs, cache_activations, load_manifest
from saekit.cli import main

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


def _saekit(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.Popen(
        [sys.executable, "-m", "saekit", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture
def tokens(tmp_path) -> Path:
    path = tmp_path / "tokens.npy"
    np.save(path, token_inputs(240).numpy())
    return path


def _shards(path: Path) -> list[tuple[str, str]]:
    manifest = load_manifest(path)
    return sorted((s.file, s.header_xxh3) for h in manifest.hookpoints.values() for s in h.shards)


def test_cache_from_the_example_config_with_overrides(tmp_path, tokens, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(TESTS))
    out = tmp_path / "cache"
    code = main(
        [
            "cache",
            "--config",
            str(REPO / "configs" / "cache-custom.yaml"),
            "--model",
            "test_cache_support:tiny_transformer",
            "--hookpoints",
            "blocks.1",
            "blocks.2.mlp@update",
            "--tensors",
            str(tokens),
            "--rows_per_shard",
            "256",
            "--shuffle_buffer_rows",
            "1024",
            "--output_dir",
            str(out),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().err
    assert "to write" in printed and "free under" in printed  # the disk estimate
    manifest = load_manifest(out)
    assert manifest.model == "test_cache_support:tiny_transformer" and manifest.dtype == "bfloat16"
    assert {n: h.rows for n, h in manifest.hookpoints.items()} == {
        "blocks.1": 240 * SEQ,
        "blocks.2.mlp@update": 240 * SEQ,
    }
    assert manifest.hookpoints["blocks.2.mlp@update"].capture == "update"

    assert main(["cache", "info", str(out)]) == 0
    info = capsys.readouterr().out
    assert "complete" in info and "blocks.2.mlp@update: update of blocks.2.mlp, d=16" in info
    assert main(["cache", "info", str(out), "--json", "--verify"]) == 0
    described = json.loads(capsys.readouterr().out)
    assert described["verified"] and described["hookpoints"]["blocks.1"]["rows"] == 240 * SEQ

    # A flipped bit is found by --verify and named, with exit status 2 and no traceback.
    shard = out / manifest.hookpoints["blocks.1"].shards[0].file
    data = bytearray(shard.read_bytes())
    data[-3000] ^= 1
    shard.write_bytes(bytes(data))
    assert main(["cache", "info", str(out), "--verify"]) == 2
    assert f"{shard.name} is corrupt" in capsys.readouterr().err


def _config(tmp_path: Path, tokens: Path, out: Path) -> Path:
    config = tmp_path / "cache.yaml"
    config.write_text(
        "model: test_cache_support:slow_tiny_transformer\n"
        "hookpoints: [blocks.0, blocks.2]\n"
        f"data: {{tensors: {tokens}}}\n"
        "batch_size: 4\nrows_per_shard: 64\nshuffle_buffer_rows: 128\ndtype: float32\n"
        f"output_dir: {out}\n"
    )
    return config


def test_a_sigkilled_run_resumes_to_the_same_cache(tmp_path, tokens):
    # The uninterrupted reference, in process, with the same config (so the same rows).
    reference = tmp_path / "reference"
    model_spec = "test_cache_support:slow_tiny_transformer"
    cache_activations(
        CustomAdapter(tiny_transformer(), name=model_spec),
        TensorInputs.from_file(tokens),
        CacheConfig(
            model=model_spec,
            hookpoints=["blocks.0", "blocks.2"],
            batch_size=4,
            rows_per_shard=64,
            shuffle_buffer_rows=128,
            dtype="float32",
            output_dir=str(reference),
            progress=False,
            data=InputConfig(tensors=str(tokens)),
        ),
    )

    out = tmp_path / "cache"
    config = _config(tmp_path, tokens, out)
    run = _saekit("cache", "--config", str(config))
    deadline = time.time() + 60
    while time.time() < deadline:  # wait until a few groups are on disk, then kill it
        if (out / "manifest.json").exists() and len(load_manifest(out).groups) >= 3:
            break
        time.sleep(0.05)
    run.send_signal(signal.SIGKILL)
    run.wait()
    killed = load_manifest(out)
    assert len(killed.groups) >= 3 and not killed.complete

    again = _saekit("cache", "--config", str(config))
    _, stderr = again.communicate(timeout=120)
    assert again.returncode == 0, stderr
    assert "rows/s" in stderr and "MB/s" in stderr  # the progress bar
    assert load_manifest(out).complete
    assert _shards(out) == _shards(reference)
    for file, _ in _shards(reference):
        assert (out / file).read_bytes() == (reference / file).read_bytes()


def test_merge_rank_directories_written_without_a_process_group(tmp_path, capsys):
    root = tmp_path / "sharded"
    cfg = CacheConfig(
        output_dir=str(root),
        hookpoints=["blocks.1"],
        batch_size=8,
        rows_per_shard=64,
        shuffle_buffer_rows=128,
        progress=False,
    )
    adapter = CustomAdapter(tiny_transformer())
    first = cache_activations(adapter, token_inputs(30), cfg, rank=1, world_size=2)
    assert first.merged is None  # rank 0 has not run yet
    assert main(["cache", "merge", str(root)]) == 2
    assert "missing [0]" in capsys.readouterr().err
    second = cache_activations(adapter, token_inputs(30), cfg, rank=0, world_size=2)
    assert second.merged == root  # the last rank to finish merged
    (root / "manifest.json").unlink()
    assert main(["cache", "merge", str(root)]) == 0
    assert "merged 2 ranks" in capsys.readouterr().out
    assert main(["cache", "info", str(root)]) == 0
    assert f"blocks.1: output of blocks.1, d=16, {30 * SEQ:,} rows" in capsys.readouterr().out
