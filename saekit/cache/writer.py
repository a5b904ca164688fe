"""The shard writer: bounded memory, and the model never waits on the disk.

Three stages, each on its own thread:

1. the **model thread** (the caller) hooks activations, casts them to the storage dtype and
   hands them over with :meth:`ShardWriter.add` (it blocks only when the bounded queue is full);
2. the **copy thread** moves them off the accelerator (pinned memory, a side CUDA stream) and
   appends them to the current shuffle group;
3. the **write thread** shuffles each complete group (neighbouring tokens and patches are
   correlated, so rows are permuted within a large buffer before they reach a shard), cuts it
   into shards, writes them (temporary name, fsync, ``os.replace``) and then the manifest.

Memory is bounded by two shuffle groups (one filling, one being written) plus the queue. A
group's rows are a deterministic function of its inputs and the seed, so a killed run that
recomputes the group writes the same shards again.
"""

from __future__ import annotations

import errno
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import xxhash
from torch import Tensor

from .manifest import GroupRecord, Manifest, ShardRecord, save_manifest
from .shards import CacheError, write_shard

# Errors that mean "the disk is full" rather than "the code is wrong".
DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


class DiskFullError(CacheError):
    """The disk filled during a caching run; every complete shard is intact and listed."""


_STOP = object()


