"""What a caching run feeds the model: image folders, prompt files, JSONL image+prompt pairs,
tensors and datasets in memory.

Every input has a stable id (its index in the source), recorded with each of its rows, so a
row can be traced back to its image or prompt, and a sharded run can split the inputs between
ranks by id. A bad input (an unreadable image, an empty prompt, a broken JSONL line) is
reported and skipped, and counted by reason: it never stops a long run.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from abc import ABC, abstractmethod
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xxhash
from torch import Tensor

from .._optional import require
from ..adapters.base import InputBatch, Sample
from ..configuration import ConfigError
from ..sources import open_array

log = logging.getLogger("saekit.cache")

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


class BadInput(Exception):
    """One input cannot be used; the run skips it and counts it under ``reason``."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class InputSource(ABC):
    """A sized collection of inputs, loaded one at a time by index."""

    description: str = "inputs"

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def load(self, index: int) -> Sample:
        """Input ``index`` (raise :class:`BadInput` when it cannot be used)."""

    @abstractmethod
    def fingerprint(self) -> str:
        """A digest of the inputs: a resumed run must see the same ones."""


def _load_image(path: Path) -> Any:
    image_module = require("PIL.Image", "image inputs")
    try:
        with image_module.open(path) as image:
            return image.convert("RGB")  # decodes the whole file: truncation shows here
    except (OSError, ValueError, SyntaxError, image_module.DecompressionBombError) as err:
        raise BadInput("unreadable_image", f"{path}: cannot read image ({err})") from err


class ImageFolder(InputSource):
    """Every image file under ``root`` (recursively), in sorted path order."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise ConfigError(f"image folder {self.root} does not exist or is not a directory")
        self.paths = sorted(
            p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
        )
        if not self.paths:
            raise ConfigError(
                f"image folder {self.root} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})"
            )
        self.description = f"{len(self.paths)} images in {self.root}"

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> Sample:
        path = self.paths[index]
        return Sample(index, image=_load_image(path), source=str(path))

    def fingerprint(self) -> str:
        digest = xxhash.xxh3_64()
        for path in self.paths:
            digest.update(f"{path.relative_to(self.root)}:{path.stat().st_size}\n".encode())
        return digest.hexdigest()


def _file_digest(path: Path) -> str:
    digest = xxhash.xxh3_64()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


class PromptFile(InputSource):
    """One prompt a line; the input id is the 0-based line number."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.lines = self.path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            raise ConfigError(f"prompt file {self.path} not found") from None
        except UnicodeDecodeError as err:
            raise ConfigError(f"prompt file {self.path} is not UTF-8 text ({err})") from err
        if not self.lines:
            raise ConfigError(f"prompt file {self.path} is empty")
        self.description = f"{len(self.lines)} prompts in {self.path}"

    def __len__(self) -> int:
        return len(self.lines)

    def load(self, index: int) -> Sample:
        prompt = self.lines[index].strip()
        where = f"{self.path}:{index + 1}"
        if not prompt:
            raise BadInput("empty_prompt", f"{where}: empty prompt")
        return Sample(index, prompt=prompt, source=where)

    def fingerprint(self) -> str:
        return _file_digest(self.path)


