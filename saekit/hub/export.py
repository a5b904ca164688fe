"""``saekit export --format saelens``: write a dictionary in SAELens's on-disk layout.

SAELens 6 reads ``<folder>/cfg.json`` + ``<folder>/sae_weights.safetensors`` with
``SAE.load_from_disk``. saekit's encoder ``(x - b_dec) @ W_enc.T + b_enc`` is SAELens's with
``apply_b_dec_to_input: true``, so the export only transposes ``W_enc`` to SAELens's (d_in, d_sae)
and names the architecture: ``topk`` -> ``topk``, ``relu`` -> ``standard``, ``jumprelu`` ->
``jumprelu`` (with its ``threshold``). Any input scale was folded into the weights at training
time, so ``normalize_activations`` is ``none``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safetensors.torch import save

from .. import __version__
from .._io import atomic_write_bytes, atomic_write_json
from ..dictionaries import SparseAutoencoder
from ..dictionaries.io import dictionary_tensors
from .errors import FormatError
from .formats import saelens

SAELENS_ARCHITECTURES = {"topk": "topk", "relu": "standard", "jumprelu": "jumprelu"}
SAELENS_LAYOUT_VERSION = "6.0.0"
"""The first SAELens release that reads this layout; SAELens treats configs without a version of
at least 6 as legacy and renames their keys."""


def saelens_config(sae: SparseAutoencoder) -> dict[str, Any]:
    cfg = sae.cfg
    if cfg.architecture not in SAELENS_ARCHITECTURES:
        raise FormatError(
            f"a {cfg.architecture} dictionary has no SAELens equivalent; convert BatchTopK with "
            ".for_inference() (it becomes JumpReLU) first"
        )
    config: dict[str, Any] = {
        "architecture": SAELENS_ARCHITECTURES[cfg.architecture],
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": cfg.dtype,
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": SAELENS_LAYOUT_VERSION,
            "sae_lens_training_version": None,
            "model_name": cfg.model,
            "hook_name": cfg.hookpoint,
            "exported_by": f"saekit {__version__}",
            "saekit_capture": cfg.capture,
        },
    }
    if cfg.architecture == "topk":
        config |= {"k": cfg.k, "rescale_acts_by_decoder_norm": False}
    return config


def export_saelens(sae: SparseAutoencoder, folder: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``sae`` to ``folder`` in SAELens's layout (both files atomically)."""
    folder = Path(folder)
    target = folder / saelens.WEIGHTS_FILE
    if target.exists() and not overwrite:
        raise FileExistsError(
            f"{folder} already holds a SAELens dictionary; pass overwrite=True (--overwrite)"
        )
    config = saelens_config(sae)
    tensors = dictionary_tensors(sae)  # saekit layout, in the stored dtype, on the CPU
    tensors["W_enc"] = tensors["W_enc"].T.contiguous()  # (d_in, d_sae)
    atomic_write_bytes(target, save(tensors, metadata={"format": "pt"}))
    atomic_write_json(folder / saelens.CONFIG_FILE, config)
    return folder
