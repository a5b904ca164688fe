"""The configuration of a dictionary: what it is, and what it was trained on."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from ..configuration import ConfigError

Architecture = Literal["topk", "batchtopk", "jumprelu", "relu"]
Capture = Literal["output", "input", "update"]
StorageDtype = Literal["float32", "bfloat16", "float16"]

FORMAT_VERSION = 1


@dataclass
class SAEConfig:
    """A sparse autoencoder's architecture and provenance (saved as ``cfg.json``)."""

    architecture: Architecture = "topk"
    """Activation: topk (Gao et al. 2024), batchtopk (Bussmann et al. 2024; saved as jumprelu
    with a global threshold), jumprelu (Rajamanoharan et al. 2024) or relu (ReLU + L1)."""

    d_in: int = 0
    """Input width. 0: taken from the data."""

    d_sae: int = 0
    """Number of latents. 0: d_in * expansion_factor."""

    expansion_factor: int = 16
    """Latents per input dimension, used when d_sae is 0."""

    k: int = 32
    """Active latents per token (topk), or the mean active latents per token (batchtopk)."""

    init_threshold: float = 0.001
    """Initial JumpReLU threshold of every latent."""

    dtype: StorageDtype = "float32"
    """Dtype of the saved weights. Training keeps float32 master weights."""

    seed: int = 0
    """Seed of the weight initialisation."""

    model: str | None = None
    """The model whose activations the dictionary reads (hub id or path)."""

    model_revision: str | None = None
    """Revision of that model."""

    hookpoint: str | None = None
    """The module path (named_modules) the activations come from; with --cache, also picks that
    hookpoint of the cache."""

    capture: Capture = "output"
    """What the hook captured: the module's output, its input, or its update (output - input)."""

    trained_as: Architecture | None = None
    """Set when a dictionary was converted after training (batchtopk -> jumprelu)."""

    input_scale: float | None = None
    """Normalisation factor that training multiplied inputs by; already folded into the saved
    weights, recorded for information."""

    def __post_init__(self) -> None:
        if self.d_in < 0 or self.d_sae < 0:
            raise ConfigError(
                f"d_in and d_sae must be positive (or 0 to infer), got {self.d_in}, {self.d_sae}"
            )
        if self.expansion_factor <= 0:
            raise ConfigError(f"expansion_factor must be positive, got {self.expansion_factor}")
        if self.architecture in ("topk", "batchtopk"):
            if self.k <= 0:
                raise ConfigError(f"k must be at least 1 for {self.architecture}, got {self.k}")
            if self.d_sae and self.k > self.d_sae:
                raise ConfigError(
                    f"k={self.k} is larger than d_sae={self.d_sae}: a token cannot have more active "
                    "latents than the dictionary has; lower k or widen the dictionary"
                )
        if self.init_threshold <= 0:
            raise ConfigError(f"init_threshold must be positive, got {self.init_threshold}")

    def resolved(self, d_in: int) -> SAEConfig:
        """A copy with ``d_in`` and ``d_sae`` filled in from the data's width."""
        if self.d_in and self.d_in != d_in:
            raise ConfigError(
                f"the dictionary expects d_in={self.d_in} but the activations have width {d_in}; "
                "set d_in to the data's width (or 0 to take it from the data)"
            )
        d_sae = self.d_sae or d_in * self.expansion_factor
        return dataclasses.replace(self, d_in=d_in, d_sae=d_sae)

    @property
    def name(self) -> str:
        """A short label such as ``topk-k32-x16-s0`` for runs and folders."""
        width = (
            f"x{self.d_sae // self.d_in}"
            if self.d_in and self.d_sae % self.d_in == 0
            else f"m{self.d_sae}"
        )
        sparsity = f"-k{self.k}" if self.architecture in ("topk", "batchtopk") else ""
        return f"{self.architecture}{sparsity}-{width}-s{self.seed}"
