"""The cache reader: shuffled ``(batch, d)`` batches streamed from shards, never loaded whole.

How rows are mixed without random reads (the disk wants long sequential reads, the trainer
wants each batch drawn from all over the cache):

1. every shard is cut into *blocks* of about 1 MiB of contiguous rows (the writer hashed the
   same blocks, so each read is checked on the way);
2. each epoch, the blocks of all shards are put in a random order, and consecutive blocks form
   *windows* (the mixing buffer, ``mixing_buffer_mb``);
3. a background thread reads a window (memory-mapped, one contiguous copy per block),
   permutes its rows and queues the window's batches while the trainer consumes the previous
   window.

The writer already shuffled rows within a large buffer, so a window of blocks drawn from the
whole cache mixes inputs, positions and shards. An epoch is the concatenation of its windows:
every row exactly once. The order is a function of (seed, epoch) alone, so the position in an
epoch (rows consumed) is all a resumed run needs: the reader jumps to the window holding it.
"""

from __future__ import annotations

import bisect
import queue
import threading
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch
import xxhash
from torch import Tensor

from ..sources import DataError
from .merge import CacheView, open_cache
from .rows import COLUMNS
from .shards import CacheError, ShardFile

_END = object()


class CacheBatch(NamedTuple):
    """A batch with its per-row metadata (``metadata=True``)."""

    activations: Tensor
    """``(B, d)`` in the cache's storage dtype."""
    metadata: dict[str, Tensor]
    """Column name (sample, position, step, timestep, branch, stream) -> ``(B,)``."""


def _seed(*parts: int) -> int:
    return xxhash.xxh3_64_intdigest(":".join(map(str, parts)).encode()) & (2**63 - 1)


