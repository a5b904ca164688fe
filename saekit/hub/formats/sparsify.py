"""EleutherAI sparsify: ``<hookpoint>/cfg.json`` + ``<hookpoint>/sae.safetensors``.

The layout that SAeUron's SD-1.x dictionaries and lmms-lab's LLaVA-NeXT dictionaries use too (their
code is a fork of sparsify and writes the same files, with a few extra config keys). The tensors
are ``encoder.weight`` (num_latents, d_in), ``encoder.bias``, ``W_dec`` (num_latents, d_in) and
``b_dec``; the encoder is ``TopK(ReLU(encoder(x - b_dec)))`` with k from cfg.json and the decoder
``acts @ W_dec + b_dec``: saekit's TopK exactly, so the tensors are only renamed.

Refused: ``groupmax`` activations, transcoders (``transcode``; they predict another module's
output), skip connections, and ``input_unit_norm`` (SAeUron's per-input standardisation), none of
which saekit's dictionaries compute. ``batch_topk`` / ``sample_topk`` (SAeUron) only change how
latents were selected while training; like SAeUron's own loader, inference keeps k per row.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import FormatError
from .common import (
    Converted,
    DictionaryFormat,
    FilePlan,
    finish,
    get_flag,
    get_int,
    make_config,
    read_safetensors,
    storage_dtype,
)

CONFIG_FILE = "cfg.json"
WEIGHTS_FILE = "sae.safetensors"

# Flags whose `true` means a computation saekit does not reproduce, and why.
UNSUPPORTED_FLAGS = {
    "transcode": "it is a transcoder (it predicts another module's output), not an autoencoder",
    "skip_connection": "it has a linear skip connection (W_skip)",
    "input_unit_norm": "it standardises each input by its own mean and std, which fixed weights cannot do",
    "signed": "it keeps signed activations (an old sparsify option)",
}


def identify(config: dict[str, Any]) -> bool:
    return (
        "d_in" in config
        and ("num_latents" in config or "expansion_factor" in config)
        and not any(key in config for key in ("format", "architecture", "d_sae"))
    )


def _shape(config: Mapping[str, Any], where: str) -> tuple[int, int]:
    d_in = get_int(config, "d_in", where)
    num_latents = config.get("num_latents") or 0
    if num_latents:
        return d_in, get_int(config, "num_latents", where)
    return d_in, d_in * get_int(config, "expansion_factor", where, default=32)


def plan(
    config: dict[str, Any], names: Mapping[str, int | None], weights_file: str | None
) -> FilePlan:
    d_in, d_sae = _shape(config, CONFIG_FILE)
    return FilePlan(required=(CONFIG_FILE, WEIGHTS_FILE), numel=2 * d_sae * d_in + d_sae + d_in)


def convert(
    config: dict[str, Any], paths: dict[str, Path], allow_pickle: bool, where: str
) -> Converted:
    where = f"{where}/{CONFIG_FILE}"
    d_in, d_sae = _shape(config, where)
    activation = config.get("activation", "topk")
    if activation != "topk":
        raise FormatError(
            f"{where}: unsupported activation {activation!r}; saekit reads sparsify TopK dictionaries"
        )
    for flag, why in UNSUPPORTED_FLAGS.items():
        if get_flag(config, flag, where):
            raise FormatError(f"{where}: {flag} is true: {why}; saekit cannot load it exactly")
    k = get_int(config, "k", where, default=32)
    notes = ["converted from EleutherAI sparsify (tensors renamed)"]
    for flag in ("batch_topk", "sample_topk"):
        if get_flag(config, flag, where):
            notes.append(f"trained with {flag}; inference keeps the top {k} latents per row")

    raw = read_safetensors(
        paths[WEIGHTS_FILE],
        {
            "encoder.weight": (d_sae, d_in),
            "encoder.bias": (d_sae,),
            "W_dec": (d_sae, d_in),
            "b_dec": (d_in,),
        },
    )
    dtype = storage_dtype(raw["W_dec"])
    tensors = {
        "W_enc": raw["encoder.weight"],
        "b_enc": raw["encoder.bias"],
        "W_dec": raw["W_dec"],
        "b_dec": raw["b_dec"],
    }
    cfg = make_config(where, architecture="topk", d_in=d_in, d_sae=d_sae, k=k, dtype=dtype)
    return Converted(cfg, finish(tensors, dtype), notes=notes)


FORMAT = DictionaryFormat(
    name="sparsify",
    library="EleutherAI sparsify",
    config_file=CONFIG_FILE,
    identify=identify,
    plan=plan,
    convert=convert,
)
