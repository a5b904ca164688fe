"""Training with torch.distributed on CPU (gloo, 2 processes): data parallel, dictionaries
spread over ranks, latent split, a killed rank, and resuming with another world size."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from saekit.cli import main
from saekit.dictionaries import SAEConfig, StepContext, build_dictionary, load_dictionary
from saekit.synthetic import make_sparse_dataset

COMMON = [
    "--d_sae",
    "64",
    "--k",
    "4",
    "--batch_size",
    "256",
    "--lr_warmup_steps",
    "5",
    "--progress",
    "false",
    "--log_every",
    "5",
    "--dist_timeout_s",
    "60",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(nproc: int, *args: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        f"--master_port={_free_port()}",
        "-m",
        "saekit",
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def npy(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "acts.npy"
    np.save(path, make_sparse_dataset(4096, 16, 64, 3, seed=3).activations.numpy())
    return path


def _assert_same(a_dir: Path, b_dir: Path, atol: float) -> None:
    a, b = load_dictionary(a_dir), load_dictionary(b_dir)
    assert a.cfg == b.cfg
    for name, value in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[name], value, atol=atol, rtol=1e-4, msg=name)


def test_data_parallel_equals_single_process(tmp_path, npy):
    torch.set_num_threads(1)
    assert (
        main(
            ["train", "--activations", str(npy), *COMMON, "--output_dir", str(tmp_path / "single")]
        )
        == 0
    )
    run = _torchrun(
        2, "train", "--activations", str(npy), *COMMON, "--output_dir", str(tmp_path / "ddp")
    )
    assert run.returncode == 0, run.stderr[-3000:]
    _assert_same(tmp_path / "single" / "sae", tmp_path / "ddp" / "sae", atol=1e-4)


def test_dictionaries_spread_over_ranks(tmp_path, npy):
    sweep = ["--sweep", "{k: [2, 4]}", "--parallel", "dictionaries"]
    run = _torchrun(
        2,
        "train",
        "--activations",
        str(npy),
        *COMMON,
        *sweep,
        "--output_dir",
        str(tmp_path / "spread"),
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert (
        main(
            [
                "train",
                "--activations",
                str(npy),
                *COMMON,
                "--sweep",
                "{k: [2, 4]}",
                "--output_dir",
                str(tmp_path / "one"),
            ]
        )
        == 0
    )
    for name in ("sae.topk-k2-x4-s0", "sae.topk-k4-x4-s0"):
        _assert_same(tmp_path / "one" / name, tmp_path / "spread" / name, atol=1e-6)
    index = (tmp_path / "spread" / "index.json").read_text()
    assert "sae.topk-k2-x4-s0" in index and "sae.topk-k4-x4-s0" in index


# ----------------------------------------------------------------------------- latent split


def _latent_worker(rank: int, world: int, port: int, arch: str, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world)
    )
    torch.set_num_threads(1)
    from saekit.training.distributed import from_environment
    from saekit.training.latent_parallel import LatentShard

    group = from_environment("cpu", 60)
    cfg = SAEConfig(architecture=arch, k=5, d_sae=48, init_threshold=0.3).resolved(12)
    shard = LatentShard(cfg, group).double()
    x = torch.randn(40, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    dead = (
        torch.arange(shard.start, shard.stop)[::3] - shard.start
    )  # some dead latents on every rank
    ctx = StepContext(
        dead_latents=dead, k_aux=4, auxk_alpha=0.5, sparsity_coefficient=0.1, jumprelu_bandwidth=0.2
    )
    result = shard.training_forward(x, ctx)
    result.loss.backward()
    grads = {n: p.grad for n, p in shard.local.named_parameters()}
    torch.save(
        {
            "loss": result.loss.detach(),
            "recon": result.recon.detach(),
            "grads": grads,
            "start": shard.start,
            "stop": shard.stop,
        },
        f"{out}/rank{rank}.pt",
    )
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("arch", ["topk", "jumprelu", "relu"])
def test_latent_split_matches_unsplit_forward_and_gradients(tmp_path, arch):
    mp.spawn(_latent_worker, args=(2, _free_port(), arch, str(tmp_path)), nprocs=2, join=True)
    cfg = SAEConfig(architecture=arch, k=5, d_sae=48, init_threshold=0.3).resolved(12)
    full = build_dictionary(cfg).double()
    x = torch.randn(40, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    dead = torch.arange(48)[::3]
    dead = torch.cat([torch.arange(0, 24)[::3], torch.arange(24, 48)[::3]])
    ctx = StepContext(
        dead_latents=dead, k_aux=4, auxk_alpha=0.5, sparsity_coefficient=0.1, jumprelu_bandwidth=0.2
    )
    reference = full.training_forward(x, ctx)
    reference.loss.backward()
    for rank in range(2):
        part = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(part["loss"], reference.loss.detach())
        torch.testing.assert_close(part["recon"], reference.recon.detach())
        rows = slice(part["start"], part["stop"])
        for name, grad in part["grads"].items():
            expected = getattr(full, name).grad
            expected = expected if name == "b_dec" else expected[rows]
            torch.testing.assert_close(grad, expected, msg=f"{arch} rank {rank} grad {name}")


def test_latent_split_run_resumes_in_one_process(tmp_path, npy):
    """A latent-split checkpoint holds whole tensors: one process continues it."""
    args = [
        "train",
        "--activations",
        str(npy),
        *COMMON,
        "--parallel",
        "latents",
        "--epochs",
        "2",
        "--lr_decay",
        "none",
        "--checkpoint_every",
        "8",
        "--output_dir",
        str(tmp_path / "split"),
    ]
    run = _torchrun(2, *args, "--max_steps", "8")
    assert run.returncode == 0, run.stderr[-3000:]
    assert main([*args, "--resume"]) == 0
    assert (
        main(
            [
                "train",
                "--activations",
                str(npy),
                *COMMON,
                "--parallel",
                "latents",
                "--epochs",
                "2",
                "--lr_decay",
                "none",
                "--checkpoint_every",
                "8",
                "--output_dir",
                str(tmp_path / "single"),
            ]
        )
        == 0
    )
    _assert_same(tmp_path / "single" / "sae", tmp_path / "split" / "sae", atol=1e-4)


# ----------------------------------------------------------------------------- failures


def test_killed_rank_stops_the_run_and_the_checkpoint_resumes(tmp_path, npy):
    port = _free_port()
    out = tmp_path / "run"
    args = [
        sys.executable,
        "-m",
        "saekit",
        "train",
        "--activations",
        str(npy),
        "--d_sae",
        "256",
        "--k",
        "4",
        "--batch_size",
        "64",
        "--epochs",
        "200",
        "--checkpoint_every",
        "20",
        "--progress",
        "false",
        "--dist_timeout_s",
        "30",
        "--output_dir",
        str(out),
    ]
    procs = []
    for rank in range(2):
        env = {
            **os.environ,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "OMP_NUM_THREADS": "1",
            "WANDB_MODE": "disabled",
        }
        procs.append(
            subprocess.Popen(
                args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    deadline = time.time() + 120
    while time.time() < deadline and not list((out / "checkpoints").glob("step_*")):
        assert all(p.poll() is None for p in procs), procs[0].stderr.read()[-2000:]
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGKILL)
    code = procs[0].wait(timeout=120)
    err = procs[0].stderr.read()
    assert code == 2, err[-3000:]
    assert "lost contact with another rank" in err and "--resume" in err
    assert "Traceback" not in err
    # The last complete checkpoint is intact: a single process resumes from it (any world size
    # that divides the batch).
    assert (
        main(
            [
                "train",
                "--activations",
                str(npy),
                "--d_sae",
                "256",
                "--k",
                "4",
                "--batch_size",
                "64",
                "--epochs",
                "200",
                "--checkpoint_every",
                "20",
                "--progress",
                "false",
                "--dist_timeout_s",
                "30",
                "--output_dir",
                str(out),
                "--resume",
                "--max_steps",
                "45",
            ]
        )
        == 0
    )
    assert load_dictionary(out / "sae").cfg.d_sae == 256


def test_world_size_that_does_not_divide_the_batch_is_refused(tmp_path, npy):
    run = _torchrun(
        2,
        "train",
        "--activations",
        str(npy),
        *COMMON,
        "--batch_size",
        "255",
        "--output_dir",
        str(tmp_path / "x"),
    )
    assert run.returncode != 0
    assert "cannot be split evenly over 2 data-parallel ranks" in run.stderr


# ----------------------------------------------------------------------------- leaving


_EXIT = """
import atexit, sys
from saekit import _dist
class Finalized:
    def __del__(self):
        print("finalized", flush=True)
kept = Finalized()
atexit.register(lambda: print("atexit", flush=True))
if sys.argv[1] == "joined":
    _dist.joined()
print("unflushed", end="")
_dist.exit_process(3)
"""


@pytest.mark.parametrize("joined", [False, True])
def test_a_rank_that_joined_a_group_exits_without_interpreter_finalization(joined):
    """gloo's worker threads may still drop a finished collective (and take the GIL) when the
    main thread finalizes the interpreter, which aborts the rank (SIGABRT, 'terminate called
    without an active exception'): a process that joined a group runs its atexit handlers,
    flushes, and skips finalization; any other exits normally."""
    run = subprocess.run(
        [sys.executable, "-c", _EXIT, "joined" if joined else "alone"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 3, run.stderr
    assert "unflushed" in run.stdout and "atexit" in run.stdout
    assert ("finalized" in run.stdout) is not joined


def test_the_saekit_executables_leave_through_exit_process():
    import tomllib

    from saekit import cli

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert project["project"]["scripts"]["saekit"] == "saekit.cli:run"
    main = (Path(cli.__file__).parent / "__main__.py").read_text()
    assert "run()" in main and "sys.exit(main())" not in main
