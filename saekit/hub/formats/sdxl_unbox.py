"""sdxl-unbox (Surkov et al. 2024, "Unpacking SDXL Turbo"): ``config.json`` + ``state_dict.pth``
(+ ``mean.pt`` and ``std.pt``), one folder per SDXL-Turbo transformer block.

``config.json`` holds ``n_dirs_local`` (latents), ``d_model`` (input width), ``k``, ``auxk`` and
``dead_steps_threshold``. ``state_dict.pth`` is ``torch.save({"state_dict": ...})`` of a TopK
autoencoder adapted from OpenAI's: ``encoder.weight`` (n_dirs, d_model) without bias,
``decoder.weight`` (d_model, n_dirs), ``pre_bias`` (d_model), ``latent_bias`` (n_dirs) and a
``stats_last_nonzero`` training counter. Its encoder is ``ReLU(TopK(encoder(x - pre_bias) +
latent_bias))`` and its decoder ``decoder(acts) + pre_bias``: saekit's TopK with
``W_enc = encoder.weight``, ``b_enc = latent_bias``, ``W_dec = decoder.weight.T``,
``b_dec = pre_bias``.

``mean.pt`` and ``std.pt`` are (n_dirs,) tensors: per-feature statistics of the latent activations,
which the authors' demo multiplies into its interventions. They do not normalise the input, so
they are kept as ``latent_stats`` beside the dictionary rather than folded into it. The files are
pickles and load only with ``allow_pickle=True`` (then with ``torch.load(weights_only=True)``).

The dictionaries read the update a block makes to its input (``output - input``, the "diff" of the
authors' caching code) at each position of the (B, C, H, W) feature map, so ``capture`` is
``update``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import FormatError
from ..safety import check_tensor, load_pickled
from .common import (
    Converted,
    DictionaryFormat,
    FilePlan,
    finish,
    get_int,
    make_config,
    storage_dtype,
)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "state_dict.pth"
STATS_FILES = {"mean": "mean.pt", "std": "std.pt"}


def identify(config: dict[str, Any]) -> bool:
    return {"n_dirs_local", "d_model", "k"} <= set(config)


def _shape(config: Mapping[str, Any], where: str) -> tuple[int, int]:
    return get_int(config, "d_model", where), get_int(config, "n_dirs_local", where)


def plan(
    config: dict[str, Any], names: Mapping[str, int | None], weights_file: str | None
) -> FilePlan:
    d_in, d_sae = _shape(config, CONFIG_FILE)
    return FilePlan(
        required=(CONFIG_FILE, WEIGHTS_FILE),
        optional=tuple(STATS_FILES.values()),
        numel=2 * d_sae * d_in + 2 * d_sae + d_in,
    )


def convert(
    config: dict[str, Any], paths: dict[str, Path], allow_pickle: bool, where: str
) -> Converted:
    source = f"sdxl-unbox dictionary at {where}"
    where = f"{where}/{CONFIG_FILE}"
    d_in, d_sae = _shape(config, where)
    k = get_int(config, "k", where)
    file = paths[WEIGHTS_FILE]
    loaded = load_pickled(
        file, numel=2 * d_sae * d_in + 2 * d_sae + d_in, allow_pickle=allow_pickle, source=source
    )
    state = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else loaded
    if not isinstance(state, dict):
        raise FormatError(
            f"{file}: expected a dict with a 'state_dict' of tensors, found {type(state).__name__}"
        )
    expected = {
        "encoder.weight": (d_sae, d_in),
        "decoder.weight": (d_in, d_sae),
        "pre_bias": (d_in,),
        "latent_bias": (d_sae,),
    }
    unknown = sorted(set(state) - set(expected) - {"stats_last_nonzero"})
    missing = sorted(set(expected) - set(state))
    if unknown or missing:
        raise FormatError(
            f"{file} does not match {CONFIG_FILE}: missing tensors {missing}, unexpected tensors {unknown}"
        )
    raw = {
        name: check_tensor(state[name], name, shape, str(file)) for name, shape in expected.items()
    }
    if "stats_last_nonzero" in state:  # a training counter, checked and dropped
        check_tensor(
            state["stats_last_nonzero"], "stats_last_nonzero", (d_sae,), str(file), floating=False
        )
    dtype = storage_dtype(raw["encoder.weight"])
    tensors = {
        "W_enc": raw["encoder.weight"],
        "b_enc": raw["latent_bias"],
        "W_dec": raw["decoder.weight"].T,
        "b_dec": raw["pre_bias"],
    }

    stats = {}
    for name, stats_file in STATS_FILES.items():
        if stats_file in paths:
            value = load_pickled(
                paths[stats_file], numel=d_sae, allow_pickle=allow_pickle, source=source
            )
            stats[name] = check_tensor(value, name, (d_sae,), str(paths[stats_file])).to(
                torch.float32
            )
    cfg = make_config(
        where, architecture="topk", d_in=d_in, d_sae=d_sae, k=k, dtype=dtype, capture="update"
    )
    notes = ["converted from sdxl-unbox (tensors renamed, decoder transposed)"]
    if stats:
        notes.append(f"per-latent activation statistics kept: {', '.join(stats)}")
    return Converted(cfg, finish(tensors, dtype), latent_stats=stats, notes=notes)


FORMAT = DictionaryFormat(
    name="sdxl-unbox",
    library="sdxl-unbox",
    config_file=CONFIG_FILE,
    identify=identify,
    plan=plan,
    convert=convert,
)
