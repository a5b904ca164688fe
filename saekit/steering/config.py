"""Typed descriptions of an intervention: *what* changes (:class:`Intervention`) and *where and
when* (:class:`Scope`).

Every intervention is an edit of latent values ``v`` (``(N, F)`` for the intervention's ``F``
features on the ``N`` rows of a hooked tensor) that reaches the model as the decoder's image
of the change, ``(v' - v) @ W_dec[features]``, added to the activation. With the SAE error
kept (the default), nothing else of the reconstruction reaches the model (Marks et al. 2024;
SAeUron, Cywinski & Deja 2025, keep the error the same way), so an edit that leaves every value
unchanged leaves the model's output bit for bit.

* ``add``: ``v' = v + strength`` -- the decoder direction ``strength * W_dec[f]`` added at every
  row in scope (Surkov et al. 2024 steer SDXL-Turbo's UNet this way; Kim & Ghadiyaram 2025 steer
  through the text encoder);
* ``set``: ``v' = strength`` (Templeton et al. 2024 and Zhang et al. 2024 "clamp" a latent to a
  value this way);
* ``clamp``: ``v' = clamp(v, low, high)`` (bounds; either may be None);
* ``scale``: ``v' = strength * v`` (SAeUron's negative multiplier suppresses a concept where
  its latents fire);
* ``ablate``: ``v' = 0``.

``relative=True`` measures ``strength`` (and the clamp bounds) in units of each latent's
typical activation (its mean value where it fires, from a :class:`~.selection.Selection` or
given as ``typical=``), so one strength means the same for every latent.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

import torch
from torch import Tensor

from ..configuration import ConfigError

Kind = Literal["add", "set", "clamp", "scale", "ablate"]
KINDS: tuple[str, ...] = ("add", "set", "clamp", "scale", "ablate")
Tokens = Literal["all", "image", "text"]
Branch = Literal["both", "cond", "uncond", "cond_minus_uncond"]
Phase = Literal["all", "prefill", "decode"]


@dataclass
class Scope:
    """Where and when an intervention acts. The default acts everywhere, on every call."""

    positions: tuple[int, ...] | None = None
    """Token positions (last-dim tensors ``(B, T, d)``; a VLM's decoding step is at position
    ``prompt length + step``) or spatial indices ``h·W + w`` of a feature map; None: all."""
    tokens: Tokens = "all"
    """Only image tokens (feature-map positions, patch tokens, a VLM's image positions) or only
    text tokens (prompt tokens, a text encoder, cross-attention keys); ``all``: both."""
    mask: Tensor | None = None
    """``(H, W)`` weights in [0, 1] over the image, resized (area interpolation) to the grid of
    each hooked feature map (or to the square grid of a token sequence), and multiplying the
    edit row by row: a soft region (Surkov et al. 2024 steer inside a region this way)."""
    steps: tuple[int, int] | None = None
    """Denoising steps ``[start, stop)`` (the index of the denoiser's call at a new timestep,
    from 0); None: every step, and calls outside denoising (a text encoder)."""
    branch: Branch = "both"
    """Which half of a classifier-free-guided batch ``[uncond; cond]``: ``cond``, ``uncond``,
    ``both``, or ``cond_minus_uncond``: the edit added to the conditional half and subtracted
    from the unconditional one, so guidance ``u + s (c - u)`` amplifies it by ``2s - 1``."""
    phase: Phase = "all"
    """For generation with a KV cache (VLMs): the ``prefill`` call on the prompt, the
    ``decode`` calls that each add one token, or ``all``."""
    decode_steps: tuple[int, int] | None = None
    """Decoding calls ``[start, stop)`` (0: the first call after the prefill); None: all."""
    where_active: tuple[int, ...] | None = None
    """Only rows where one of these latents of the dictionary fires (e.g. every colour latent,
    to steer a colour only at the tokens that carry one; SAeUron edits a concept only where its
    latents fire the same way); None: every row."""
    weight_by: tuple[int, ...] | None = None
    """Weight each row by how strongly these latents fire: the summed value of those that fire
    over their summed typical activation (0 where none fires; needs ``typical=``). An anchor
    concept added this way replaces an erased one in proportion to its presence (Kumari et al.
    2023 map an erased concept to an anchor; :func:`~.unlearn.unlearn` with ``anchor=``); None:
    no weighting."""

    def __post_init__(self) -> None:
        if self.tokens not in ("all", "image", "text"):
            raise ConfigError(f"Scope.tokens must be all, image or text, got {self.tokens!r}")
        if self.branch not in ("both", "cond", "uncond", "cond_minus_uncond"):
            raise ConfigError(
                f"Scope.branch must be both, cond, uncond or cond_minus_uncond, got {self.branch!r}"
            )
        if self.phase not in ("all", "prefill", "decode"):
            raise ConfigError(f"Scope.phase must be all, prefill or decode, got {self.phase!r}")
        for name in ("steps", "decode_steps"):
            window = getattr(self, name)
            if window is not None:
                window = (int(window[0]), int(window[1]))
                if window[0] < 0 or window[1] <= window[0]:
                    raise ConfigError(
                        f"Scope.{name} is a window [start, stop) with 0 <= start < stop, got {window}"
                    )
                setattr(self, name, window)
        if self.positions is not None:
            self.positions = tuple(int(p) for p in self.positions)
        for name in ("where_active", "weight_by"):
            latents = getattr(self, name)
            if latents is not None:
                if name == "weight_by" and not latents:
                    raise ConfigError("Scope.weight_by needs at least one latent id, or None")
                setattr(self, name, tuple(int(f) for f in latents))
        if self.mask is not None:
            mask = torch.as_tensor(self.mask, dtype=torch.float32)
            if mask.ndim != 2:
                raise ConfigError(f"Scope.mask must be (H, W), got shape {tuple(mask.shape)}")
            self.mask = mask

    @property
    def is_everywhere(self) -> bool:
        return self == Scope()

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["mask"] = None if self.mask is None else self.mask.tolist()
        for name in ("positions", "steps", "decode_steps", "where_active", "weight_by"):
            out[name] = None if out[name] is None else list(out[name])
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Scope:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown scope fields {sorted(unknown)}; known: {sorted(known)}")
        data = dict(data)
        for name in ("positions", "steps", "decode_steps", "where_active", "weight_by"):
            if data.get(name) is not None:
                data[name] = tuple(data[name])
        if data.get("mask") is not None:
            data["mask"] = torch.tensor(data["mask"], dtype=torch.float32)
        return cls(**data)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Scope):
            return NotImplemented
        mine, theirs = self.to_dict(), other.to_dict()
        return mine == theirs


@dataclass
class Intervention:
    """One edit of some latents at one hookpoint (see the module docstring for the kinds)."""

    features: tuple[int, ...]
    """Latent ids of the dictionary."""
    kind: Kind = "add"
    strength: float = 1.0
    """``add``: the amount added; ``set``: the value; ``scale``: the factor. Unused by
    ``clamp`` and ``ablate``."""
    low: float | None = None
    """``clamp``: lower bound (None: none)."""
    high: float | None = None
    """``clamp``: upper bound (None: none)."""
    relative: bool = False
    """Strength and bounds in units of each latent's typical activation (not for ``scale``)."""
    hookpoint: str | None = None
    """Where (a dictionary's hookpoint); None: the only dictionary given, or its hookpoint."""
    scope: Scope = field(default_factory=Scope)
    keep_error: bool = True
    """Add the edit to the activation (the SAE error stays). False: the activation is replaced
    by the edited reconstruction (the error is dropped), even where nothing is edited in scope
    of this call."""
    label: str = ""
    """A name for reports (``"red"``, ``"unlearn circle"``)."""

    def __post_init__(self) -> None:
        if isinstance(self.features, int):
            self.features = (self.features,)
        self.features = tuple(int(f) for f in self.features)
        if not self.features:
            raise ConfigError("an Intervention needs at least one feature (latent id)")
        if self.kind not in KINDS:
            raise ConfigError(f"Intervention.kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "clamp" and self.low is None and self.high is None:
            raise ConfigError("a clamp needs low= or high= (or both)")
        if self.kind == "scale" and self.relative:
            raise ConfigError("relative=True has no meaning for scale: the factor has no unit")
        if isinstance(self.scope, dict):
            self.scope = Scope.from_dict(self.scope)

    @property
    def needs_codes(self) -> bool:
        """Whether the edit reads the current latent values (all kinds but an unconditional
        ``add``)."""
        scope = self.scope
        return self.kind != "add" or scope.where_active is not None or scope.weight_by is not None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["features"] = list(self.features)
        out["scope"] = self.scope.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Intervention:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(
                f"unknown intervention fields {sorted(unknown)}; known: {sorted(known)}"
            )
        data = dict(data)
        data["features"] = tuple(data["features"])
        data["scope"] = Scope.from_dict(data.get("scope") or {})
        return cls(**data)
