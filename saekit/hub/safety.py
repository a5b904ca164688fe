"""Reading untrusted dictionary files.

Everything that comes from another library or from the Hub passes through here: names must stay
inside their folder, a file may not be far larger than its config implies, configs are small JSON
objects, and pickles (``torch.save`` files) are opened only when the caller opts in for that call,
and then only with ``torch.load(weights_only=True)``, which refuses to build arbitrary objects.
"""

from __future__ import annotations

import json
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from .errors import FormatError, UnsafeInputError

MAX_CONFIG_BYTES = 2**20
"""A dictionary config is a few hundred bytes; anything over a MiB is not one."""

MAX_ITEMSIZE = 8
SIZE_SLACK_BYTES = 10 * 2**20
"""A weights file may hold its config's values at up to 8 bytes each plus 10 MiB (headers, small
buffers): the same allowance as saekit's own loader."""

_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:")


def check_name(name: str, what: str) -> str:
    """``name`` if it is a relative POSIX path that stays inside its folder; else refuse it.

    Hookpoints, repo sub-folders and file names all pass through here before they are joined to a
    directory or sent to the Hub, so ``../../.ssh`` or ``/etc/passwd`` never become a path.
    """
    problem = None
    if not isinstance(name, str) or not name:
        problem = "it is empty"
    elif "\x00" in name or "\\" in name:
        problem = "it holds a NUL or a backslash"
    elif name.startswith("/") or _WINDOWS_DRIVE.match(name):
        problem = "it is an absolute path"
    elif any(part in ("", ".", "..") for part in name.split("/")):
        problem = "it has an empty, '.' or '..' component"
    if problem:
        raise UnsafeInputError(
            f"refusing {what} {name!r}: {problem}, so it could leave the dictionary's folder. "
            "Use a relative path inside the repository, such as 'blocks.8.hook_resid_post'."
        )
    return name


def join_inside(root: Path, name: str, what: str) -> Path:
    """``root / name`` after :func:`check_name` has accepted ``name``."""
    return root.joinpath(*check_name(name, what).split("/"))


def byte_limit(numel: int) -> int:
    """The largest file that may hold ``numel`` values."""
    return numel * MAX_ITEMSIZE + SIZE_SLACK_BYTES


def check_size(size: int | None, numel: int, what: str) -> None:
    """Refuse a file of ``size`` bytes that should hold only ``numel`` values."""
    if size is not None and size > byte_limit(numel):
        raise UnsafeInputError(
            f"{what} is {size} bytes, far more than its config implies (at most {byte_limit(numel)} "
            f"bytes for {numel} values); refusing to load it. The config and the weights do not "
            "belong together: check that both come from the same dictionary."
        )


def check_config_size(size: int | None, what: str) -> None:
    if size is not None and size > MAX_CONFIG_BYTES:
        raise UnsafeInputError(
            f"{what} is {size} bytes; a dictionary config is a small JSON object (at most "
            f"{MAX_CONFIG_BYTES} bytes). Refusing to read it."
        )


def read_config(file: Path) -> dict[str, Any]:
    """A dictionary config: a JSON object of at most :data:`MAX_CONFIG_BYTES`."""
    check_config_size(file.stat().st_size, str(file))
    try:
        config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise FormatError(
            f"{file} is not valid JSON ({err}); it may be truncated or corrupt: fetch it again"
        ) from err
    if not isinstance(config, dict):
        raise FormatError(f"{file} must hold a JSON object, not {type(config).__name__}")
    return config


def load_pickled(file: Path, *, numel: int, allow_pickle: bool, source: str) -> Any:
    """The plain tensors and containers of a ``torch.save`` file, after the caller opted in.

    ``numel`` is what the config implies the file holds; the size is checked before anything is
    read. ``source`` names where the file comes from, for the message that asks for the opt-in.
    """
    if not allow_pickle:
        raise UnsafeInputError(
            f"{file.name} ({source}) is a pickle (a torch.save file). Unpickling can run code, so "
            "saekit reads pickles only when you opt in for this call: pass allow_pickle=True (CLI: "
            "--allow_pickle) if you trust the source. It is then read with "
            "torch.load(weights_only=True), which builds only tensors and plain containers."
        )
    check_size(file.stat().st_size, numel, str(file))
    try:
        # map_location: checkpoints saved on a GPU name a CUDA device this machine may not have.
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnsafeInputError(
            f"{file} holds Python objects other than tensors and plain containers, which "
            f"torch.load(weights_only=True) refuses to build ({str(err).splitlines()[0]}). saekit "
            "does not load such files; re-save the state dict as plain tensors."
        ) from err
    except (RuntimeError, EOFError, zipfile.BadZipFile) as err:
        raise FormatError(
            f"{file} is not a readable torch.save file ({err}); it may be truncated or corrupt: "
            "fetch it again"
        ) from err


def check_tensor(
    tensor: Any, name: str, shape: tuple[int, ...], where: str, *, floating: bool = True
) -> torch.Tensor:
    """``tensor`` if it is a tensor of exactly ``shape`` (and a float dtype, with finite values)."""
    if not isinstance(tensor, torch.Tensor):
        raise FormatError(f"{where}: {name} should be a tensor, found {type(tensor).__name__}")
    if tuple(tensor.shape) != shape:
        raise FormatError(
            f"{where}: tensor {name} has shape {tuple(tensor.shape)}, but the config implies {shape}"
        )
    if floating:
        if not tensor.is_floating_point():
            raise FormatError(f"{where}: tensor {name} has dtype {tensor.dtype}, expected a float")
        if not torch.isfinite(tensor).all():
            raise FormatError(f"{where}: tensor {name} holds NaN or infinite values")
    return tensor
