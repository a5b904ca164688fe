"""Saving and loading saekit dictionaries: ``<dir>/cfg.json`` + ``<dir>/sae.safetensors``.

The same per-folder layout as EleutherAI sparsify (one folder per hookpoint), plus an
``index.json`` at the root of a multi-dictionary folder. Loading checks the config and every
tensor's name, shape and dtype before building anything, and never unpickles.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from .._io import atomic_write_bytes, atomic_write_json, read_json
from ..configuration import ConfigError, from_dict, to_dict
from .base import SparseAutoencoder, expected_shapes
from .batchtopk import BatchTopKSAE
from .config import FORMAT_VERSION, SAEConfig
from .jumprelu import JumpReLUSAE
from .relu import ReLUSAE
from .topk import TopKSAE

CONFIG_FILE = "cfg.json"
WEIGHTS_FILE = "sae.safetensors"
INDEX_FILE = "index.json"
FORMAT_NAME = "saekit"

ARCHITECTURES: dict[str, type[SparseAutoencoder]] = {
    "topk": TopKSAE,
    "batchtopk": BatchTopKSAE,
    "jumprelu": JumpReLUSAE,
    "relu": ReLUSAE,
}
# Keys of cfg.json that are not SAEConfig fields.
_ENVELOPE = ("format", "format_version", "training", "metrics")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_dictionary(cfg: SAEConfig, device: torch.device | str | None = None) -> SparseAutoencoder:
    """A freshly initialised dictionary of the configured architecture."""
    return ARCHITECTURES[cfg.architecture](cfg, device=device)


def dictionary_tensors(sae: SparseAutoencoder) -> dict[str, torch.Tensor]:
    tensors = {
        "W_enc": sae.W_enc.detach(),
        "b_enc": sae.b_enc.detach(),
        "W_dec": sae.W_dec.detach(),
        "b_dec": sae.b_dec.detach(),
        **sae.extra_tensors(),
    }
    dtype = _DTYPES[sae.cfg.dtype]
    return {name: t.to(dtype=dtype, device="cpu").contiguous() for name, t in tensors.items()}


def save_dictionary(
    sae: SparseAutoencoder,
    path: str | Path,
    *,
    training: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
) -> Path:
    """Write ``sae`` to the folder ``path`` (created if needed); both files are written atomically.

    ``training`` and ``metrics`` are free-form records stored beside the config.
    """
    path = Path(path)
    if sae.architecture == "batchtopk":
        raise ValueError(
            "convert BatchTopK with .for_inference() before saving; it is saved as JumpReLU"
        )
    cfg = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **to_dict(sae.cfg)}
    if training is not None:
        cfg["training"] = training
    if metrics is not None:
        cfg["metrics"] = metrics
    atomic_write_bytes(
        path / WEIGHTS_FILE, save(dictionary_tensors(sae), metadata={"format": "pt"})
    )
    atomic_write_json(path / CONFIG_FILE, cfg)
    return path


def read_config(path: str | Path) -> tuple[SAEConfig, dict[str, Any]]:
    """The SAEConfig in ``path/cfg.json`` and the rest of the file (training and metrics records)."""
    path = Path(path)
    raw = read_json(path / CONFIG_FILE, what="dictionary config")
    if not isinstance(raw, dict):
        raise ValueError(f"{path / CONFIG_FILE} must hold a JSON object")
    if raw.get("format") != FORMAT_NAME:
        raise ValueError(
            f"{path / CONFIG_FILE} is not a saekit dictionary config (its 'format' is "
            f"{raw.get('format')!r}, expected {FORMAT_NAME!r}). Dictionaries of other libraries load "
            "with saekit.load(), which detects their format."
        )
    version = raw.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"{path / CONFIG_FILE} has format_version {version!r}; this saekit reads versions up to "
            f"{FORMAT_VERSION}. Upgrade saekit to load it."
        )
    fields = {k: v for k, v in raw.items() if k not in _ENVELOPE}
    try:
        cfg = from_dict(SAEConfig, fields, where=str(path / CONFIG_FILE))
    except ConfigError as err:
        raise ValueError(str(err)) from err
    if not cfg.d_in or not cfg.d_sae:
        raise ValueError(f"{path / CONFIG_FILE} must give d_in and d_sae")
    return cfg, {k: raw[k] for k in _ENVELOPE if k in raw}


def read_tensors(file: Path, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Load exactly the named tensors of ``file``, checking names, shapes and dtypes first."""
    if not file.is_file():
        raise FileNotFoundError(f"dictionary weights not found: {file}")
    itemsize_max = 8
    limit = sum(torch.Size(s).numel() for s in shapes.values()) * itemsize_max + 10 * 2**20
    if os.path.getsize(file) > limit:
        raise ValueError(
            f"{file} is {os.path.getsize(file)} bytes, far more than its config implies (at most "
            f"{limit}); refusing to load it"
        )
    try:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            names = set(handle.keys())
            missing, extra = sorted(set(shapes) - names), sorted(names - set(shapes))
            if missing or extra:
                raise ValueError(
                    f"{file} does not match its config: missing tensors {missing}, unexpected tensors {extra}"
                )
            tensors = {}
            for name, shape in shapes.items():
                info = handle.get_slice(name)
                got = tuple(info.get_shape())
                if got != shape:
                    raise ValueError(
                        f"{file}: tensor {name} has shape {got}, but the config implies {shape}"
                    )
                if info.get_dtype() not in ("F32", "F16", "BF16", "F64"):
                    raise ValueError(
                        f"{file}: tensor {name} has dtype {info.get_dtype()}, expected a float type"
                    )
                tensors[name] = handle.get_tensor(name)
    except SafetensorError as err:
        raise ValueError(
            f"{file} is not a readable safetensors file ({err}); it may be truncated or corrupt"
        ) from err
    for name, t in tensors.items():
        if not torch.isfinite(t).all():
            raise ValueError(f"{file}: tensor {name} holds NaN or infinite values")
    return tensors


