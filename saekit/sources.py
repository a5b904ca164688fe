"""Activation sources: what the trainer reads.

The trainer accepts any iterable of ``(batch, d_in)`` tensors. A source that can also report and
restore its position (``state_dict`` / ``load_state_dict``) makes a killed run resumable with the
same data order. :class:`ArraySource` serves arrays in memory or on disk (``.npy`` memory maps,
``.safetensors`` files); the activation cache's reader is another such source.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor


@runtime_checkable
class ResumableSource(Protocol):
    """A source of activation batches whose position can be saved and restored."""

    d_in: int

    def __iter__(self) -> Iterator[Tensor]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class DataError(ValueError):
    """Activations that cannot be used: empty, truncated, of the wrong shape or dtype."""


class ArraySource:
    """Shuffled ``(batch_size, d)`` batches from a 2-D array, epoch by epoch.

    Each epoch visits every row exactly once in an order drawn from ``seed`` and the epoch
    number, so the order is reproducible and a resumed run continues it exactly.

    With ``world_size > 1`` (data-parallel training) every rank walks the same global order and
    yields only its contiguous share of each global batch, so the ranks together see exactly
    the batches of a single process; the position is global, so a checkpoint resumes with any
    world size that divides the batch.
    """

    def __init__(
        self,
        data: Tensor | np.ndarray,
        batch_size: int,
        *,
        epochs: int | None = 1,
        shuffle: bool = True,
        seed: int = 0,
        name: str = "array",
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if data.ndim != 2:
            raise DataError(
                f"{name}: activations must be a 2-D (rows, d) array, got shape {tuple(data.shape)}"
            )
        if data.shape[0] == 0 or data.shape[1] == 0:
            raise DataError(f"{name} holds no activations (shape {tuple(data.shape)})")
        if not _is_float(data):
            raise DataError(f"{name}: activations must be floating point, got {data.dtype}")
        if batch_size < 1:
            raise DataError(f"batch_size must be at least 1, got {batch_size}")
        if batch_size % world_size:
            raise DataError(
                f"batch_size={batch_size} cannot be split evenly over {world_size} data-parallel ranks; "
                "choose a batch size divisible by the world size"
            )
        self.data = data
        self.batch_size = batch_size
        self.epochs = epochs
        self.shuffle = shuffle
        self.seed = seed
        self.name = name
        self.d_in = int(data.shape[1])
        self.n_rows = int(data.shape[0])
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.position = 0

    def __len__(self) -> int:
        """Batches per epoch."""
        return -(-self.n_rows // self.batch_size)

    @property
    def total_batches(self) -> int | None:
        """Batches over all epochs (None when epochs are unbounded)."""
        return len(self) * self.epochs if self.epochs is not None else None

    def _order(self, epoch: int) -> Tensor:
        if not self.shuffle:
            return torch.arange(self.n_rows)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n_rows, generator=generator)

    def _rows(self, index: Tensor) -> Tensor:
        if isinstance(self.data, Tensor):
            return self.data.index_select(0, index.to(self.data.device))
        # numpy / memmap: sorted fancy indexing reads each page once.
        sorted_index, inverse = index.sort()
        rows = torch.from_numpy(np.ascontiguousarray(self.data[sorted_index.numpy()]))
        out = torch.empty_like(rows)
        out[inverse] = rows
        return out

    def __iter__(self) -> Iterator[Tensor]:
        while self.epochs is None or self.epoch < self.epochs:
            order = self._order(self.epoch)
            while self.position < self.n_rows:
                index = order[self.position : self.position + self.batch_size]
                self.position += index.numel()
                if self.world_size > 1:
                    index = index.tensor_split(self.world_size)[self.rank]
                yield self._rows(index)
            self.epoch += 1
            self.position = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "n_rows": self.n_rows,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("n_rows") != self.n_rows or state.get("seed") != self.seed:
            raise DataError(
                f"{self.name}: the checkpoint was written for {state.get('n_rows')} rows with seed "
                f"{state.get('seed')}, but this data has {self.n_rows} rows with seed {self.seed}; "
                "resume with the same data and data_seed"
            )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def _is_float(data: Tensor | np.ndarray) -> bool:
    if isinstance(data, Tensor):
        return data.is_floating_point()
    return np.issubdtype(data.dtype, np.floating)


def open_array(path: str | Path, key: str | None = None) -> Tensor | np.ndarray:
    """A 2-D activation array from ``.npy`` (memory-mapped) or ``.safetensors`` (one tensor)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"activation file not found: {path}")
    if path.suffix == ".npy":
        try:
            return np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, EOFError) as err:  # EOFError: an empty file
            if path.stat().st_size == 0:
                raise DataError(f"{path} is empty (0 bytes): write the activations again") from err
            raise DataError(
                f"{path} is not a readable .npy array ({err}); the file may be truncated"
            ) from err
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                keys = list(handle.keys())
                if key is None:
                    if len(keys) != 1:
                        raise DataError(
                            f"{path} holds tensors {keys}; choose one with --tensor_key"
                        )
                    key = keys[0]
                if key not in keys:
                    raise DataError(f"{path} has no tensor {key!r}; it holds {keys}")
                return handle.get_tensor(key)
        except SafetensorError as err:
            raise DataError(
                f"{path} is not a readable safetensors file ({err}); it may be truncated"
            ) from err
    raise DataError(
        f"{path}: unsupported activation file type {path.suffix!r}; use .npy or .safetensors, or --cache DIR"
    )


def batches_of(iterable: Iterable[Tensor]) -> Iterator[Tensor]:
    """Iterate a plain iterable of batches, checking each is a 2-D float tensor."""
    for i, batch in enumerate(iterable):
        if not isinstance(batch, Tensor) or batch.ndim != 2:
            shape = tuple(batch.shape) if isinstance(batch, Tensor) else type(batch).__name__
            raise DataError(f"batch {i} is not a (batch, d) tensor: {shape}")
        yield batch