class CacheReader:
    """Shuffled batches of one hookpoint of a cache; a resumable source for the trainer.

    Args:
        cache: the cache directory (one run, merged, or unmerged rank directories) or a view.
        hookpoint: which hookpoint; None when the cache holds one.
        batch_size: rows per batch (the last batch of an epoch may be smaller).
        epochs: passes over the data; None repeats forever.
        shuffle: False reads rows in storage order (still in blocks).
        seed: seed of the order; the same seed gives the same batches.
        mixing_buffer_mb: size of a window of blocks that are mixed together.
        metadata: yield :class:`CacheBatch` (activations + metadata) instead of tensors.
        verify: check every block against its checksum as it is read (about 10 GB/s).
        pin_memory: allocate batches in pinned memory (faster, asynchronous copies to a GPU).
    """

    def __init__(
        self,
        cache: str | Path | CacheView,
        hookpoint: str | None = None,
        batch_size: int = 4096,
        *,
        epochs: int | None = 1,
        shuffle: bool = True,
        seed: int = 0,
        mixing_buffer_mb: float = 128,
        metadata: bool = False,
        verify: bool = True,
        pin_memory: bool = False,
    ) -> None:
        if batch_size < 1:
            raise DataError(f"batch_size must be at least 1, got {batch_size}")
        self.view = cache if isinstance(cache, CacheView) else open_cache(cache)
        self.hookpoint = self.view.hookpoint(hookpoint)
        record = self.hookpoint.record
        self.d_in = record.d
        self.dtype = self.hookpoint.dtype
        self.batch_size = batch_size
        self.epochs = epochs
        self.shuffle = shuffle
        self.seed = seed
        self.metadata = metadata
        self.verify = verify
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self.provenance = self.view.provenance(self.hookpoint.name)
        self.shards = [
            ShardFile(
                path,
                rows=s.rows,
                size=s.bytes,
                header_xxh3=s.header_xxh3,
                d=record.d,
                dtype=self.dtype,
                cache_id=self.view.cache_id,
                hookpoint=self.hookpoint.name,
            )
            for path, s in self.hookpoint.shards
        ]
        # The block table: block i is rows [block_start[i], +block_rows[i]) of shard block_shard[i].
        shard_of, index_in, rows_of = [], [], []
        for s, shard in enumerate(self.shards):
            for b in range(shard.n_blocks):
                start, stop = shard.block_range(b)
                shard_of.append(s)
                index_in.append(b)
                rows_of.append(stop - start)
        self._block_shard = shard_of
        self._block_index = index_in
        self._block_rows = torch.tensor(rows_of, dtype=torch.long)
        self.n_rows = int(self._block_rows.sum())
        if self.n_rows == 0:
            raise CacheError(f"hookpoint {self.hookpoint.name} of {self.view.path} holds no rows")
        row_bytes = record.d * self.dtype.itemsize
        block_bytes = record.block_rows * row_bytes
        self.window_blocks = max(1, int(mixing_buffer_mb * 2**20 // block_bytes))
        self._verified = [False] * len(rows_of)
        self._columns: OrderedDict[int, dict[str, Tensor]] = OrderedDict()
        self.epoch = 0
        self.position = 0
        if not self.view.complete:
            import logging

            logging.getLogger("saekit.cache").warning(
                "the cache %s is incomplete (its run has not finished); reading the %d rows "
                "it holds",
                self.view.path,
                self.n_rows,
            )

    # ------------------------------------------------------------------ sizes and state

    def __len__(self) -> int:
        """Batches per epoch."""
        return -(-self.n_rows // self.batch_size)

    @property
    def total_batches(self) -> int | None:
        """Batches of the whole run (lets the trainer schedule its learning-rate decay)."""
        return None if self.epochs is None else self.epochs * len(self)

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "n_rows": self.n_rows,
            "cache_id": self.view.cache_id,
            "hookpoint": self.hookpoint.name,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        expected = {
            "n_rows": self.n_rows,
            "seed": self.seed,
            "cache_id": self.view.cache_id,
            "hookpoint": self.hookpoint.name,
        }
        differing = [k for k, v in expected.items() if state.get(k) != v]
        if differing:
            raise DataError(
                f"the checkpoint was written while reading another cache or order (it differs "
                f"in {', '.join(differing)}); resume with the same --cache, --hookpoint and "
                "data_seed"
            )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    # ------------------------------------------------------------------ the epoch's order

    def _windows(self, epoch: int) -> list[Tensor]:
        """The blocks of each window of ``epoch``, in reading order."""
        n_blocks = len(self._block_shard)
        if self.shuffle:
            generator = torch.Generator().manual_seed(_seed(self.seed, epoch))
            order = torch.randperm(n_blocks, generator=generator)
        else:
            order = torch.arange(n_blocks)
        return list(order.split(self.window_blocks))

    def _read_window(self, blocks: Tensor) -> tuple[Tensor, dict[str, Tensor] | None]:
        rows = self._block_rows[blocks]
        window = torch.empty(
            int(rows.sum()), self.d_in, dtype=self.dtype, pin_memory=self.pin_memory
        )  # (rows, d)
        offset = 0
        for block, n in zip(blocks.tolist(), rows.tolist(), strict=True):
            shard = self.shards[self._block_shard[block]]
            verify = self.verify and not self._verified[block]
            shard.read_block(self._block_index[block], window[offset : offset + n], verify=verify)
            self._verified[block] = True
            offset += n
        if not self.metadata:
            return window, None
        parts: dict[str, list[Tensor]] = {name: [] for name in COLUMNS}
        for block in blocks.tolist():
            columns = self._shard_columns(self._block_shard[block])
            start, stop = self.shards[self._block_shard[block]].block_range(
                self._block_index[block]
            )
            for name in COLUMNS:
                parts[name].append(columns[name][start:stop])
        return window, {name: torch.cat(p) for name, p in parts.items()}

    def _shard_columns(self, s: int) -> dict[str, Tensor]:
        if s in self._columns:
            self._columns.move_to_end(s)
            return self._columns[s]
        columns = {name: self.shards[s].read_column(name, verify=self.verify) for name in COLUMNS}
        self._columns[s] = columns
        if len(self._columns) > 64:
            self._columns.popitem(last=False)
        return columns

    # ------------------------------------------------------------------ iteration

    def _produce(self, out: queue.Queue, stop: threading.Event, epoch: int, position: int) -> None:
        """Fill ``out`` with (batch, metadata, epoch, position after it) from ``epoch``, row
        ``position`` on; then _END (or the exception that stopped it)."""

        def put(item: Any) -> bool:
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        try:
            while self.epochs is None or epoch < self.epochs:
                windows = self._windows(epoch)
                sizes = [int(self._block_rows[w].sum()) for w in windows]
                starts = [0]
                for size in sizes:
                    starts.append(starts[-1] + size)
                first = bisect.bisect_right(starts, position) - 1
                carry: list[tuple[Tensor, dict[str, Tensor] | None]] = []
                carried = 0
                consumed = position
                for w in range(first, len(windows)):
                    values, columns = self._read_window(windows[w])
                    if self.shuffle:
                        generator = torch.Generator().manual_seed(_seed(self.seed, epoch, w))
                        perm = torch.randperm(values.shape[0], generator=generator)
                        values = values[perm]
                        columns = (
                            None if columns is None else {k: v[perm] for k, v in columns.items()}
                        )
                    skip = position - starts[w] if w == first else 0
                    i = skip
                    while i < values.shape[0]:
                        take = min(self.batch_size - carried, values.shape[0] - i)
                        piece = values[i : i + take]
                        meta = (
                            None
                            if columns is None
                            else {k: v[i : i + take] for k, v in columns.items()}
                        )
                        i += take
                        if carried == 0 and take == self.batch_size:
                            batch, batch_meta = piece, meta
                        else:
                            carry.append((piece, meta))
                            carried += take
                            if carried < self.batch_size:
                                continue
                            batch, batch_meta = _join(carry)
                            carry, carried = [], 0
                        consumed += batch.shape[0]
                        if not put((batch, batch_meta, epoch, consumed)):
                            return
                if carry:  # the epoch's last, smaller batch
                    batch, batch_meta = _join(carry)
                    consumed += batch.shape[0]
                    if not put((batch, batch_meta, epoch, consumed)):
                        return
                epoch, position = epoch + 1, 0
            put(_END)
        except BaseException as err:
            put(err)

    def __iter__(self) -> Iterator[Tensor | CacheBatch]:
        if self.position >= self.n_rows:
            self.epoch, self.position = self.epoch + 1, 0
        if self.epochs is not None and self.epoch >= self.epochs:
            return
        batches_per_window = -(-self.window_blocks * self.shards[0].block_rows // self.batch_size)
        out: queue.Queue = queue.Queue(maxsize=batches_per_window + 2)
        stop = threading.Event()
        thread = threading.Thread(
            target=self._produce,
            args=(out, stop, self.epoch, self.position),
            name="cache-reader",
            daemon=True,
        )
        thread.start()
        try:
            while True:
                item = out.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                batch, meta, epoch, position = item
                # Advance before yielding: a checkpoint taken after the trainer used this batch
                # must resume after it.
                if position >= self.n_rows:
                    self.epoch, self.position = epoch + 1, 0
                else:
                    self.epoch, self.position = epoch, position
                yield CacheBatch(batch, meta) if meta is not None else batch
        finally:
            stop.set()
            thread.join(timeout=10)

    def close(self) -> None:
        for shard in self.shards:
            shard.close()


def _join(
    parts: list[tuple[Tensor, dict[str, Tensor] | None]],
) -> tuple[Tensor, dict[str, Tensor] | None]:
    values = torch.cat([p for p, _ in parts])
    if parts[0][1] is None:
        return values, None
    return values, {k: torch.cat([m[k] for _, m in parts if m is not None]) for k in parts[0][1]}


def open_training_source(
    cache_dir: str | Path,
    *,
    hookpoint: str | None = None,
    batch_size: int,
    epochs: int | None = 1,
    shuffle: bool = True,
    seed: int = 0,
) -> CacheReader:
    """The reader ``saekit train --cache DIR`` trains from (resumable, with provenance)."""
    return CacheReader(
        cache_dir,
        hookpoint,
        batch_size,
        epochs=epochs,
        shuffle=shuffle,
        seed=seed,
        pin_memory=torch.cuda.is_available(),
    )
