"""One view of a cache directory, whether one run wrote it or several ranks did.

A sharded run (torchrun, or any launcher that sets RANK / WORLD_SIZE) writes one directory per
rank, ``rank-00000-of-00002/`` ... under the output directory. :func:`merge_cache` writes a
merged manifest that lists them (no data is copied); :func:`open_cache` presents either kind,
or unmerged rank directories, as one :class:`CacheView`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .manifest import (
    MANIFEST,
    HookpointRecord,
    Manifest,
    MergedManifest,
    PartRecord,
    ShardRecord,
    load_manifest,
    manifest_checksum,
    save_manifest,
)
from .shards import STORAGE_DTYPES, CacheError

RANK_DIR = re.compile(r"^rank-(\d+)-of-(\d+)$")


def rank_dir_name(rank: int, world_size: int) -> str:
    return f"rank-{rank:05d}-of-{world_size:05d}"


@dataclass
class HookpointView:
    """One hookpoint of a cache, across all its parts."""

    name: str
    record: HookpointRecord
    dtype: torch.dtype
    shards: list[tuple[Path, ShardRecord]] = field(default_factory=list)
    """(absolute path, record) of every shard, part by part."""

    @property
    def d(self) -> int:
        return self.record.d

    @property
    def rows(self) -> int:
        return sum(s.rows for _, s in self.shards)


@dataclass
class CacheView:
    """A cache directory as one cache."""

    path: Path
    parts: list[tuple[Path, Manifest]]
    """(directory, manifest) of every part (one for an unsharded run)."""
    merged: bool
    """True when the parts were listed by a merged manifest."""
    hookpoints: dict[str, HookpointView]

    @property
    def first(self) -> Manifest:
        return self.parts[0][1]

    @property
    def cache_id(self) -> str:
        return self.first.cache_id

    @property
    def complete(self) -> bool:
        return all(m.complete for _, m in self.parts)

    @property
    def skipped(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for _, manifest in self.parts:
            if manifest.groups:
                for reason, n in manifest.groups[-1].skipped.items():
                    total[reason] = total.get(reason, 0) + n
        return total

    def hookpoint(self, name: str | None = None) -> HookpointView:
        """The hookpoint ``name`` (its cache name, or a module path that names one capture);
        None when the cache holds exactly one."""
        names = sorted(self.hookpoints)
        if name is None:
            if len(names) == 1:
                return self.hookpoints[names[0]]
            raise CacheError(
                f"the cache {self.path} holds {len(names)} hookpoints; choose one with "
                f"--hookpoint: {', '.join(names)}"
            )
        if name in self.hookpoints:
            return self.hookpoints[name]
        by_module = [h for h in self.hookpoints.values() if h.record.module == name]
        if len(by_module) == 1:
            return by_module[0]
        raise CacheError(
            f"the cache {self.path} has no hookpoint {name!r}; it holds: {', '.join(names)}"
        )

    def provenance(self, name: str | None = None) -> dict[str, Any]:
        """The SAEConfig fields a dictionary trained on this hookpoint inherits."""
        hookpoint = self.hookpoint(name)
        return {
            "model": self.first.model,
            "model_revision": self.first.model_revision,
            "hookpoint": hookpoint.record.module,
            "capture": hookpoint.record.capture,
        }


def _view(path: Path, parts: list[tuple[Path, Manifest]], merged: bool) -> CacheView:
    hookpoints: dict[str, HookpointView] = {}
    for directory, manifest in parts:
        dtype = STORAGE_DTYPES[manifest.dtype]
        for name, record in manifest.hookpoints.items():
            view = hookpoints.setdefault(name, HookpointView(name, record, dtype))
            if record.d != view.record.d:
                raise CacheError(
                    f"{directory}: hookpoint {name} has width {record.d}, other parts {view.d}"
                )
            view.shards.extend((directory / s.file, s) for s in record.shards)
    return CacheView(path, parts, merged, hookpoints)


def find_rank_dirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and RANK_DIR.match(p.name))


def _load_part(directory: Path) -> Manifest:
    if not (directory / MANIFEST).exists():
        # A rank that has created its directory but not yet written its first manifest (it is
        # still starting or caching): the parts are incomplete, not broken.
        raise CacheError(f"{directory} has no {MANIFEST} yet: its rank has not finished")
    manifest = load_manifest(directory)
    if not isinstance(manifest, Manifest):
        raise CacheError(f"{directory} is itself a merged cache; merge rank directories only")
    return manifest


def _check_parts(path: Path, parts: list[tuple[Path, Manifest]], *, complete: bool) -> None:
    """All parts belong to one sharded run, every rank is there once (and finished)."""
    if not parts:
        raise CacheError(f"{path} holds no cache parts to merge")
    first = parts[0][1]
    world = first.world_size
    for directory, manifest in parts:
        if manifest.cache_id != first.cache_id:
            raise CacheError(
                f"{directory} was written by a different config than {parts[0][0]}; only the "
                "ranks of one run can be merged"
            )
        if manifest.world_size != world:
            raise CacheError(
                f"{directory} is a part of a {manifest.world_size}-rank run, not {world}"
            )
    ranks = sorted(m.rank for _, m in parts)
    if ranks != list(range(world)):
        missing = sorted(set(range(world)) - set(ranks))
        raise CacheError(
            f"{path}: a {world}-rank run needs ranks 0..{world - 1}; "
            + (f"missing {missing}" if missing else f"found ranks {ranks}")
        )
    if complete:
        unfinished = [m.rank for _, m in parts if not m.complete]
        if unfinished:
            raise CacheError(
                f"{path}: ranks {unfinished} have not finished; rerun them (the same command "
                "resumes) and merge again"
            )


def merge_cache(path: str | Path, parts: list[str | Path] | None = None) -> CacheView:
    """Write ``path/manifest.json`` listing the rank directories of one sharded run (found under
    ``path``, or given as ``parts``); nothing is copied. Every rank must have finished."""
    path = Path(path)
    directories = [Path(p) if Path(p).is_absolute() else path / p for p in parts or []]
    if not directories:
        directories = find_rank_dirs(path) if path.is_dir() else []
    loaded = [(d, _load_part(d)) for d in directories]
    _check_parts(path, loaded, complete=True)
    loaded.sort(key=lambda item: item[1].rank)
    merged = MergedManifest(
        cache_id=loaded[0][1].cache_id,
        world_size=loaded[0][1].world_size,
        parts=[
            PartRecord(str(Path(_relative(d, path))), manifest.rank, manifest_checksum(d))
            for d, manifest in loaded
        ],
    )
    save_manifest(path, merged)
    return _view(path, loaded, merged=True)


def _relative(directory: Path, root: Path) -> str:
    import os

    return os.path.relpath(directory.absolute(), root.absolute())


def open_cache(path: str | Path) -> CacheView:
    """The cache at ``path``: one run's directory, a merged cache, or a folder of rank
    directories not merged yet (presented as one when every rank is there)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"cache directory not found: {path}")
    if (path / MANIFEST).exists():
        manifest = load_manifest(path)
        if isinstance(manifest, Manifest):
            return _view(path, [(path, manifest)], merged=False)
        parts = []
        for part in manifest.parts:
            directory = path / part.path
            loaded = _load_part(directory)
            if manifest_checksum(directory) != part.manifest_xxh3:
                raise CacheError(
                    f"{directory} changed after it was merged into {path}; run "
                    f"`saekit cache merge {path}` again"
                )
            parts.append((directory, loaded))
        return _view(path, parts, merged=True)
    rank_dirs = find_rank_dirs(path)
    if not rank_dirs:
        raise CacheError(f"{path} is not a saekit cache: it has no {MANIFEST}")
    parts = [(d, _load_part(d)) for d in rank_dirs]
    _check_parts(path, parts, complete=False)
    parts.sort(key=lambda item: item[1].rank)
    return _view(path, parts, merged=False)
