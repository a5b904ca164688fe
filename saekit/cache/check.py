"""Which shards of a cache are damaged: missing, truncated, foreign or corrupt.

Sizes and headers are always checked: a ``stat`` and a few KB read per shard, so ``saekit cache
info`` and a rerun of ``saekit cache`` never call a cache with a truncated or missing shard
complete. Every block's checksum is checked too (a full read) when asked, or when the cache is
small enough that reading it costs less than a second or two (:data:`FULL_CHECK_BYTES`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .manifest import Manifest, ShardRecord
from .shards import STORAGE_DTYPES, CacheError, ShardFile

# Below this many bytes of shards, a rerun reads every shard to check its checksums.
FULL_CHECK_BYTES = 256 << 20


@dataclass(frozen=True)
class Damage:
    """One damaged shard."""

    hookpoint: str
    record: ShardRecord
    """What the manifest says the shard should be."""
    path: Path
    problem: str
    """What is wrong with it, in a sentence."""


def shard_problem(
    path: Path,
    record: ShardRecord,
    *,
    d: int,
    dtype: str,
    cache_id: str,
    hookpoint: str,
    full: bool,
) -> str | None:
    """Why the shard at ``path`` does not match its manifest record (None when it does)."""
    try:
        shard = ShardFile(
            path,
            rows=record.rows,
            size=record.bytes,
            header_xxh3=record.header_xxh3,
            d=d,
            dtype=STORAGE_DTYPES[dtype],
            cache_id=cache_id,
            hookpoint=hookpoint,
        )
        try:
            if full:
                shard.verify()
        finally:
            shard.close()
    except (CacheError, KeyError, ValueError) as err:  # KeyError/ValueError: a foreign header
        return str(err) if isinstance(err, CacheError) else f"shard {path} is not a saekit shard"
    return None


def damaged_shards(
    directory: Path, manifest: Manifest, *, full: bool | None = None
) -> list[Damage]:
    """The shards of ``directory`` that do not match ``manifest``; ``full=None`` reads every
    shard when the cache is under :data:`FULL_CHECK_BYTES`, else checks sizes and headers."""
    if full is None:
        full = sum(s.bytes for h in manifest.hookpoints.values() for s in h.shards) <= (
            FULL_CHECK_BYTES
        )
    found = []
    for name, hookpoint in manifest.hookpoints.items():
        for record in hookpoint.shards:
            path = directory / record.file
            problem = shard_problem(
                path,
                record,
                d=hookpoint.d,
                dtype=manifest.dtype,
                cache_id=manifest.cache_id,
                hookpoint=name,
                full=full,
            )
            if problem:
                found.append(Damage(name, record, path, problem))
    return found