class _ByteQueue:
    """A FIFO bounded by the bytes it holds (an item larger than the bound still fits alone)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: list[tuple[Any, int]] = []
        self._bytes = 0
        self._cond = threading.Condition()

    def put(self, item: Any, nbytes: int, alive: Callable[[], bool]) -> None:
        with self._cond:
            while self._items and self._bytes + nbytes > self.max_bytes:
                if not alive():
                    return
                self._cond.wait(timeout=0.1)
            self._items.append((item, nbytes))
            self._bytes += nbytes
            self._cond.notify_all()

    def get(self) -> Any:
        with self._cond:
            while not self._items:
                self._cond.wait()
            item, nbytes = self._items.pop(0)
            self._bytes -= nbytes
            self._cond.notify_all()
            return item


@dataclass
class _Rows:
    """Rows of one hookpoint on their way to disk."""

    name: str
    values: Tensor  # (n, d) storage dtype
    columns: dict[str, Tensor]  # metadata, (n,) each
    ready: Any = None  # a CUDA event recorded after the rows were computed


def shuffle_seed(seed: int, rank: int, group: int, hookpoint: str) -> int:
    """The seed of one group's permutation of one hookpoint's rows."""
    return xxhash.xxh3_64_intdigest(f"{seed}:{rank}:{group}:{hookpoint}".encode()) & (2**63 - 1)


class ShardWriter:
    """Writes the rows handed to :meth:`add` into shuffled shards under ``directory``.

    Args:
        directory: the cache directory (one rank's, in a sharded run).
        manifest: the manifest to extend; the writer saves it after every group.
        rows_per_shard: rows per shard file (the last shard of a group may hold fewer).
        seed: seed of the within-group shuffles.
        queue_bytes: bound on the bytes waiting between the model and the copy thread.
        on_written: called with the bytes of every shard written (progress reporting).
        redo: ``(group, hookpoint, index)`` of listed shards that are damaged: written again
            when their group is recomputed, in place of their manifest record.
    """

    def __init__(
        self,
        directory: Path,
        manifest: Manifest,
        *,
        rows_per_shard: int,
        seed: int,
        queue_bytes: int = 256 << 20,
        on_written: Callable[[int], None] | None = None,
        redo: set[tuple[int, str, int]] | None = None,
    ) -> None:
        self.directory = directory
        self.manifest = manifest
        self.rows_per_shard = rows_per_shard
        self.seed = seed
        self.on_written = on_written
        self.lock = threading.Lock()  # guards the manifest
        self.error: BaseException | None = None
        self.bytes_written = 0
        self.write_seconds = 0.0
        self._queue = _ByteQueue(queue_bytes)
        self._groups: queue.Queue[Any] = queue.Queue()
        self._writer_idle = threading.Semaphore(1)
        self._buffers: dict[str, list[_Rows]] = {}
        self._done = {
            (s.group, name, s.index)
            for name, record in manifest.hookpoints.items()
            for s in record.shards
        } - (redo or set())
        self._copy_stream = torch.cuda.Stream() if torch.cuda.is_available() else None
        self._copy_thread = threading.Thread(target=self._copy_loop, name="cache-copy", daemon=True)
        self._write_thread = threading.Thread(
            target=self._write_loop, name="cache-write", daemon=True
        )
        self._copy_thread.start()
        self._write_thread.start()

    # ------------------------------------------------------------------ model thread

    def _alive(self) -> bool:
        return self.error is None

    def check(self) -> None:
        """Raise the error of a background thread, if one failed."""
        if self.error is not None:
            raise self.error

    def add(self, name: str, values: Tensor, columns: dict[str, Tensor]) -> None:
        """Queue rows of hookpoint ``name``: ``values`` ``(n, d)`` already in the storage dtype
        and owned by the writer (a copy), ``columns`` the metadata columns."""
        self.check()
        ready = None
        if values.is_cuda:
            ready = torch.cuda.Event()
            ready.record()
        nbytes = values.numel() * values.element_size()
        self._queue.put(("rows", _Rows(name, values, columns, ready)), nbytes, self._alive)
        self.check()

    def end_group(self, record: GroupRecord) -> None:
        """Everything added since the last group forms group ``record.index``."""
        self._queue.put(("group", record), 0, self._alive)
        self.check()

    def close(self) -> None:
        """Wait until everything queued is on disk; raise a background error if there was one."""
        self._queue.put(("stop", None), 0, self._copy_thread.is_alive)
        self._copy_thread.join()
        self._write_thread.join()
        self.check()

    def abort(self) -> None:
        """Stop without writing what is still queued (the manifest stays as it is)."""
        if self.error is None:
            self.error = CacheError("caching was aborted")
        self._queue.put(("stop", None), 0, self._copy_thread.is_alive)
        self._copy_thread.join(timeout=60)
        self._write_thread.join(timeout=60)

    # ------------------------------------------------------------------ copy thread

    def _to_host(self, rows: _Rows) -> _Rows:
        if not rows.values.is_cuda or self._copy_stream is None:
            return rows
        stream = self._copy_stream
        with torch.cuda.stream(stream):
            stream.wait_event(rows.ready)
            values = torch.empty(rows.values.shape, dtype=rows.values.dtype, pin_memory=True)
            values.copy_(rows.values, non_blocking=True)
            columns = {k: v.to("cpu", non_blocking=True) for k, v in rows.columns.items()}
            stream.synchronize()
        return _Rows(rows.name, values, columns)

    def _copy_loop(self) -> None:
        try:
            while True:
                kind, item = self._queue.get()
                if kind == "stop" or self.error is not None:
                    break
                if kind == "rows":
                    self._buffers.setdefault(item.name, []).append(self._to_host(item))
                else:  # a group is complete: hand it to the writer once it is free
                    while not self._writer_idle.acquire(timeout=0.1):
                        if self.error is not None:
                            return
                    self._groups.put((item, self._buffers))
                    self._buffers = {}
        except BaseException as err:  # surfaced to the model thread by check()
            self.error = err
        finally:
            self._groups.put(_STOP)

    # ------------------------------------------------------------------ write thread

    def _write_loop(self) -> None:
        while True:
            item = self._groups.get()
            if item is _STOP:
                return
            record, buffers = item
            try:
                for name in sorted(buffers):
                    self._write_hookpoint_group(record.index, name, buffers.pop(name))
                with self.lock:
                    if all(g.index != record.index for g in self.manifest.groups):
                        self.manifest.groups.append(record)  # (a repaired group is listed)
                    save_manifest(self.directory, self.manifest)
            except OSError as err:
                self.error = self._stopped_by(err)
                return
            except BaseException as err:
                self.error = err
                return
            finally:
                self._writer_idle.release()

    def _write_hookpoint_group(self, group: int, name: str, parts: list[_Rows]) -> None:
        values = torch.cat([p.values for p in parts])  # (n, d)
        columns = {c: torch.cat([p.columns[c] for p in parts]) for c in parts[0].columns}
        del parts
        n = values.shape[0]
        generator = torch.Generator().manual_seed(
            shuffle_seed(self.seed, self.manifest.rank, group, name)
        )
        order = torch.randperm(n, generator=generator)
        record = self.manifest.hookpoints[name]
        folder = self.directory / name
        folder.mkdir(parents=True, exist_ok=True)
        for index, start in enumerate(range(0, n, self.rows_per_shard)):
            if (group, name, index) in self._done:  # written before a resume
                continue
            pick = order[start : start + self.rows_per_shard]
            file = f"{name}/shard-g{group:06d}-{index:04d}.safetensors"
            began = time.perf_counter()
            written = write_shard(
                self.directory / file,
                values.index_select(0, pick),
                {c: column.index_select(0, pick) for c, column in columns.items()},
                block_rows=record.block_rows,
                cache_id=self.manifest.cache_id,
                hookpoint=name,
            )
            self.write_seconds += time.perf_counter() - began
            shard = ShardRecord(
                file, pick.numel(), written.bytes, written.header_xxh3, group, index
            )
            with self.lock:
                listed = [
                    i for i, s in enumerate(record.shards) if (s.group, s.index) == (group, index)
                ]
                if listed:  # a damaged shard rewritten
                    record.shards[listed[0]] = shard
                else:
                    record.shards.append(shard)
            self._done.add((group, name, index))
            self.bytes_written += written.bytes
            if self.on_written is not None:
                self.on_written(written.bytes)

    def _stopped_by(self, err: OSError) -> CacheError:
        """Save what is complete, and say what happened and what to do."""
        try:
            with self.lock:
                save_manifest(self.directory, self.manifest)
            saved = "the manifest lists every complete shard"
        except OSError:
            saved = "the manifest lists the shards of every complete group"
        shards, rows = self.manifest.shard_count, self.manifest.rows
        if err.errno in DISK_FULL_ERRNOS:
            return DiskFullError(
                f"the disk under {self.directory} is full ({err.strerror}). Caching stopped "
                f"cleanly: {shards} complete shards ({rows} rows) are intact and readable, and "
                f"{saved}. Free some space and run the same command again to continue."
            )
        return CacheError(
            f"writing the cache in {self.directory} failed: {err}. {shards} complete shards "
            f"({rows} rows) are intact; {saved}. Run the same command again to continue."
        )