class ImagePromptPairs(InputSource):
    """A JSONL file of ``{"image": PATH, "prompt": TEXT}`` lines; image paths are relative to
    the JSONL file's folder."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.lines = self.path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            raise ConfigError(f"pairs file {self.path} not found") from None
        if not self.lines:
            raise ConfigError(f"pairs file {self.path} is empty")
        self.description = f"{len(self.lines)} image+prompt pairs in {self.path}"

    def __len__(self) -> int:
        return len(self.lines)

    def load(self, index: int) -> Sample:
        where = f"{self.path}:{index + 1}"
        try:
            record = json.loads(self.lines[index])
        except json.JSONDecodeError as err:
            raise BadInput("bad_record", f"{where}: not a JSON object ({err})") from err
        if not isinstance(record, dict) or not isinstance(record.get("image"), str):
            raise BadInput("bad_record", f'{where}: needs {{"image": PATH, "prompt": TEXT}}')
        prompt = str(record.get("prompt") or "").strip()
        if not prompt:
            raise BadInput("empty_prompt", f"{where}: empty prompt")
        image = _load_image(self.path.parent / record["image"])
        return Sample(index, image=image, prompt=prompt, source=where)

    def fingerprint(self) -> str:
        return _file_digest(self.path)


class TensorInputs(InputSource):
    """Rows of a tensor (token ids, preprocessed images, ...): input ``i`` is ``data[i]``."""

    def __init__(self, data: Tensor | np.ndarray, name: str = "tensor") -> None:
        if data.ndim < 1 or data.shape[0] == 0:
            raise ConfigError(f"{name} holds no inputs (shape {tuple(data.shape)})")
        self.data = data
        self.description = f"{data.shape[0]} tensors of shape {tuple(data.shape[1:])} ({name})"

    @classmethod
    def from_file(cls, path: str | Path, key: str | None = None) -> TensorInputs:
        """From a ``.npy`` (memory-mapped) or ``.safetensors`` file; the first dim is inputs."""
        return cls(open_array(path, key), name=str(path))

    def __len__(self) -> int:
        return int(self.data.shape[0])

    def load(self, index: int) -> Sample:
        row = self.data[index]
        tensor = row if isinstance(row, Tensor) else torch.from_numpy(np.array(row))
        return Sample(index, tensor=tensor, source=f"row {index}")

    def fingerprint(self) -> str:
        data = self.data
        raw = data.contiguous().view(-1) if isinstance(data, Tensor) else None
        digest = xxhash.xxh3_64(f"{tuple(data.shape)}:{data.dtype}".encode())
        if raw is not None:
            digest.update(raw.view(torch.uint8).numpy().tobytes() if raw.numel() else b"")
        else:
            digest.update(np.ascontiguousarray(data).tobytes())
        return digest.hexdigest()


class PromptList(InputSource):
    """Prompts given in Python."""

    def __init__(self, prompts: Sequence[str]) -> None:
        self.prompts = list(prompts)
        self.description = f"{len(self.prompts)} prompts"

    def __len__(self) -> int:
        return len(self.prompts)

    def load(self, index: int) -> Sample:
        prompt = str(self.prompts[index]).strip()
        if not prompt:
            raise BadInput("empty_prompt", f"prompt {index} is empty")
        return Sample(index, prompt=prompt, source=f"prompt {index}")

    def fingerprint(self) -> str:
        return xxhash.xxh3_64_hexdigest("\n".join(self.prompts).encode())


class DatasetInputs(InputSource):
    """A map-style dataset (``len`` and ``[i]``): items that are tensors, strings (prompts), PIL
    images, or mappings with ``image`` / ``prompt`` / ``tensor`` keys.

    Its content is not hashed (it may be large or lazy): give ``fingerprint`` to make a resumed
    run check that the data is the same.
    """

    def __init__(self, dataset: Any, fingerprint: str | None = None) -> None:
        self.dataset = dataset
        self._fingerprint = fingerprint or f"{type(dataset).__name__}:{len(dataset)}"
        self.description = f"{len(dataset)} items of {type(dataset).__name__}"

    def __len__(self) -> int:
        return len(self.dataset)

    def load(self, index: int) -> Sample:
        try:
            item = self.dataset[index]
        except Exception as err:  # a dataset's own error for one item must not end the run
            raise BadInput("unreadable_item", f"item {index}: {type(err).__name__}: {err}") from err
        if isinstance(item, tuple) and item:
            item = item[0]  # (input, label) pairs of torchvision-style datasets
        if isinstance(item, np.ndarray):
            item = torch.from_numpy(item)
        if isinstance(item, Tensor):
            return Sample(index, tensor=item, source=f"item {index}")
        if isinstance(item, str):
            if not item.strip():
                raise BadInput("empty_prompt", f"item {index}: empty prompt")
            return Sample(index, prompt=item.strip(), source=f"item {index}")
        if isinstance(item, dict):
            prompt = item.get("prompt")
            if prompt is not None and not str(prompt).strip():
                raise BadInput("empty_prompt", f"item {index}: empty prompt")
            return Sample(
                index,
                image=item.get("image"),
                prompt=str(prompt).strip() if prompt is not None else None,
                tensor=item.get("tensor"),
                source=f"item {index}",
            )
        if hasattr(item, "convert"):  # a PIL image
            return Sample(index, image=item.convert("RGB"), source=f"item {index}")
        raise BadInput("unreadable_item", f"item {index}: unsupported type {type(item).__name__}")

    def fingerprint(self) -> str:
        return self._fingerprint


def as_input_source(data: Any) -> InputSource:
    """Wrap what a Python caller passes: an InputSource, a tensor/array, a list of prompts,
    or a map-style dataset."""
    if isinstance(data, InputSource):
        return data
    if isinstance(data, (Tensor, np.ndarray)):
        return TensorInputs(data)
    if isinstance(data, (list, tuple)) and data and all(isinstance(p, str) for p in data):
        return PromptList(data)
    if hasattr(data, "__len__") and hasattr(data, "__getitem__"):
        return DatasetInputs(data)
    raise TypeError(
        f"cannot feed {type(data).__name__} to a caching run: give a tensor, a list of prompts, "
        "a map-style dataset, or an InputSource (ImageFolder, PromptFile, ImagePromptPairs)"
    )


# ----------------------------------------------------------------------------- batching


@dataclass
class SkipReport:
    """Inputs skipped so far, by reason, with the first few messages."""

    counts: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)

    def add(self, bad: BadInput) -> None:
        self.counts[bad.reason] = self.counts.get(bad.reason, 0) + 1
        total = sum(self.counts.values())
        if len(self.examples) < 5:
            self.examples.append(str(bad))
        if total <= 10:
            log.warning("skipped input: %s", bad)
        elif total in (11, 100, 1000) or total % 10_000 == 0:
            log.warning("%d inputs skipped so far (%s)", total, self.summary())

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        return ", ".join(f"{n} {reason.replace('_', ' ')}" for reason, n in self.counts.items())


def rank_indices(n_inputs: int, rank: int, world_size: int) -> range:
    """The inputs of one rank: every ``world_size``-th id starting at ``rank``."""
    return range(rank, n_inputs, world_size)


@dataclass
class LoadedBatch:
    """One batch of usable inputs, with where the run stands after it."""

    index: int
    """Batch index within this rank's inputs."""
    batch: InputBatch
    inputs_done: int
    """This rank's inputs consumed after this batch (skipped ones included)."""


