"""Diffusion transformers (SD3, Flux, PixArt): where their image and text streams are.

A DiT denoises a sequence of image-patch tokens. PixArt's blocks hold only image tokens (the
prompt enters by cross-attention). SD3's ``JointTransformerBlock`` (MM-DiT, Esser et al. 2024)
and Flux's double-stream ``FluxTransformerBlock`` keep two streams with their own weights that
attend jointly, and Flux's single-stream ``FluxSingleTransformerBlock`` runs one sequence with
the text tokens first. In diffusers all three take ``hidden_states`` (image) and
``encoder_hidden_states`` (text) and return ``(encoder_hidden_states, hidden_states)``; SD3's
last block returns no text (``context_pre_only``).

A hook on such a block captures both streams as one sequence, text tokens first (Flux's own
single-stream layout): ``(B, T_text + N_image, d)``, each row marked with its stream, so
``--streams image`` keeps the image tokens only. ``@update`` subtracts the block's two inputs
concatenated the same way.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor, nn

JOINT_BLOCKS = frozenset(
    {"JointTransformerBlock", "FluxTransformerBlock", "FluxSingleTransformerBlock"}
)
"""diffusers block classes that carry an image and a text stream."""

# Denoisers called with the flow-matching time in [0, 1] (the pipeline divides by 1000): the
# cache records timestep = 1000·t for every model, the scale schedulers use.
_UNIT_TIME_DENOISERS = ("FluxTransformer2DModel",)


def is_joint_block(module: nn.Module) -> bool:
    return type(module).__name__ in JOINT_BLOCKS


_PARAMETERS: dict[type, list[str]] = {}


def _parameters(cls: type) -> list[str]:
    """Names of the positional parameters of ``cls.forward`` after ``self`` (cached: hooks ask
    at every call)."""
    if cls not in _PARAMETERS:
        _PARAMETERS[cls] = list(inspect.signature(cls.forward).parameters)[1:]  # type: ignore[attr-defined]
    return _PARAMETERS[cls]


def _argument(module: nn.Module, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The argument ``name`` of a call of ``module``, given by keyword or by position."""
    if name in kwargs:
        return kwargs[name]
    parameters = _parameters(type(module))
    if name in parameters and parameters.index(name) < len(args):
        return args[parameters.index(name)]
    return None


def joint_output(module: nn.Module, output: Any) -> tuple[Tensor, int]:
    """A joint block's output as ``(B, T_text + N, d)`` (text first) and ``T_text`` (0 when the
    block returns no text)."""
    if not (isinstance(output, (tuple, list)) and len(output) == 2):
        raise ValueError(
            f"{type(module).__name__} returned {type(output).__name__}; expected the pair "
            "(encoder_hidden_states, hidden_states) of diffusers' joint blocks"
        )
    text, image = output
    if text is None:
        return image, 0
    return torch.cat([text, image], dim=1), text.shape[1]


def joint_input(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
    """A joint block's inputs as ``(B, T_text + N, d)``, matching :func:`joint_output` (no text
    for a block whose output has none)."""
    image = _argument(module, "hidden_states", args, kwargs)
    text = _argument(module, "encoder_hidden_states", args, kwargs)
    if not isinstance(image, Tensor):
        raise ValueError(f"{type(module).__name__} was called without hidden_states")
    if text is None or getattr(module, "context_pre_only", False):
        return image
    return torch.cat([text, image], dim=1)


DENOISER_ARGUMENTS: dict[str, tuple[str, ...]] = {
    "latents": ("sample", "hidden_states"),  # a UNet's, a DiT's
    "timestep": ("timestep",),
    "text": ("encoder_hidden_states",),
}
"""The forward parameters of diffusers denoisers that :func:`denoiser_call` reads, by role
(any one name of a role). diffusers documents them per class but promises no common names, so
:func:`check_denoiser` refuses a denoiser that lacks one instead of steering it blind, and
tests/test_upstream_names.py asserts them against the installed release."""


def check_denoiser(denoiser: nn.Module) -> None:
    """Raise a clear error if ``denoiser.forward`` takes none of the names of a role in
    :data:`DENOISER_ARGUMENTS` (a renamed keyword upstream)."""
    parameters = set(_parameters(type(denoiser)))
    for role, names in DENOISER_ARGUMENTS.items():
        if not parameters & set(names):
            raise ValueError(
                f"{type(denoiser).__name__}.forward takes none of {list(names)} ({role}); "
                "saekit reads the denoiser's calls by these diffusers names. This diffusers "
                "release renamed them: install the version in saekit's constraints.txt"
            )


def denoiser_call(
    denoiser: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[int, float, int | None, int | None]:
    """What a call of the denoiser is: ``(batch, timestep, image_tokens, text_tokens)``.

    The timestep is the scheduler's (0..1000; Flux is called with it divided by 1000).
    ``image_tokens`` is the DiT's sequence length of image patches (None for a UNet),
    ``text_tokens`` the prompt's token count (None without ``encoder_hidden_states``).
    """
    sample = None
    for name in DENOISER_ARGUMENTS["latents"]:
        sample = _argument(denoiser, name, args, kwargs)
        if sample is not None:
            break
    if not isinstance(sample, Tensor):
        raise ValueError(
            f"cannot find the latents among the arguments of {type(denoiser).__name__}"
        )
    raw = _argument(denoiser, "timestep", args, kwargs)
    if isinstance(raw, Tensor):
        timestep = float(raw.reshape(-1)[0]) if raw.numel() else float("nan")
    elif raw is None:
        timestep = float("nan")
    else:
        timestep = float(raw)
    if type(denoiser).__name__ in _UNIT_TIME_DENOISERS:
        timestep *= 1000.0
    image_tokens = None
    if type(denoiser).__name__ != "UNet2DConditionModel":
        if sample.ndim == 4:  # (B, C, H, W) latents, patchified inside
            patch = int(getattr(getattr(denoiser, "config", None), "patch_size", 1) or 1)
            image_tokens = (sample.shape[2] // patch) * (sample.shape[3] // patch)
        elif sample.ndim == 3:  # Flux: packed (B, N, C)
            image_tokens = sample.shape[1]
    text = _argument(denoiser, "encoder_hidden_states", args, kwargs)
    text_tokens = text.shape[1] if isinstance(text, Tensor) and text.ndim == 3 else None
    return sample.shape[0], timestep, image_tokens, text_tokens
