"""Typed configuration of a caching run (drives ``saekit cache``, its YAML files and the
manifest's record of what determined the rows)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..adapters.base import Capture
from ..configuration import ConfigError, to_dict
from ..dictionaries.config import StorageDtype
from .rows import RowFilter


@dataclass
class InputConfig:
    """What to feed the model: exactly one of images, prompts, pairs, tensors."""

    images: str | None = None
    """A folder of images (searched recursively; sorted by path)."""

    prompts: str | None = None
    """A text file with one prompt a line."""

    pairs: str | None = None
    """A JSONL file of {"image": PATH, "prompt": TEXT} lines (paths relative to the file)."""

    tensors: str | None = None
    """A .npy or .safetensors file whose first dimension indexes the inputs (token ids,
    preprocessed images, ...)."""

    tensor_key: str | None = None
    """The tensor to read from a .safetensors file holding several."""

    limit: int = 0
    """Use only the first `limit` inputs; 0 uses all."""

    def __post_init__(self) -> None:
        given = [k for k in ("images", "prompts", "pairs", "tensors") if getattr(self, k)]
        if len(given) > 1:
            raise ConfigError(f"give one kind of input, not {' and '.join(given)}")
        if self.limit < 0:
            raise ConfigError(f"limit must not be negative, got {self.limit}")

    @property
    def given(self) -> bool:
        return any(getattr(self, k) for k in ("images", "prompts", "pairs", "tensors"))


@dataclass
class CacheConfig:
    """A caching run: which model, which hookpoints, which inputs, how the rows are stored."""

    model: str | None = None
    """The model: a hub id or local path for a family adapter, or 'package.module:factory' for
    a custom model (a function returning an nn.Module or a ModelAdapter)."""

    adapter: str = "auto"
    """The model family's adapter (custom, ...); auto picks it from the model's name."""

    revision: str | None = None
    """Revision (branch, tag or commit) of the model."""

    model_options: dict[str, Any] = field(default_factory=dict)
    """Settings of the model family's adapter, e.g. diffusion: num_inference_steps,
    guidance_scale, seed, negative_prompt, pipeline_kwargs; vlm: prompt_template,
    default_prompt; clip, vlm, transformers: keep_padding; a custom factory: its arguments."""

    local_files_only: bool = False
    """Load the model from local files only (a folder or the Hugging Face cache);
    HF_HUB_OFFLINE=1 does the same."""

    trust_remote_code: bool = False
    """Allow running Python code shipped in the model's repository (transformers/diffusers
    remote code). Off: turn it on only for repositories you trust."""

    hookpoints: list[str] = field(default_factory=list)
    """Module paths (model.named_modules(); fnmatch patterns allowed), each optionally with
    @output, @input or @update (output - input) to override `capture`."""

    capture: Capture = "output"
    """What a hook captures unless its hookpoint says otherwise: the module's output, its
    input, or its update (output - input)."""

    output_dir: str = "runs/cache"
    """The cache directory. A directory written by a different config is refused."""

    dtype: StorageDtype = "bfloat16"
    """Storage dtype of the rows."""

    batch_size: int = 32
    """Inputs per forward pass."""

    rows_per_shard: int = 65_536
    """Rows per shard file (per hookpoint)."""

    shuffle_buffer_rows: int = 524_288
    """Rows per hookpoint shuffled together before they are written (neighbouring tokens are
    correlated). Memory: about two buffers of every hookpoint, in the storage dtype."""

    seed: int = 0
    """Seed of the shuffle."""

    rows: RowFilter = field(default_factory=RowFilter)

    early_stop: bool = True
    """Stop each forward pass once the deepest hookpoint has fired (rows are identical)."""

    device: str = "auto"
    """cpu, cuda, cuda:1, ... or auto (cuda:LOCAL_RANK when available, else cpu)."""

    model_dtype: StorageDtype = "float32"
    """Dtype the model runs in."""

    disk_check: bool = True
    """Refuse to start when the estimated size of the cache exceeds the free disk space."""

    progress: bool = True
    """Show a progress bar (rank 0 only)."""

    verify: bool = False
    """On a rerun, read every shard and check every checksum before trusting it (by default
    sizes and headers are checked, and checksums too for caches under 256 MB); damaged shards
    are written again."""

    data: InputConfig = field(default_factory=InputConfig)

    def __post_init__(self) -> None:
        for name in ("batch_size", "rows_per_shard", "shuffle_buffer_rows"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.shuffle_buffer_rows < self.rows_per_shard:
            raise ConfigError(
                f"shuffle_buffer_rows ({self.shuffle_buffer_rows}) must be at least rows_per_shard "
                f"({self.rows_per_shard}): rows are shuffled within the buffer before sharding"
            )


# Fields that do not change which rows the cache holds: a run may be resumed with them changed.
NON_CONTENT_FIELDS = (
    "output_dir",
    "early_stop",
    "device",
    "disk_check",
    "progress",
    "verify",
    "local_files_only",
    "trust_remote_code",
)


def content_config(cfg: CacheConfig) -> dict[str, Any]:
    """The part of ``cfg`` that determines the cache's rows (recorded in the manifest)."""
    data = to_dict(cfg)
    for name in NON_CONTENT_FIELDS:
        data.pop(name)
    return data
