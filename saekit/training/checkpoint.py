"""Training checkpoints without pickle: tensors in safetensors, everything else in JSON.

A checkpoint is a folder ``checkpoints/step_00001234/`` holding ``state.json`` (the run's
position and bookkeeping) and one ``<dictionary>.safetensors`` per dictionary (weights, Adam
moments, dead-latent counters). It is assembled under a temporary name and renamed into place
once every file is on disk, so a run killed at any moment (on any rank) leaves only complete
checkpoints behind. In distributed runs every rank writes the files of its own dictionaries into
the temporary folder and rank 0 renames it after a barrier.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .._io import fsync_dir

STATE_FILE = "state.json"
_NAME = re.compile(r"^step_(\d{8,})$")


def flatten_optimizer_state(
    state: dict[str, Any], prefix: str
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into named tensors and a JSON-safe remainder."""
    tensors: dict[str, torch.Tensor] = {}
    per_param: dict[str, dict[str, Any]] = {}
    for index, entries in state["state"].items():
        plain: dict[str, Any] = {}
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}.state.{index}.{key}"] = value
            else:
                plain[key] = value
        per_param[str(index)] = plain
    return tensors, {"param_groups": state["param_groups"], "plain_state": per_param}


def unflatten_optimizer_state(
    tensors: dict[str, torch.Tensor], meta: dict[str, Any], prefix: str
) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {int(i): dict(v) for i, v in meta["plain_state"].items()}
    head = f"{prefix}.state."
    for name, value in tensors.items():
        if name.startswith(head):
            index, key = name[len(head) :].split(".", 1)
            state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def staging_dir(root: Path, step: int) -> Path:
    """The temporary folder that checkpoint ``step`` is assembled in (same name on every rank)."""
    return root / f".tmp-step_{step:08d}"


def prepare_staging(root: Path, step: int) -> Path:
    """Create an empty staging folder for ``step`` (rank 0, before the others write into it)."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = staging_dir(root, step)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def write_tensors(folder: Path, name: str, tensors: dict[str, torch.Tensor]) -> None:
    path = folder / f"{name}.safetensors"
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def commit(root: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write ``state.json`` into the staging folder, rename it into place and prune old ones."""
    tmp = staging_dir(root, step)
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
    with open(tmp / STATE_FILE, "rb") as handle:
        os.fsync(handle.fileno())
    fsync_dir(tmp)
    final = root / f"step_{step:08d}"
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(root)
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-step_*"):
        with contextlib.suppress(OSError):
            shutil.rmtree(stale)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name)]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))  # type: ignore[union-attr]


def read_state(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise RuntimeError(
            f"checkpoint {path} is unreadable ({err}); delete it to resume from an older one"
        ) from err


def read_tensors(path: Path, name: str) -> dict[str, torch.Tensor]:
    file = path / f"{name}.safetensors"
    try:
        return load_file(str(file))
    except (OSError, SafetensorError) as err:
        raise RuntimeError(
            f"checkpoint file {file} is unreadable ({err}); delete {path} to resume from an older checkpoint"
        ) from err