def load_dictionary(
    path: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> SparseAutoencoder:
    """Load a saekit dictionary folder. ``dtype`` overrides the stored dtype."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no dictionary folder at {path}")
    if not (path / CONFIG_FILE).is_file() and (path / INDEX_FILE).is_file():
        names = [entry["path"] for entry in read_index(path)]
        raise ValueError(f"{path} holds several dictionaries; pick one of: {', '.join(names)}")
    cfg, _ = read_config(path)
    tensors = read_tensors(path / WEIGHTS_FILE, expected_shapes(cfg))
    return dictionary_from_tensors(cfg, tensors, device=device, dtype=dtype)


def dictionary_from_tensors(
    cfg: SAEConfig,
    tensors: dict[str, torch.Tensor],
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> SparseAutoencoder:
    """Build a dictionary of ``cfg`` holding the given (already validated) tensors."""
    sae = build_dictionary(cfg, device="meta").to_empty(device=device)
    target = dtype or _DTYPES[cfg.dtype]
    sae.to(target)
    weights = {n: tensors[n] for n in ("W_enc", "b_enc", "W_dec", "b_dec")}
    with torch.no_grad():
        for name, value in weights.items():
            getattr(sae, name).copy_(value)
    sae.load_extra_tensors(
        {n: t.to(device=device, dtype=target) for n, t in tensors.items() if n not in weights}
    )
    return sae


# ----------------------------------------------------------------------------- index


def write_index(root: str | Path, entries: dict[str, SAEConfig]) -> None:
    """Write ``root/index.json`` listing the dictionaries under ``root`` (name -> config)."""
    items = [
        {
            "path": name,
            "hookpoint": cfg.hookpoint,
            "architecture": cfg.architecture,
            "d_in": cfg.d_in,
            "d_sae": cfg.d_sae,
            "k": cfg.k,
            "model": cfg.model,
        }
        for name, cfg in entries.items()
    ]
    atomic_write_json(
        Path(root) / INDEX_FILE,
        {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "dictionaries": items},
    )


def read_index(root: str | Path) -> list[dict[str, Any]]:
    raw = read_json(Path(root) / INDEX_FILE, what="dictionary index")
    if (
        not isinstance(raw, dict)
        or raw.get("format") != FORMAT_NAME
        or not isinstance(raw.get("dictionaries"), list)
    ):
        raise ValueError(f"{Path(root) / INDEX_FILE} is not a saekit index")
    return raw["dictionaries"]


def load_all(root: str | Path, device: torch.device | str = "cpu") -> dict[str, SparseAutoencoder]:
    """Every dictionary listed in ``root/index.json``, by folder name."""
    root = Path(root)
    return {
        entry["path"]: load_dictionary(root / entry["path"], device) for entry in read_index(root)
    }


def replace_config(sae: SparseAutoencoder, **changes: Any) -> None:
    """Update provenance fields of a dictionary's config in place (validated)."""
    sae.cfg = dataclasses.replace(sae.cfg, **changes)
