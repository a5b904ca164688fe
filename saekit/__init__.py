"""saekit: sparse autoencoders for multimodal models.

Cache activations of CLIP, diffusion and LLaVA-style models, train TopK / BatchTopK / JumpReLU /
ReLU dictionaries on them, share them on the Hugging Face Hub, steer and unlearn with their
features, and evaluate them.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

from .dictionaries import (
    BatchTopKSAE,
    JumpReLUSAE,
    ReLUSAE,
    SAEConfig,
    SparseAutoencoder,
    TopKSAE,
    load_dictionary,
    save_dictionary,
)
from .hub import load  # Hub, SAELens, sparsify, sdxl-unbox, Prisma; huggingface_hub loads lazily
from .kernels import SparseCodes

__all__ = [
    "BatchTopKSAE",
    "JumpReLUSAE",
    "ReLUSAE",
    "SAEConfig",
    "SparseAutoencoder",
    "SparseCodes",
    "TopKSAE",
    "__version__",
    "load",
    "load_dictionary",
    "save_dictionary",
    "steer",
]


def __getattr__(name: str) -> Any:
    # saekit.steer loads lazily: steering imports the adapters, which `import saekit` should not.
    if name == "steer":
        from .steering import steer

        return steer
    raise AttributeError(f"module 'saekit' has no attribute {name!r}")
