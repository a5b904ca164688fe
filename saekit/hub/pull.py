"""``saekit pull``: fetch a pretrained dictionary and write it as a saekit dictionary folder.

The result is ``<output_dir>/<name>/cfg.json + sae.safetensors`` (plus ``latent_stats.safetensors``
when the source ships per-latent statistics) and an updated ``<output_dir>/index.json``: the same
layout ``saekit train`` writes, so the steering and eval commands read it like their own. The
config names the model, hookpoint and capture target (from the release registry when the source
is a release), and its ``training.imported`` record says where the weights came from.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import save

from .._io import atomic_write_bytes
from ..dictionaries import SAEConfig, read_index, save_dictionary, write_index
from ..dictionaries.io import CONFIG_FILE, INDEX_FILE, read_config
from .formats.native import LATENT_STATS_FILE
from .load import Origin, Pretrained, load_pretrained
from .safety import check_name


@dataclass(frozen=True)
class Pulled:
    path: Path
    """The dictionary's folder."""
    cfg: SAEConfig
    origin: Origin


def folder_name(pretrained: Pretrained) -> str:
    """The folder a pulled dictionary is written to: its hookpoint, else where it came from."""
    cfg, origin = pretrained.sae.cfg, pretrained.origin
    name = cfg.hookpoint or (origin.path if origin.repo_id else None) or Path(origin.source).name
    return check_name((name or "dictionary").replace("/", "--"), "dictionary folder")


def pull(
    source: str,
    hookpoint: str | None = None,
    *,
    output_dir: str | Path,
    overwrite: bool = False,
    **load_kwargs: Any,
) -> Pulled:
    """Load ``source`` (see :func:`saekit.hub.load_pretrained`) and save it under ``output_dir``."""
    output_dir = Path(output_dir)
    pretrained = load_pretrained(source, hookpoint, **load_kwargs)
    target = output_dir / folder_name(pretrained)
    if (target / CONFIG_FILE).exists() and not overwrite:
        raise FileExistsError(
            f"{target} already holds a dictionary; pass --overwrite to replace it (nothing was changed)"
        )
    training = dict(pretrained.records.get("training") or {})
    training["imported"] = pretrained.origin.record()
    save_dictionary(
        pretrained.sae, target, training=training, metrics=pretrained.records.get("metrics")
    )
    stats_file = target / LATENT_STATS_FILE
    if pretrained.latent_stats:
        tensors = {k: v.contiguous() for k, v in pretrained.latent_stats.items()}
        atomic_write_bytes(stats_file, save(tensors, metadata={"format": "pt"}))
    elif stats_file.exists():  # left by an overwritten dictionary: it would not match this one
        stats_file.unlink()
    _add_to_index(output_dir, target.name, pretrained.sae.cfg)
    return Pulled(target, pretrained.sae.cfg, pretrained.origin)


def _add_to_index(root: Path, name: str, cfg: SAEConfig) -> None:
    """Write ``root/index.json`` listing ``name`` beside the dictionaries it already listed."""
    entries: dict[str, SAEConfig] = {}
    if (root / INDEX_FILE).is_file():
        for entry in read_index(root):
            if entry["path"] != name and (root / entry["path"] / CONFIG_FILE).is_file():
                entries[entry["path"]] = read_config(root / entry["path"])[0]
    entries[name] = cfg
    write_index(root, entries)
