"""SAELens (Bloom et al.): ``<folder>/cfg.json`` + ``sae_weights.safetensors``.

SAELens stores ``W_enc`` as (d_in, d_sae), and its encoder is
``pre = (x - b_dec * apply_b_dec_to_input) @ W_enc + b_enc``; ``standard`` applies ReLU, ``topk``
keeps the k largest of ``pre`` and applies ReLU (with ``rescale_acts_by_decoder_norm`` the selection
runs on ``pre * |W_dec_i|`` and the decoder divides by the norm again), ``jumprelu`` keeps
``ReLU(pre)`` where ``pre > threshold``. The decoder is ``acts @ W_dec + b_dec`` in every case.

Folds into saekit's ``pre = (x - b_dec) @ W_enc.T + b_enc``:

* ``apply_b_dec_to_input: false``: ``b_enc' = b_enc + W_enc.T @ b_dec`` (the subtraction is undone);
* ``rescale_acts_by_decoder_norm``: row i of ``W_enc`` and ``b_enc`` times ``n_i = |W_dec_i|`` and row
  i of ``W_dec`` divided by it: the codes are SAELens's rescaled activations and the decoder gives
  back the same reconstruction;
* JumpReLU thresholds below zero are raised to zero: ``ReLU(pre) * (pre > t)`` is the same function.

Activation normalisation: ``expected_average_only_in`` and ``none`` load as SAELens's
``load_from_disk`` loads them (no runtime scaling); ``constant_norm_rescale`` and ``layer_norm``
rescale every input by its own norm or statistics at run time, which no fixed weights can do, so
they are refused, as is an unfolded ``covariance_whitening`` checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import FormatError
from .common import (
    Converted,
    DictionaryFormat,
    FilePlan,
    finish,
    get_flag,
    get_int,
    get_text,
    make_config,
    read_safetensors,
    row_dot,
    row_norms,
    safetensors_names,
    scale_rows,
    storage_dtype,
)

CONFIG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"

# SAELens architecture -> saekit architecture, for the inference architectures that map exactly.
ARCHITECTURES = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu"}
RUNTIME_NORMALISATIONS = ("constant_norm_rescale", "layer_norm")


def identify(config: dict[str, Any]) -> bool:
    return (
        config.get("format") is None
        and "d_sae" in config
        and any(key in config for key in ("architecture", "hook_name", "hook_point", "metadata"))
    )


def _architecture(config: Mapping[str, Any], where: str) -> tuple[str, int | None]:
    """(saekit architecture, k) of a SAELens config, including configs older than SAELens 6."""
    architecture = config.get("architecture", "standard")
    kwargs = config.get("activation_fn_kwargs") or {}
    if architecture == "standard":
        activation = config.get("activation_fn") or config.get("activation_fn_str") or "relu"
        if activation == "topk":
            architecture = "topk"
        elif activation != "relu":
            raise FormatError(
                f"{where}: activation {activation!r} is not one saekit represents; it reads SAELens "
                "standard (ReLU), topk and jumprelu dictionaries"
            )
    if architecture not in ARCHITECTURES:
        raise FormatError(
            f"{where}: unknown or unsupported architecture {architecture!r}. saekit reads SAELens "
            f"architectures {', '.join(ARCHITECTURES)}; others (gated, transcoders, matching "
            "pursuit, ...) compute their codes in ways saekit's dictionaries cannot reproduce exactly."
        )
    k = None
    if architecture == "topk":
        k = get_int({"k": config.get("k", kwargs.get("k"))}, "k", where)
    return ARCHITECTURES[architecture], k


def _metadata(config: Mapping[str, Any]) -> dict[str, Any]:
    metadata = config.get("metadata")
    return {**config, **metadata} if isinstance(metadata, dict) else dict(config)


def plan(
    config: dict[str, Any], names: Mapping[str, int | None], weights_file: str | None
) -> FilePlan:
    d_in = get_int(config, "d_in", CONFIG_FILE)
    d_sae = get_int(config, "d_sae", CONFIG_FILE)
    return FilePlan(required=(CONFIG_FILE, WEIGHTS_FILE), numel=2 * d_sae * d_in + 3 * d_sae + d_in)


def convert(
    config: dict[str, Any], paths: dict[str, Path], allow_pickle: bool, where: str
) -> Converted:
    where = f"{where}/{CONFIG_FILE}"
    d_in, d_sae = get_int(config, "d_in", where), get_int(config, "d_sae", where)
    architecture, k = _architecture(config, where)
    notes = [f"converted from SAELens ({config.get('architecture', 'standard')})"]

    normalisation = config.get("normalize_activations") or "none"
    if normalisation is True:  # configs before SAELens 6 used a boolean
        normalisation = "expected_average_only_in"
    if normalisation in RUNTIME_NORMALISATIONS:
        raise FormatError(
            f"{where}: normalize_activations={normalisation!r} rescales each input by its own "
            "statistics at run time, which fixed weights cannot reproduce; saekit cannot load this "
            "dictionary exactly"
        )
    if normalisation == "covariance_whitening":
        raise FormatError(
            f"{where}: normalize_activations='covariance_whitening' means the whitening is not "
            "folded into these weights; fold it with SAELens (fold_activation_whitening) and save again"
        )
    if normalisation not in ("none", "expected_average_only_in"):
        raise FormatError(f"{where}: unknown normalize_activations {normalisation!r}")
    if normalisation == "expected_average_only_in":
        notes.append(
            "normalize_activations=expected_average_only_in: loaded like SAELens load_from_disk, "
            "without a norm scaling factor; inputs may need that release's factor"
        )
    if config.get("reshape_activations") == "hook_z":
        notes.append("hook_z dictionary: inputs are the flattened (n_heads * d_head) head outputs")

    shapes = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,)}
    file = paths[WEIGHTS_FILE]
    names = safetensors_names(file)
    if architecture == "jumprelu":
        # Older JumpReLU checkpoints store log(threshold), as DeepMind's code does.
        shapes["log_threshold" if "log_threshold" in names else "threshold"] = (d_sae,)
    if "scaling_factor" in names:  # an early fine-tuning scale (SAELens < 6)
        shapes["scaling_factor"] = (d_sae,)
    raw = read_safetensors(file, shapes)
    if "log_threshold" in raw:
        raw["threshold"] = raw.pop("log_threshold").double().exp()
        notes.append("threshold = exp(log_threshold)")
    if "scaling_factor" in raw:
        if not torch.all(raw.pop("scaling_factor") == 1):
            raise FormatError(
                f"{file}: a scaling_factor other than 1 (SAELens fine-tuning scale) is not supported"
            )
        notes.append("dropped a scaling_factor of ones")
    dtype = storage_dtype(raw["W_enc"])

    # The matrices stay in their stored dtype; folds are computed in float64 a block of rows at a
    # time, so converting a large dictionary needs little more memory than the dictionary.
    W_enc, W_dec = raw["W_enc"].T, raw["W_dec"]  # (m, d) each
    b_enc, b_dec = raw["b_enc"].double(), raw["b_dec"].double()
    if not get_flag(config, "apply_b_dec_to_input", where, default=True):
        b_enc = b_enc + row_dot(W_enc, b_dec)
        notes.append("apply_b_dec_to_input=false folded into b_enc")
    if architecture == "topk" and get_flag(config, "rescale_acts_by_decoder_norm", where):
        norms = row_norms(W_dec)  # (m,)
        if not (norms > 0).all():
            raise FormatError(f"{file}: a decoder row has zero norm; cannot fold the decoder norms")
        W_enc, b_enc = scale_rows(W_enc, norms), b_enc * norms
        W_dec = scale_rows(W_dec, 1 / norms)
        notes.append("rescale_acts_by_decoder_norm folded into W_enc, b_enc and W_dec")
    tensors = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    if architecture == "jumprelu":
        threshold = raw["threshold"].double()
        if (threshold < 0).any():
            notes.append("negative JumpReLU thresholds raised to 0 (same function after the ReLU)")
        tensors["threshold"] = threshold.clamp_min(0)

    meta = _metadata(config)
    cfg = make_config(
        where,
        architecture=architecture,
        d_in=d_in,
        d_sae=d_sae,
        k=k or 32,
        dtype=dtype,
        model=get_text(meta, "model_name", where),
        hookpoint=get_text(meta, "hook_name", where) or get_text(meta, "hook_point", where),
    )
    return Converted(cfg, finish(tensors, dtype), notes=notes)


FORMAT = DictionaryFormat(
    name="saelens",
    library="SAELens",
    config_file=CONFIG_FILE,
    identify=identify,
    plan=plan,
    convert=convert,
)
