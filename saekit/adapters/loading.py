"""Loading a model by hub id or local path, the same way for every family.

Each family loads through its library's own ``from_pretrained`` (transformers, diffusers) or
factory (open_clip); this module holds the policy they share:

* a local directory is used as is; anything else is a Hugging Face Hub id;
* ``local_files_only`` is passed through, and turned on when offline mode is on
  (``HF_HUB_OFFLINE=1``), so no network call is even attempted;
* a model that cannot be found raises :class:`ModelNotFoundError`, whose message names what was
  looked for and where (the local path, the Hub cache directory, whether offline mode was on);
* ``trust_remote_code`` is passed as given, and is False unless the user turns it on: code from
  a model repository never runs by default.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

from .._optional import require
from ..configuration import ConfigError

T = TypeVar("T")

_TRUE = {"1", "true", "yes", "on"}


class ModelNotFoundError(FileNotFoundError):
    """A model named by hub id or path is neither a local directory nor in the Hub cache (or on
    the Hub, when online)."""


def offline_mode() -> bool:
    """Whether the Hub must not be contacted (``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE``)."""
    if any(
        os.environ.get(v, "").lower() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    ):
        return True
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers/diffusers
        return False
    return bool(constants.HF_HUB_OFFLINE)


def hub_cache_dir() -> str:
    """Where the Hub client keeps downloaded models."""
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover
        return os.path.expanduser("~/.cache/huggingface/hub")
    return str(constants.HF_HUB_CACHE)


def looks_like_path(spec: str) -> bool:
    """A name that can only be a path (a hub id never starts with ``/``, ``.`` or ``~``)."""
    return spec.startswith(("/", "./", "../", "~")) or spec in (".", "..")


def local_directory(spec: str | os.PathLike[str]) -> Path | None:
    """``spec`` as an existing local directory, or None when it is not one."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if looks_like_path(str(spec)):
        raise ModelNotFoundError(
            f"no model folder at {path.resolve()}: the path does not exist or is not a directory"
        )
    return None


def effective_local_files_only(local_files_only: bool) -> bool:
    return bool(local_files_only) or offline_mode()


def not_found_message(
    spec: str, what: str, *, revision: str | None, local_files_only: bool, cause: object = None
) -> str:
    """The message of a model that could not be found: what was looked for, and where."""
    path = Path(spec).expanduser().resolve()
    at = f" at revision {revision!r}" if revision else ""
    if offline_mode():
        hub = "offline mode is on (HF_HUB_OFFLINE), so the Hub was not asked"
    elif local_files_only:
        hub = "local_files_only is set, so the Hub was not asked"
    else:
        hub = "the Hub did not provide it either"
    detail = f" ({type(cause).__name__}: {str(cause).splitlines()[0][:300]})" if cause else ""
    return (
        f"cannot find the {what} {spec!r}{at}: there is no local folder {path}, the Hugging Face "
        f"cache ({hub_cache_dir()}) holds no copy of it, and {hub}{detail}. Download it where "
        f"there is network (`hf download {spec}`) and copy the cache or the folder here, then "
        "pass the folder's path (or the hub id with HF_HUB_CACHE pointing at the cache)"
    )


def read_model_json(
    spec: str,
    filename: str,
    *,
    revision: str | None = None,
    local_files_only: bool = False,
) -> dict[str, Any] | None:
    """The JSON file ``filename`` of a model folder or hub repository; None when the model has
    no such file. Raises :class:`ModelNotFoundError` when the model itself cannot be found."""
    directory = local_directory(spec)
    if directory is not None:
        path = directory / filename
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    hub = require("huggingface_hub", "loading models by hub id")
    from huggingface_hub import errors

    try:
        path = hub.hf_hub_download(
            spec,
            filename,
            revision=revision,
            local_files_only=effective_local_files_only(local_files_only),
        )
    except errors.RemoteEntryNotFoundError:
        return None  # the repository exists and lacks this file
    except errors.LocalEntryNotFoundError as err:
        # Offline: the file is not cached. Either the model is cached without this file (the
        # caller tries another), or the model is not cached at all (an error).
        if not _cached(spec):
            raise ModelNotFoundError(
                not_found_message(
                    spec, "model", revision=revision, local_files_only=local_files_only, cause=err
                )
            ) from err
        return None
    except (errors.RepositoryNotFoundError, errors.RevisionNotFoundError) as err:
        raise ModelNotFoundError(
            not_found_message(
                spec, "model", revision=revision, local_files_only=local_files_only, cause=err
            )
        ) from err
    except errors.HFValidationError as err:
        raise ModelNotFoundError(
            f"{spec!r} is neither a local folder ({Path(spec).expanduser().resolve()} does not "
            f"exist) nor a valid Hugging Face Hub id ({err})"
        ) from err
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _cached(repo_id: str) -> bool:
    """Whether the Hub cache holds anything of the model repository ``repo_id``."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    folder = repo_folder_name(repo_id=repo_id, repo_type="model")
    return (Path(constants.HF_HUB_CACHE) / folder).is_dir()


def from_pretrained(
    load: Callable[..., T],
    spec: str,
    *,
    what: str,
    revision: str | None = None,
    local_files_only: bool = False,
    **kwargs: Any,
) -> T:
    """``load(spec, revision=..., local_files_only=..., **kwargs)`` (a library's
    ``from_pretrained``) with offline mode honoured and a missing model reported as
    :class:`ModelNotFoundError`. Pass ``trust_remote_code`` in ``kwargs`` where the library
    takes it; it is never turned on here."""
    local = local_directory(spec) is not None
    try:
        return load(
            spec,
            revision=revision,
            local_files_only=effective_local_files_only(local_files_only),
            **kwargs,
        )
    except ValueError as err:
        if "trust_remote_code" not in str(err) or kwargs.get("trust_remote_code"):
            raise
        raise ConfigError(
            f"{spec} holds Python code of its own that loading the {what} would run; saekit runs "
            "it only when you allow it (--trust_remote_code, or trust_remote_code=True), after "
            "you have read that code"
        ) from err
    except OSError as err:
        if local:
            raise  # the folder exists: the library's own message (a missing file) says more
        raise ModelNotFoundError(
            not_found_message(
                spec, what, revision=revision, local_files_only=local_files_only, cause=err
            )
        ) from err


def torch_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """``"bfloat16"`` / ``torch.bfloat16`` / None -> a torch dtype or None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16")
    return value
