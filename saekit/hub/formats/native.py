"""saekit's own format: ``<folder>/cfg.json`` + ``sae.safetensors`` (see ``saekit.dictionaries.io``),
plus an optional ``latent_stats.safetensors`` of per-latent statistics kept from another format."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ...dictionaries.base import expected_shapes
from ...dictionaries.io import CONFIG_FILE, FORMAT_NAME, WEIGHTS_FILE, read_config
from ..errors import FormatError
from .common import (
    Converted,
    DictionaryFormat,
    FilePlan,
    get_int,
    read_safetensors,
    safetensors_names,
)

LATENT_STATS_FILE = "latent_stats.safetensors"


def identify(config: dict[str, Any]) -> bool:
    return config.get("format") == FORMAT_NAME


def plan(
    config: dict[str, Any], names: Mapping[str, int | None], weights_file: str | None
) -> FilePlan:
    d_in = get_int(config, "d_in", CONFIG_FILE)
    d_sae = get_int(config, "d_sae", CONFIG_FILE)
    return FilePlan(
        required=(CONFIG_FILE, WEIGHTS_FILE),
        optional=(LATENT_STATS_FILE,),
        numel=2 * d_sae * d_in + 2 * d_sae + d_in,
    )


def convert(
    config: dict[str, Any], paths: dict[str, Path], allow_pickle: bool, where: str
) -> Converted:
    try:
        cfg, records = read_config(paths[CONFIG_FILE].parent)
    except ValueError as err:
        raise FormatError(str(err)) from err
    tensors = read_safetensors(paths[WEIGHTS_FILE], expected_shapes(cfg))
    stats = {}
    if LATENT_STATS_FILE in paths:
        file = paths[LATENT_STATS_FILE]
        stats = read_safetensors(file, {name: (cfg.d_sae,) for name in safetensors_names(file)})
    return Converted(cfg, tensors, latent_stats=stats, records=records)


FORMAT = DictionaryFormat(
    name="saekit",
    library="saekit",
    config_file=CONFIG_FILE,
    identify=identify,
    plan=plan,
    convert=convert,
)
