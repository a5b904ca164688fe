"""``saekit.load``: a pretrained dictionary from a local folder, a Hub repository or a known release.

The source is tried as a local folder first, then as a release of the registry, then as a Hub
repository id (``owner/name``), the order diffusers' ``from_pretrained`` uses for paths and ids;
:mod:`.resolve` decides when a missing path may be a repository id.
Whatever the format (saekit, SAELens, sparsify, sdxl-unbox, Prisma), the result is one of saekit's
own dictionaries whose encode and decode reproduce the original's, with a config that names the
model and hookpoint it belongs to when the source says so.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch

from ..dictionaries import SAEConfig, SparseAutoencoder
from ..dictionaries.io import dictionary_from_tensors
from .errors import FormatError, NotAvailableError
from .folders import Folder, LocalFolder, read_folder
from .formats import Converted
from .registry import Release, ReleaseDictionary, find_release
from .resolve import hub_repo_id
from .safety import check_name

log = logging.getLogger("saekit.hub")


@dataclass(frozen=True)
class Origin:
    """Where a pretrained dictionary came from (saved with it as provenance)."""

    source: str
    """What was asked for: a folder, a repository id or a release name."""
    format: str
    library: str
    repo_id: str | None = None
    revision: str | None = None
    """The commit the files came from, when they came from the Hub."""
    path: str | None = None
    """The folder inside the repository (or the local folder)."""
    release: str | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    def record(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v not in (None, ())}


class Pretrained(NamedTuple):
    """A loaded pretrained dictionary with its provenance."""

    sae: SparseAutoencoder
    origin: Origin
    latent_stats: dict[str, torch.Tensor]
    """Per-latent statistics that came with the dictionary (sdxl-unbox's mean and std), each (d_sae,)."""
    records: dict[str, Any]
    """saekit's ``training`` and ``metrics`` records, when the source is a saekit dictionary."""


def _hub_folder(
    repo_id: str, prefix: str, revision: str | None, cache_dir: str | Path | None
) -> Folder:
    from .remote import HubFolder  # huggingface_hub is needed only for Hub sources

    return HubFolder(repo_id, prefix, revision, cache_dir)


def _join(*parts: str | None) -> str:
    """Sub-folder names joined into one relative path, each checked as given: a trailing slash is
    allowed, a leading one or a ``..`` is refused; an empty name (a release's root) adds nothing."""
    checked = [
        check_name(part.rstrip("/") or part, "hookpoint or folder") for part in parts if part
    ]
    return "/".join(checked)


def load_pretrained(
    source: str | Path,
    hookpoint: str | None = None,
    *,
    revision: str | None = None,
    subfolder: str | None = None,
    format: str | None = None,
    weights_file: str | None = None,
    allow_pickle: bool = False,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    cache_dir: str | Path | None = None,
) -> Pretrained:
    """Load a pretrained dictionary and say where it came from.

    Args:
        source: a local folder, a release of the registry (``saekit.hub.releases()``), or a Hub
            repository id ``owner/name``.
        hookpoint: the dictionary to take from a source that holds several: its folder (for
            sparsify and saekit repositories the hookpoint's name) or, for a release, the adapter
            hookpoint.
        revision: branch, tag or commit of a Hub repository (a release may pin one).
        subfolder: a folder inside the source under which ``hookpoint`` is looked up.
        format: skip detection (one of ``saekit.hub.formats.FORMATS``).
        weights_file: the weights file of a format whose file name varies (Prisma).
        allow_pickle: read the pickled (``torch.save``) weights of sdxl-unbox and Prisma, with
            ``torch.load(weights_only=True)``. Off by default: only opt in for sources you trust.
        device, dtype: where and in which dtype to build the dictionary (default: stored dtype).
        cache_dir: the Hugging Face cache to use (default: the client's, ``HF_HUB_CACHE``).
    """
    source = str(source)
    local = Path(source).expanduser()
    release: Release | None = None
    entry: ReleaseDictionary | None = None
    hint = (
        "hookpoint=... (CLI: --hookpoint)"
        if hookpoint is None
        else f"hookpoint='{hookpoint.rstrip('/')}/<sub-folder>'"
    )
    if local.is_dir():
        prefix = _join(subfolder, hookpoint)
        root = LocalFolder(local)
        folder: Folder = LocalFolder(local.joinpath(*prefix.split("/"))) if prefix else root
        repo_id = None
        if prefix and not (local / prefix).is_dir():
            raise NotAvailableError(
                f"{local} has no folder {prefix}; its dictionaries are: {', '.join(root.subfolders()) or 'none'}"
            )
    elif (release := find_release(source)) is not None:
        entry = release.dictionary(hookpoint)
        format = format or release.format
        repo_id = release.repo_of(entry)
        revision = revision or release.revision
        folder = _hub_folder(repo_id, _join(subfolder, entry.path), revision, cache_dir)
    elif local.exists():
        raise NotAvailableError(
            f"{local} is a file; give the folder that holds the dictionary (its config and weights)"
        )
    else:
        repo_id = hub_repo_id(source)  # or a one-line error naming a missing local path
        folder = _hub_folder(repo_id, _join(subfolder, hookpoint), revision, cache_dir)
    if repo_id is not None:  # say which repository, before the Hub is contacted
        log.info(
            "looking up the Hub repository %s (revision %s)%s",
            repo_id,
            revision or "main",
            f" for release {release.name}" if release else "",
        )

    converted, fmt = read_folder(
        folder,
        format=format,
        weights_file=weights_file,
        allow_pickle=allow_pickle,
        hookpoint_hint=hint,
    )
    cfg = _with_metadata(converted, release, entry, hookpoint)
    sae = dictionary_from_tensors(cfg, converted.tensors, device=device, dtype=dtype)
    origin = Origin(
        source=source,
        format=fmt.name,
        library=fmt.library,
        repo_id=repo_id,
        revision=folder.revision_id(),
        path=folder.path(),
        release=release.name if release else None,
        notes=tuple(converted.notes),
    )
    return Pretrained(sae, origin, converted.latent_stats, converted.records)


def _with_metadata(
    converted: Converted,
    release: Release | None,
    entry: ReleaseDictionary | None,
    hookpoint: str | None,
) -> SAEConfig:
    """The converted config with the model and hookpoint filled in: from the release (it knows the
    adapter's names), else from the file's own config, else from the folder the user picked."""
    cfg = converted.cfg
    if release is not None and entry is not None:
        for field_name, expected in (("d_in", entry.d_in), ("d_sae", entry.d_sae)):
            if expected is not None and getattr(cfg, field_name) != expected:
                raise FormatError(
                    f"release {release.name} expects {field_name}={expected} at {entry.hookpoint}, "
                    f"but the files give {getattr(cfg, field_name)}"
                )
        return dataclasses.replace(
            cfg,
            model=release.model,
            model_revision=release.model_revision,
            hookpoint=entry.hookpoint,
            capture=release.capture,
        )
    if cfg.hookpoint is None and hookpoint is not None:
        return dataclasses.replace(cfg, hookpoint=hookpoint)
    return cfg


def load(
    source: str | Path,
    hookpoint: str | None = None,
    **kwargs: Any,
) -> SparseAutoencoder:
    """A pretrained dictionary from a local folder, a Hub repository or a known release.

    ``saekit.load("runs/my-sae", "vision_model.encoder.layers.5")``,
    ``saekit.load("EleutherAI/sae-pythia-70m-32k", "layers.3")``,
    ``saekit.load("sdxl-turbo-unbox", "down_blocks.2.attentions.1", allow_pickle=True)``.
    Keyword arguments are those of :func:`load_pretrained`, which also returns the provenance.
    """
    return load_pretrained(source, hookpoint, **kwargs).sae
