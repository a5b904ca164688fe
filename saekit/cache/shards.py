"""Shard files: write-once safetensors files of rows, checked block by block when read.

A shard holds ``activations`` ``(n, d)`` (bf16, fp16 or fp32) and one tensor per metadata column
(``meta.sample``, ``meta.position``, ...). It is written under a temporary name, fsynced, and
renamed into place (``os.replace``), so a crash never leaves a half shard that looks complete.

Integrity without a second read: the safetensors header carries an xxh3 hash of every block of
``block_rows`` rows (about 1 MiB, the reader's unit of contiguous reads) and of every metadata
column, and the manifest carries the hash of the header and the file size. A reader checks the
size and the header when it opens a shard (catches truncation, tampering and files from another
cache), then each block as it reads it (catches corruption) at ~10 GB/s of hashing.
"""

from __future__ import annotations

import json
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xxhash
from torch import Tensor

from .._io import atomic_path
from ..sources import DataError

SHARD_FORMAT = "saekit-cache-shard/1"
ACTIVATIONS = "activations"
META_PREFIX = "meta."

# Target bytes of one block: the unit of checksums and of the reader's contiguous reads.
BLOCK_BYTES = 1 << 20

STORAGE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
_SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F32": torch.float32,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
}


class CacheError(DataError):
    """A cache that cannot be used as it is: corrupt, truncated, foreign, or inconsistent."""


