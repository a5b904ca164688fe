"""Lazy imports of the heavy optional families, with an error that names the extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType

# module name -> pip extra that provides it
EXTRAS = {
    "transformers": "transformers",
    "diffusers": "diffusers",
    "open_clip": "open-clip",
    "huggingface_hub": "hub",
    "wandb": "wandb",
    "triton": "triton",
    "matplotlib": "plots",
    "PIL": "plots",
}


class MissingDependencyError(ImportError):
    """An optional dependency is needed for this feature and is not installed."""


def require(module: str, feature: str | None = None) -> ModuleType:
    """Import ``module`` or raise an error that says which saekit extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        top = module.split(".")[0]
        extra = EXTRAS.get(top, top)
        what = f" for {feature}" if feature else ""
        raise MissingDependencyError(
            f"`{top}` is needed{what} but is not installed. Install it with: pip install 'saekit[{extra}]'"
        ) from err
