"""Prisma (ViT-Prisma, Joseph et al. 2025): ``config.json`` + a ``.pt`` state dict per repository.

``config.json`` is Prisma's ``VisionModelSAERunnerConfig`` as JSON: ``d_in``, ``expansion_factor``
(``d_sae = d_in * expansion_factor``), ``architecture``, ``activation_fn_str`` (``relu`` or
``topk`` with ``activation_fn_kwargs.k``), ``normalize_activations``, the model (``model_name``,
e.g. ``open-clip:laion/CLIP-ViT-B-32-DataComp.XL-s13B-b90K``) and the hook (``hook_point_layer``,
``layer_subtype``, giving HookedViT's ``blocks.{layer}.{subtype}``). The weights file's name varies
(for example ``n_images_2600058.pt``); it holds ``W_enc`` (d_in, d_sae), ``W_dec`` (d_sae, d_in),
``b_enc`` and ``b_dec``, either as the state dict itself or under ``"state_dict"``.

The standard encoder is ``act((x - b_dec) @ W_enc + b_enc)`` with ``act`` ReLU, or TopK followed by
ReLU, and the decoder ``acts @ W_dec + b_dec``: saekit's ReLU and TopK with ``W_enc`` transposed.
Prisma's default ``normalize_activations='layer_norm'`` standardises every input by its own mean
and std and rescales the output back; no fixed weights reproduce that, so those dictionaries (and
``constant_norm_rescale`` ones) are refused with a message, as are gated SAEs and transcoders.
The weights file is a pickle and loads only with ``allow_pickle=True``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import FormatError
from ..safety import check_name, check_tensor, load_pickled
from .common import (
    Converted,
    DictionaryFormat,
    FilePlan,
    finish,
    get_flag,
    get_int,
    get_text,
    make_config,
    storage_dtype,
)

CONFIG_FILE = "config.json"
WEIGHT_SUFFIXES = (".pt", ".pth")
ACTIVATIONS = {"relu": "relu", "topk": "topk"}


def identify(config: dict[str, Any]) -> bool:
    return {"d_in", "expansion_factor"} <= set(config) and any(
        key in config for key in ("activation_fn_str", "hook_point_layer", "layer_subtype")
    )


def _shape(config: Mapping[str, Any], where: str) -> tuple[int, int]:
    d_in = get_int(config, "d_in", where)
    return d_in, d_in * get_int(config, "expansion_factor", where)


def plan(
    config: dict[str, Any], names: Mapping[str, int | None], weights_file: str | None
) -> FilePlan:
    d_in, d_sae = _shape(config, CONFIG_FILE)
    if weights_file is None:
        candidates = sorted(name for name in names if name.endswith(WEIGHT_SUFFIXES))
        if len(candidates) != 1:
            found = ", ".join(candidates) or "none"
            raise FormatError(
                f"a Prisma dictionary keeps its weights in a .pt file beside {CONFIG_FILE}; found "
                f"{found}. Name the one to load with weights_file=... (CLI: --weights_file)."
            )
        weights_file = candidates[0]
    check_name(weights_file, "weights file")
    if "/" in weights_file:
        raise FormatError(f"weights_file {weights_file!r} must be a file name beside {CONFIG_FILE}")
    return FilePlan(required=(CONFIG_FILE, weights_file), numel=2 * d_sae * d_in + d_sae + d_in)


def convert(
    config: dict[str, Any], paths: dict[str, Path], allow_pickle: bool, where: str
) -> Converted:
    source = f"Prisma dictionary at {where}"
    where = f"{where}/{CONFIG_FILE}"
    d_in, d_sae = _shape(config, where)
    if get_flag(config, "is_transcoder", where):
        raise FormatError(
            f"{where}: is_transcoder is true; saekit loads autoencoders, not transcoders"
        )
    architecture = config.get("architecture", "standard")
    if architecture != "standard":
        raise FormatError(
            f"{where}: unknown or unsupported architecture {architecture!r}; saekit reads Prisma "
            "'standard' dictionaries (a gated encoder has a separate magnitude path)"
        )
    activation = config.get("activation_fn_str", "relu")
    if activation not in ACTIVATIONS:
        raise FormatError(
            f"{where}: unsupported activation_fn_str {activation!r}; saekit reads relu and topk"
        )
    k = 32
    if activation == "topk":
        k = get_int(config.get("activation_fn_kwargs") or {}, "k", f"{where} activation_fn_kwargs")
    normalisation = config.get("normalize_activations") or "none"
    if normalisation != "none":
        raise FormatError(
            f"{where}: normalize_activations={normalisation!r} standardises or rescales each input by "
            "its own statistics at run time, which fixed weights cannot reproduce; saekit cannot load "
            "this dictionary exactly"
        )

    (weights_name,) = (name for name in paths if name != CONFIG_FILE)
    file = paths[weights_name]
    loaded = load_pickled(
        file, numel=2 * d_sae * d_in + d_sae + d_in, allow_pickle=allow_pickle, source=source
    )
    state = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else loaded
    if not isinstance(state, dict):
        raise FormatError(f"{file}: expected a state dict of tensors, found {type(state).__name__}")
    expected = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,)}
    unknown, missing = sorted(set(state) - set(expected)), sorted(set(expected) - set(state))
    if unknown or missing:
        raise FormatError(
            f"{file} does not match {CONFIG_FILE}: missing tensors {missing}, unexpected tensors {unknown}"
        )
    raw = {
        name: check_tensor(state[name], name, shape, str(file)) for name, shape in expected.items()
    }
    dtype = storage_dtype(raw["W_dec"])
    tensors = {
        "W_enc": raw["W_enc"].T,
        "b_enc": raw["b_enc"],
        "W_dec": raw["W_dec"],
        "b_dec": raw["b_dec"],
    }

    hookpoint = None
    subtype = get_text(config, "layer_subtype", where)
    if subtype and "hook_point_layer" in config:  # HookedViT's name: blocks.{layer}.{subtype}
        layer = config["hook_point_layer"]
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise FormatError(f"{where}: hook_point_layer must be an integer, got {layer!r}")
        hookpoint = f"blocks.{layer}.{subtype}"
    notes = ["converted from Prisma (W_enc transposed)"]
    for flag in ("cls_token_only", "use_patches_only"):
        if get_flag(config, flag, where):
            notes.append(f"trained with {flag}")
    cfg = make_config(
        where,
        architecture=ACTIVATIONS[activation],
        d_in=d_in,
        d_sae=d_sae,
        k=k,
        dtype=dtype,
        model=get_text(config, "model_name", where),
        hookpoint=hookpoint,
    )
    return Converted(cfg, finish(tensors, dtype), notes=notes)


FORMAT = DictionaryFormat(
    name="prisma",
    library="ViT-Prisma",
    config_file=CONFIG_FILE,
    identify=identify,
    plan=plan,
    convert=convert,
)
