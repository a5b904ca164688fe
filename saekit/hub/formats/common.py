"""What every format reader shares: the converted result, the file plan, config helpers."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from ...dictionaries import SAEConfig
from ...dictionaries.io import read_tensors
from ..errors import FormatError

STORAGE_DTYPES = {
    torch.float32: "float32",
    torch.float64: "float32",  # saekit stores at most float32; conversions are exact in float64
    torch.bfloat16: "bfloat16",
    torch.float16: "float16",
}


@dataclass
class Converted:
    """A dictionary read from some format, in saekit's layout, before it is built."""

    cfg: SAEConfig
    tensors: dict[str, torch.Tensor]
    """The weights that ``dictionary_from_tensors`` expects, already checked against ``cfg``."""
    latent_stats: dict[str, torch.Tensor] = field(default_factory=dict)
    """Per-latent statistics shipped beside the weights, each (d_sae,): sdxl-unbox's ``mean`` and
    ``std`` of every feature's activation, which its authors use to scale interventions."""
    notes: list[str] = field(default_factory=list)
    """What the conversion did (folds, settings it relied on), kept with the provenance."""
    records: dict[str, Any] = field(default_factory=dict)
    """saekit's own ``training`` and ``metrics`` records, when the source is a saekit dictionary."""


@dataclass(frozen=True)
class FilePlan:
    """The files of one dictionary that a conversion reads."""

    required: tuple[str, ...]
    optional: tuple[str, ...] = ()
    numel: int = 0
    """Values that the weight files hold together, per the config: the basis of the size limit."""


@dataclass(frozen=True)
class DictionaryFormat:
    name: str
    library: str
    """The library (or release) that writes this format, for messages and model cards."""
    config_file: str
    identify: Callable[[dict[str, Any]], bool]
    """True when a parsed config file is this format's."""
    plan: Callable[[dict[str, Any], Mapping[str, int | None], str | None], FilePlan]
    """(config, files in the folder -> size, weights file asked for) -> the files to read."""
    convert: Callable[[dict[str, Any], dict[str, Path], bool, str], Converted]
    """(config, local paths of the planned files, allow_pickle, where) -> the dictionary."""


# ----------------------------------------------------------------------------- config helpers


def get_int(config: Mapping[str, Any], key: str, where: str, *, default: int | None = None) -> int:
    """A positive integer field of a foreign config."""
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise FormatError(f"{where}: {key} must be a positive integer, got {value!r}")
    return value


def get_text(config: Mapping[str, Any], key: str, where: str) -> str | None:
    """An optional string field of a foreign config (a model name, a hook name)."""
    value = config.get(key)
    if value is not None and not isinstance(value, str):
        raise FormatError(f"{where}: {key} must be a string, got {value!r}")
    return value


def get_flag(config: Mapping[str, Any], key: str, where: str, default: bool = False) -> bool:
    value = config.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise FormatError(f"{where}: {key} must be true or false, got {value!r}")
    return value


def storage_dtype(tensor: torch.Tensor) -> str:
    return STORAGE_DTYPES.get(tensor.dtype, "float32")


def finish(tensors: dict[str, torch.Tensor], dtype: str) -> dict[str, torch.Tensor]:
    """Contiguous copies in the storage dtype (folds are computed in float64 before this)."""
    target = getattr(torch, dtype)
    return {name: t.detach().to(target).contiguous() for name, t in tensors.items()}


def make_config(where: str, **fields: Any) -> SAEConfig:
    """An SAEConfig from converted fields; contradictions (k > d_sae, ...) name the source."""
    try:
        return SAEConfig(**fields)
    except ValueError as err:
        raise FormatError(f"{where}: {err}") from err


def read_safetensors(file: Path, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Exactly the named tensors of a safetensors file: the size, names, shapes and dtypes are checked
    against ``shapes`` (what the config implies) from the header, before any data is read."""
    try:
        return read_tensors(file, shapes)
    except ValueError as err:
        raise FormatError(str(err)) from err


def safetensors_names(file: Path) -> set[str]:
    """The tensor names in a safetensors header (nothing else is read)."""
    try:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            return set(handle.keys())
    except SafetensorError as err:
        raise FormatError(
            f"{file} is not a readable safetensors file ({err}); it may be truncated or corrupt: "
            "fetch it again"
        ) from err


ROW_BLOCK = 8192
"""Rows per block of the float64 folds: 8192 rows of width 4096 are 256 MiB in float64."""


def row_dot(W: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``W @ v`` (m,) in float64, a block of rows at a time; ``W`` (m, d) stays in its dtype."""
    return torch.cat(
        [W[i : i + ROW_BLOCK].double() @ v.double() for i in range(0, len(W), ROW_BLOCK)]
    )


def row_norms(W: torch.Tensor) -> torch.Tensor:
    """The (m,) float64 norms of the rows of ``W`` (m, d)."""
    return torch.cat(
        [W[i : i + ROW_BLOCK].double().norm(dim=1) for i in range(0, len(W), ROW_BLOCK)]
    )


def scale_rows(W: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Row i of ``W`` (m, d) times ``scale[i]``, computed in float64, returned in ``W``'s dtype."""
    out = torch.empty(W.shape, dtype=W.dtype)
    for i in range(0, len(W), ROW_BLOCK):
        out[i : i + ROW_BLOCK] = W[i : i + ROW_BLOCK].double() * scale[i : i + ROW_BLOCK, None]
    return out
