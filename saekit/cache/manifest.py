"""The manifest: what a cache directory holds, written atomically and checked when read.

``manifest.json`` records the model, revision, hookpoints (module path, capture target, d,
description), the storage dtype, every complete shard (file, rows, size, header hash), the
shuffle groups completed so far (where a resumed run continues), and the configuration that
determined the rows. A checksum over the rest of the file catches hand edits and corruption.

A *merged* manifest (written by ``saekit cache merge`` or by the last rank of a sharded run to
finish) lists the rank directories of one sharded run; no data is copied.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import xxhash

from .._io import atomic_write_json, read_json
from ..adapters.base import Capture
from ..configuration import ConfigError, from_dict, to_dict
from ..dictionaries.config import StorageDtype
from .shards import CacheError

MANIFEST = "manifest.json"
FORMAT = "saekit-cache"
VERSION = 1


@dataclass
class ShardRecord:
    """One complete shard file."""

    file: str
    """Path relative to the cache directory."""
    rows: int
    bytes: int
    """File size."""
    header_xxh3: str
    """Hash of the safetensors header, which holds the hashes of every block of rows."""
    group: int
    """The shuffle group the shard belongs to."""
    index: int
    """Its index within the group."""


@dataclass
class HookpointRecord:
    """One hookpoint of the cache and its shards."""

    module: str
    """The ``named_modules()`` path."""
    capture: Capture
    """What the hook captured: output, input, or update (output - input)."""
    d: int
    """Row width."""
    block_rows: int
    """Rows per checksum block (about 1 MiB)."""
    description: str = ""
    """What the tensor means (from the adapter)."""
    sample_shape: list[int] = field(default_factory=list)
    """Shape of the hooked tensor of one batch element (how positions were laid out)."""
    shards: list[ShardRecord] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.shards)


@dataclass
class GroupRecord:
    """A shuffle group whose shards are all written: a resumed run continues after it."""

    index: int
    end_batch: int
    """Input batches (of this rank) consumed when the group ended."""
    inputs_done: int
    """Inputs (of this rank) consumed, skipped ones included."""
    skipped: dict[str, int] = field(default_factory=dict)
    """Inputs skipped so far, by reason (unreadable image, empty prompt, ...)."""


@dataclass
class Manifest:
    """The manifest of one cache directory (one rank of a sharded run, or an unsharded run)."""

    cache_id: str
    """Hash of the configuration that determines the rows (the same on every rank)."""
    config: dict[str, Any]
    """That configuration."""
    adapter: str
    model: str | None
    model_revision: str | None
    dtype: StorageDtype
    streams: list[str] = field(default_factory=list)
    """Names of the stream codes in the ``stream`` column."""
    rank: int = 0
    world_size: int = 1
    inputs: int = 0
    """Inputs this rank caches."""
    hookpoints: dict[str, HookpointRecord] = field(default_factory=dict)
    groups: list[GroupRecord] = field(default_factory=list)
    complete: bool = False
    """True once every input was cached."""
    format: str = FORMAT
    version: int = VERSION
    kind: Literal["cache"] = "cache"

    @property
    def rows(self) -> int:
        return sum(h.rows for h in self.hookpoints.values())

    @property
    def shard_count(self) -> int:
        return sum(len(h.shards) for h in self.hookpoints.values())


@dataclass
class PartRecord:
    """One rank's directory in a merged cache."""

    path: str
    """Relative to the merged cache's directory."""
    rank: int
    manifest_xxh3: str
    """Checksum of the part's manifest when it was merged."""


@dataclass
class MergedManifest:
    """Several rank directories of one sharded run presented as one cache (nothing copied)."""

    cache_id: str
    world_size: int
    parts: list[PartRecord]
    format: str = FORMAT
    version: int = VERSION
    kind: Literal["merged"] = "merged"


def _checksum(data: dict[str, Any]) -> str:
    body = {k: v for k, v in data.items() if k != "checksum"}
    return xxhash.xxh3_64_hexdigest(
        json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    )


def save_manifest(directory: Path, manifest: Manifest | MergedManifest) -> str:
    """Write ``directory/manifest.json`` atomically; return its checksum."""
    data = to_dict(manifest)
    data["checksum"] = _checksum(data)
    atomic_write_json(directory / MANIFEST, data)
    return data["checksum"]


def load_manifest(directory: Path) -> Manifest | MergedManifest:
    """Read and check ``directory/manifest.json``."""
    path = directory / MANIFEST
    try:
        data = read_json(path, what="cache manifest")
    except ValueError as err:
        raise CacheError(str(err)) from err
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CacheError(f"{path} is not a saekit cache manifest")
    if data.get("version") != VERSION:
        raise CacheError(
            f"{path} has format version {data.get('version')}; this saekit reads version "
            f"{VERSION} (upgrade saekit)"
        )
    if data.get("checksum") != _checksum(data):
        raise CacheError(
            f"{path} does not match its checksum: it was edited or is corrupt. Restore it, or "
            "rerun `saekit cache` with the same config into a new directory"
        )
    body = {k: v for k, v in data.items() if k != "checksum"}
    cls: type[Manifest] | type[MergedManifest] = (
        MergedManifest if body.get("kind") == "merged" else Manifest
    )
    try:
        return from_dict(cls, body, where=str(path))
    except ConfigError as err:
        raise CacheError(f"{path} is malformed: {err}") from err


def manifest_checksum(directory: Path) -> str:
    """The checksum recorded in ``directory/manifest.json`` (after checking it)."""
    load_manifest(directory)
    return read_json(directory / MANIFEST)["checksum"]
