"""The activation cache: stream hookpoint activations of any model to disk, read them back
shuffled.

* :func:`cache_activations` runs a model (through its adapter) over inputs with hooks on named
  modules and writes per-token rows into shuffled, write-once safetensors shards with a
  manifest (resumable, refuses a directory of another config, stops cleanly on a full disk,
  shards across ranks).
* :class:`CacheReader` streams shuffled ``(batch, d)`` batches from a cache, resumably; it is
  the trainer's source for ``saekit train --cache DIR``.
* :func:`open_cache` / :func:`merge_cache` present one run, or the ranks of a sharded run, as
  one cache.

The cache imports adapters (to drive them) but never the trainer.
"""

from .capture import ActivationCapture, Hookpoint, resolve_hookpoints
from .config import CacheConfig, InputConfig
from .disk import InsufficientDiskError
from .inputs import (
    BadInput,
    DatasetInputs,
    ImageFolder,
    ImagePromptPairs,
    InputSource,
    PromptFile,
    PromptList,
    TensorInputs,
    as_input_source,
)
from .manifest import Manifest, MergedManifest, load_manifest
from .merge import CacheView, merge_cache, open_cache
from .pipeline import CacheResult, cache_activations
from .reader import CacheBatch, CacheReader, open_training_source
from .rows import COLUMNS, RowFilter
from .shards import CacheError
from .writer import DiskFullError


def open_inputs(cfg: InputConfig) -> InputSource:
    """The input source an :class:`InputConfig` names."""
    from ..configuration import ConfigError

    if cfg.images:
        return ImageFolder(cfg.images)
    if cfg.prompts:
        return PromptFile(cfg.prompts)
    if cfg.pairs:
        return ImagePromptPairs(cfg.pairs)
    if cfg.tensors:
        return TensorInputs.from_file(cfg.tensors, cfg.tensor_key)
    raise ConfigError("no inputs: give data.images, data.prompts, data.pairs or data.tensors")


__all__ = [
    "COLUMNS",
    "ActivationCapture",
    "BadInput",
    "CacheBatch",
    "CacheConfig",
    "CacheError",
    "CacheReader",
    "CacheResult",
    "CacheView",
    "DatasetInputs",
    "DiskFullError",
    "Hookpoint",
    "ImageFolder",
    "ImagePromptPairs",
    "InputConfig",
    "InputSource",
    "InsufficientDiskError",
    "Manifest",
    "MergedManifest",
    "PromptFile",
    "PromptList",
    "RowFilter",
    "TensorInputs",
    "as_input_source",
    "cache_activations",
    "load_manifest",
    "merge_cache",
    "open_cache",
    "open_inputs",
    "open_training_source",
    "resolve_hookpoints",
]