def iter_batches(
    source: InputSource,
    indices: range,
    batch_size: int,
    skips: SkipReport,
    *,
    start_batch: int = 0,
    prefetch: int = 2,
) -> Generator[LoadedBatch, None, None]:
    """Batches of ``indices`` from ``start_batch`` on, loaded by a background thread (image
    decoding overlaps the model). A batch whose every input was bad is skipped."""
    slots: queue.Queue[Any] = queue.Queue(maxsize=prefetch)
    stop = threading.Event()

    def load() -> None:
        try:
            for b in range(start_batch, -(-len(indices) // batch_size)):
                chunk = indices[b * batch_size : (b + 1) * batch_size]
                samples, bad = [], []
                for i in chunk:
                    try:
                        samples.append(source.load(i))
                    except BadInput as err:
                        bad.append(err)
                item = (b, samples, bad, min(len(indices), (b + 1) * batch_size))
                while not stop.is_set():
                    try:
                        slots.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            slots.put(None)
        except BaseException as err:
            slots.put(err)

    thread = threading.Thread(target=load, name="cache-inputs", daemon=True)
    thread.start()
    try:
        while True:
            item = slots.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            b, samples, bad, done = item
            for err in bad:
                skips.add(err)
            if samples:
                yield LoadedBatch(b, InputBatch(samples), done)
    finally:
        stop.set()
