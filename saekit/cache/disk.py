"""Disk space: how much a run will write, how much is free, and how fast the disk writes."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from .shards import CacheError

# Room left beside the estimate: the manifest, temporary files, and estimation error.
SAFETY_FRACTION = 0.02
SAFETY_BYTES = 1 << 20


class InsufficientDiskError(CacheError):
    """The cache would not fit on the disk."""


def existing_parent(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def free_bytes(path: Path) -> int:
    """Bytes available to this user on the file system that holds (or will hold) ``path``."""
    return shutil.disk_usage(existing_parent(path)).free


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    raise AssertionError("unreachable")


def check_space(path: Path, needed: int, *, what: str) -> str:
    """A one-line report of the space ``needed`` and the space free; raises when short."""
    free = free_bytes(path)
    margin = int(needed * SAFETY_FRACTION) + SAFETY_BYTES
    line = f"{what}: about {human_bytes(needed)} to write, {human_bytes(free)} free under {existing_parent(path)}"
    if needed + margin > free:
        raise InsufficientDiskError(
            f"{line}: not enough space. Free {human_bytes(needed + margin - free)} or more, choose "
            "another output_dir, cache fewer inputs (data.limit) or fewer rows (rows.every_k, "
            "rows.positions, a smaller dtype); or pass --disk_check false if you will free space "
            "while it runs"
        )
    return line


def sequential_write_speed(
    directory: Path, total_bytes: int = 1 << 30, chunk: int = 16 << 20
) -> float:
    """The disk's own sequential write speed in MB/s: ``total_bytes`` of random data written
    in ``chunk`` pieces and fsynced, as a shard write does (the file is removed after)."""
    directory.mkdir(parents=True, exist_ok=True)
    data = os.urandom(chunk)
    path = directory / f".write-speed-{os.getpid()}.tmp"
    try:
        began = time.perf_counter()
        with open(path, "wb") as handle:
            written = 0
            while written < total_bytes:
                handle.write(data)
                written += chunk
            handle.flush()
            os.fsync(handle.fileno())
        seconds = time.perf_counter() - began
    finally:
        path.unlink(missing_ok=True)
    return written / seconds / 1e6
