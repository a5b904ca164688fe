"""Readers for the dictionary formats that saekit loads, and the detection that picks one.

Each format module turns its library's config and weights into saekit's own layout: ``W_enc``
(d_sae, d_in) and ``W_dec`` (d_sae, d_in) one row per latent, ``b_enc`` (d_sae), ``b_dec`` (d_in),
and ``threshold`` (d_sae) for JumpReLU, with the encoder ``pre = (x - b_dec) @ W_enc.T + b_enc``.
Where a library computes something else (no ``b_dec`` subtraction, activations rescaled by decoder
norms, ...), the difference is folded into the weights so that saekit's encode and decode give
that library's outputs to float tolerance; what cannot be folded exactly (per-input layer norm,
gated encoders, transcoders) is refused with a message that says so.

A format is described by a :class:`DictionaryFormat`: the config file it is recognised by, which
files it needs (so that only those are downloaded), and the conversion.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import FormatError
from . import native, prisma, saelens, sdxl_unbox, sparsify
from .common import Converted, DictionaryFormat, FilePlan

# Formats sharing a config file name (cfg.json: saekit, SAELens, sparsify) are told apart by
# identify(), which looks at the keys each library writes.
FORMATS: dict[str, DictionaryFormat] = {
    f.name: f
    for f in (native.FORMAT, saelens.FORMAT, sparsify.FORMAT, sdxl_unbox.FORMAT, prisma.FORMAT)
}
CONFIG_FILES = tuple(dict.fromkeys(f.config_file for f in FORMATS.values()))


def identify(
    configs: Mapping[str, dict[str, Any]], where: str, forced: str | None = None
) -> DictionaryFormat:
    """The format whose config is among ``configs`` (file name -> parsed JSON)."""
    if forced is not None:
        if forced not in FORMATS:
            raise FormatError(f"unknown format {forced!r}; saekit reads {', '.join(FORMATS)}")
        fmt = FORMATS[forced]
        if fmt.config_file not in configs:
            raise FormatError(f"{where} has no {fmt.config_file}, which the {forced} format needs")
        return fmt
    for fmt in FORMATS.values():
        config = configs.get(fmt.config_file)
        if config is not None and fmt.identify(config):
            return fmt
    described = "; ".join(f"{name} has keys {sorted(cfg)[:12]}" for name, cfg in configs.items())
    raise FormatError(
        f"{where} is not a dictionary in a format saekit reads ({', '.join(FORMATS)}): {described}. "
        "If you know its format, pass format=... (CLI: --format)."
    )


__all__ = ["CONFIG_FILES", "FORMATS", "Converted", "DictionaryFormat", "FilePlan", "identify"]