def block_rows_for(d: int, dtype: torch.dtype) -> int:
    """Rows per block: about :data:`BLOCK_BYTES` of activations, at least one row."""
    row_bytes = d * torch.empty((), dtype=dtype).element_size()
    return max(1, -(-BLOCK_BYTES // row_bytes))


def _bytes_of(tensor: Tensor) -> np.ndarray:
    """The raw bytes of a contiguous CPU tensor as a uint8 array (no copy)."""
    flat = tensor.contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy() if flat.numel() else np.empty(0, np.uint8)


def _hash(data: Any) -> str:
    return xxhash.xxh3_64_hexdigest(data)


@dataclass(frozen=True)
class WrittenShard:
    """What the manifest records about a shard just written."""

    bytes: int
    header_xxh3: str


_DTYPE_CODES = {dtype: code for code, dtype in _SAFETENSORS_DTYPES.items()}


def _header_bytes(tensors: dict[str, Tensor], metadata: dict[str, str]) -> bytes:
    """A safetensors header for ``tensors`` laid out in the given order, keys sorted, padded
    with spaces to a multiple of 8 bytes (the format's alignment)."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": _DTYPE_CODES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def write_shard(
    path: Path,
    values: Tensor,
    columns: dict[str, Tensor],
    *,
    block_rows: int,
    cache_id: str,
    hookpoint: str,
) -> WrittenShard:
    """Write rows to ``path`` atomically; return its size and header hash.

    ``values`` is ``(n, d)`` in the storage dtype on the CPU; ``columns`` the metadata columns.
    The file is a standard safetensors file (``safetensors.torch.load_file`` reads it). It is
    written here rather than by ``safetensors.torch.save_file`` because that orders the header
    by a hash map, so a shard recomputed after a resume would differ in bytes; this header is
    sorted, and the tensors stream to the file without a serialized copy in memory.
    """
    values = values.contiguous()
    raw = _bytes_of(values)
    row_bytes = values.shape[1] * values.element_size()
    step = block_rows * row_bytes
    block_hashes = [_hash(raw[i : i + step]) for i in range(0, raw.size, step)]
    # Widest dtypes first, so that every tensor starts aligned to its element size.
    ordered = sorted(columns.items(), key=lambda item: (-item[1].element_size(), item[0]))
    tensors = {ACTIVATIONS: values, **{META_PREFIX + k: v.contiguous() for k, v in ordered}}
    meta_hashes = {name: _hash(_bytes_of(column)) for name, column in columns.items()}
    metadata = {
        "format": SHARD_FORMAT,
        "cache": cache_id,
        "hookpoint": hookpoint,
        "rows": str(values.shape[0]),
        "block_rows": str(block_rows),
        "block_xxh3": ",".join(block_hashes),
        "meta_xxh3": json.dumps(meta_hashes, sort_keys=True),
    }
    header = _header_bytes(tensors, metadata)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(header)
            for tensor in tensors.values():
                handle.write(_bytes_of(tensor).data)
        size = tmp.stat().st_size
    return WrittenShard(size, _hash(header[8:]))


@dataclass
class ShardHeader:
    """The parsed safetensors header of a shard."""

    tensors: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]
    """name -> (dtype, shape, absolute start byte, absolute end byte)."""
    metadata: dict[str, str]
    xxh3: str


def read_header(path: Path, size: int) -> ShardHeader:
    """Parse the header of the safetensors file at ``path`` (``size`` bytes long)."""
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise CacheError(f"{path} is truncated: {size} bytes, not a safetensors file")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(size - 8, 100 << 20):
            raise CacheError(f"{path} is not a saekit shard (bad safetensors header length)")
        raw = handle.read(header_len)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CacheError(f"{path} has a corrupt safetensors header ({err})") from err
    metadata = header.pop("__metadata__", {}) or {}
    tensors = {}
    data_start = 8 + header_len
    for name, info in header.items():
        dtype = _SAFETENSORS_DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise CacheError(f"{path}: tensor {name} has unsupported dtype {info.get('dtype')}")
        start, end = info["data_offsets"]
        tensors[name] = (dtype, tuple(info["shape"]), data_start + start, data_start + end)
    return ShardHeader(tensors, metadata, _hash(raw))


class ShardFile:
    """A shard opened for reading: size and header checked against the manifest, data
    memory-mapped, blocks checked as they are read.

    Args:
        path: the shard file.
        rows, size, header_xxh3: what the manifest says about it.
        d, dtype: the hookpoint's width and storage dtype.
        cache_id, hookpoint: the cache and hookpoint it must belong to.
    """

    def __init__(
        self,
        path: Path,
        *,
        rows: int,
        size: int,
        header_xxh3: str,
        d: int,
        dtype: torch.dtype,
        cache_id: str,
        hookpoint: str,
    ) -> None:
        self.path = path
        self.rows = rows
        self.d = d
        self.dtype = dtype
        try:
            actual = path.stat().st_size
        except FileNotFoundError:
            raise CacheError(
                f"shard {path} is listed in the manifest but missing; the cache is incomplete "
                "(copy it again, or rerun `saekit cache` with the same config to rewrite it)"
            ) from None
        if actual != size:
            what = "truncated" if actual < size else "larger than recorded"
            raise CacheError(
                f"shard {path} is {what}: {actual} bytes on disk, {size} in the manifest"
            )
        header = read_header(path, actual)
        if header.xxh3 != header_xxh3:
            raise CacheError(
                f"shard {path} does not match the manifest (its header hash differs): the file "
                "was changed or comes from another cache"
            )
        meta = header.metadata
        if meta.get("format") != SHARD_FORMAT or meta.get("cache") != cache_id:
            raise CacheError(f"shard {path} belongs to another cache ({meta.get('cache')})")
        if meta.get("hookpoint") != hookpoint:
            raise CacheError(
                f"shard {path} holds hookpoint {meta.get('hookpoint')!r}, not {hookpoint!r}"
            )
        self.header = header
        act_dtype, act_shape, self._start, self._end = header.tensors[ACTIVATIONS]
        if act_dtype != dtype or act_shape != (rows, d):
            raise CacheError(
                f"shard {path} holds {act_dtype} {act_shape}, the manifest says {dtype} ({rows}, {d})"
            )
        self.block_rows = int(meta["block_rows"])
        self.block_hashes = meta["block_xxh3"].split(",") if rows else []
        self.meta_hashes: dict[str, str] = json.loads(meta["meta_xxh3"])
        self.row_bytes = d * torch.empty((), dtype=dtype).element_size()
        self._map: mmap.mmap | None = None

    @property
    def n_blocks(self) -> int:
        return len(self.block_hashes)

    def block_range(self, block: int) -> tuple[int, int]:
        start = block * self.block_rows
        return start, min(start + self.block_rows, self.rows)

    def _buffer(self) -> mmap.mmap:
        if self._map is None:
            with open(self.path, "rb") as handle:
                self._map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        return self._map

    def read_block(self, block: int, out: Tensor, *, verify: bool = True) -> None:
        """Copy block ``block`` into ``out`` (``(rows of the block, d)``, storage dtype, CPU),
        checking its hash against the header."""
        start, stop = self.block_range(block)
        begin = self._start + start * self.row_bytes
        nbytes = (stop - start) * self.row_bytes
        view = memoryview(self._buffer())[begin : begin + nbytes]
        try:
            if verify and _hash(view) != self.block_hashes[block]:
                raise CacheError(
                    f"shard {self.path} is corrupt: rows {start}-{stop} (block {block}) do not "
                    "match their checksum; recompute this shard (rerun `saekit cache`) or drop it"
                )
            target = out.view(torch.uint8).numpy().reshape(-1)
            np.copyto(target, np.frombuffer(view, dtype=np.uint8))
        finally:
            view.release()

    def read_column(self, name: str, *, verify: bool = True) -> Tensor:
        """A whole metadata column (a copy), checked against its hash."""
        dtype, shape, start, end = self.header.tensors[META_PREFIX + name]
        view = memoryview(self._buffer())[start:end]
        try:
            if verify and _hash(view) != self.meta_hashes.get(name):
                raise CacheError(f"shard {self.path} is corrupt: metadata column {name!r}")
            data = bytearray(view)
        finally:
            view.release()
        return (
            torch.frombuffer(data, dtype=dtype).reshape(shape)
            if shape[0]
            else torch.empty(shape, dtype=dtype)
        )

    def verify(self) -> None:
        """Check every block and column (a full read)."""
        out = torch.empty(self.block_rows, self.d, dtype=self.dtype)
        for block in range(self.n_blocks):
            start, stop = self.block_range(block)
            self.read_block(block, out[: stop - start])
        for name in self.meta_hashes:
            self.read_column(name)

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None
