"""The `saekit` command line: YAML + flags, clean errors, real kill-and-resume, wandb offline."""

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
import torch

from saekit.cli import main
from saekit.dictionaries import load_dictionary
from saekit.synthetic import make_sparse_dataset, mean_max_cosine

REPO = Path(__file__).resolve().parents[1]


def _saekit(*args: str, env: dict | None = None, **kwargs) -> subprocess.Popen:
    full_env = {**os.environ, "WANDB_MODE": "disabled", **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "saekit", *args],
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


@pytest.fixture
def npy(tmp_path, sparse_data) -> Path:
    path = tmp_path / "acts.npy"
    np.save(path, sparse_data.activations.numpy())
    return path


def test_train_from_yaml_with_flag_overrides_recovers_features(tmp_path, npy, sparse_data, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(
        "sae: {architecture: topk, k: 8, d_sae: 96}\n"
        "train: {batch_size: 256, epochs: 10, lr_warmup_steps: 5, progress: false}\n"
        f"output_dir: {tmp_path / 'from-yaml'}\n"
    )
    code = main(
        [
            "train",
            "--config",
            str(config),
            "--activations",
            str(npy),
            "--k",
            "3",
            "--output_dir",
            str(tmp_path / "out"),
        ]
    )
    assert code == 0
    sae = load_dictionary(tmp_path / "out" / "sae")
    assert sae.cfg.k == 3 and sae.cfg.d_sae == 96  # flag overrode the file; the rest came from it
    assert not (tmp_path / "from-yaml").exists()
    assert mean_max_cosine(sae.W_dec.detach(), sparse_data.features) > 0.9
    saved = json.loads((tmp_path / "out" / "run.json").read_text())["config"]
    assert saved["sae"]["k"] == 3 and saved["train"]["batch_size"] == 256
    assert "explained variance" in capsys.readouterr().out


def test_sweep_trains_every_combination(tmp_path, npy):
    code = main(
        [
            "train",
            "--activations",
            str(npy),
            "--d_sae",
            "48",
            "--batch_size",
            "512",
            "--progress",
            "false",
            "--sweep",
            "{k: [2, 4], seed: [0, 1]}",
            "--output_dir",
            str(tmp_path / "sweep"),
        ]
    )
    assert code == 0
    index = json.loads((tmp_path / "sweep" / "index.json").read_text())
    assert sorted(e["path"] for e in index["dictionaries"]) == [
        "sae.topk-k2-x2-s0",
        "sae.topk-k2-x2-s1",
        "sae.topk-k4-x2-s0",
        "sae.topk-k4-x2-s1",
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--k", "0"], "k must be at least 1"),
        (["--architecture", "gated"], "invalid choice: 'gated'"),
        (["--batch_size", "many"], "invalid int value"),
        (["--d_in", "7"], "d_in=7 but the activations have width 24"),
        (["--k", "100", "--d_sae", "48"], "k=100 is larger than d_sae=48"),
    ],
)
def test_bad_settings_give_one_clear_line(tmp_path, npy, capsys, args, message):
    with pytest.raises(SystemExit) if "invalid" in message else _no_exit():
        code = main(
            ["train", "--activations", str(npy), "--output_dir", str(tmp_path / "o"), *args]
        )
        assert code == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


class _no_exit:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_unknown_yaml_field_names_the_file(tmp_path, npy, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("sae: {kk: 3}\n")
    assert main(["train", "--config", str(config), "--activations", str(npy)]) == 2
    err = capsys.readouterr().err
    assert "unknown field(s) kk" in err and str(config) in err


def test_missing_data_is_reported(tmp_path, capsys):
    assert main(["train", "--output_dir", str(tmp_path / "o")]) == 2
    assert "--activations FILE or --cache DIR" in capsys.readouterr().err
    assert (
        main(
            [
                "train",
                "--activations",
                str(tmp_path / "nope.npy"),
                "--output_dir",
                str(tmp_path / "o2"),
            ]
        )
        == 2
    )
    assert "activation file not found" in capsys.readouterr().err


def test_an_empty_npy_file_is_one_line(tmp_path, capsys):
    empty = tmp_path / "acts.npy"
    empty.touch()
    assert main(["train", "--activations", str(empty), "--output_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{empty} is empty (0 bytes)" in err[0]


def test_nan_policy_stop_is_one_line_from_the_cli(tmp_path, sparse_data, capsys):
    data = sparse_data.activations[:2000].numpy().copy()
    data[700, 3] = np.nan
    path = tmp_path / "acts.npy"
    np.save(path, data)
    args = ["train", "--activations", str(path), "--d_sae", "48", "--k", "3"]
    args += ["--batch_size", "256", "--nan_policy", "stop", "--progress", "false"]
    assert main([*args, "--output_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0]
    assert "NaN or infinite activations" in err[0] and "nan_policy=stop" in err[0]


def test_help_shows_field_docs():
    out = subprocess.run(
        [sys.executable, "-m", "saekit", "train", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "Active latents per token" in out and "--config" in out and "--resume" in out


def test_process_killed_with_sigkill_resumes_to_the_same_dictionary(tmp_path):
    data = make_sparse_dataset(24_000, 64, 512, 4, seed=1)
    npy = tmp_path / "acts.npy"
    np.save(npy, data.activations.numpy())
    common = [
        "train",
        "--activations",
        str(npy),
        "--d_sae",
        "512",
        "--k",
        "4",
        "--batch_size",
        "128",
        "--epochs",
        "3",
        "--checkpoint_every",
        "40",
        "--progress",
        "false",
        "--log_every",
        "20",
    ]

    reference = _saekit(*common, "--output_dir", str(tmp_path / "ref"))
    victim = _saekit(*common, "--output_dir", str(tmp_path / "killed"))
    checkpoints = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and victim.poll() is None:
        if checkpoints.exists() and any(p.name.startswith("step_") for p in checkpoints.iterdir()):
            break
        time.sleep(0.01)
    assert victim.poll() is None, "the run ended before it could be killed; make it longer"
    time.sleep(0.3)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (tmp_path / "killed" / "sae").exists(), "killed before the end"
    assert reference.wait() == 0, reference.stderr.read()

    resumed = _saekit(*common, "--output_dir", str(tmp_path / "killed"), "--resume")
    assert resumed.wait() == 0, resumed.stderr.read()
    a = load_dictionary(tmp_path / "ref" / "sae")
    b = load_dictionary(tmp_path / "killed" / "sae")
    for name, value in a.state_dict().items():
        assert torch.equal(b.state_dict()[name], value), name


def test_wandb_offline_mode(tmp_path, npy):
    pytest.importorskip("wandb")
    proc = _saekit(
        "train",
        "--activations",
        str(npy),
        "--d_sae",
        "48",
        "--k",
        "3",
        "--batch_size",
        "1024",
        "--progress",
        "false",
        "--output_dir",
        str(tmp_path / "run"),
        "--wandb_project",
        "saekit-test",
        env={"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"},
    )
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    assert list(tmp_path.glob("wandb/offline-run-*"))
    assert (tmp_path / "run" / "metrics.jsonl").read_text().strip()
