"""Model adapters: what saekit knows about each family of models (see :mod:`.base`).

Families register here by name; ``saekit cache --adapter NAME`` (or ``auto``) picks one:

* ``clip`` (:mod:`.clip`): transformers CLIP and SigLIP; ``open_clip`` (:mod:`.openclip`);
  zero-shot classification and retrieval in :mod:`.zero_shot`;
* ``diffusion`` (:mod:`.diffusion`, :mod:`.dit`): diffusers text-to-image pipelines, UNet and
  diffusion-transformer denoisers, their text encoders;
* ``vlm`` (:mod:`.vlm`): LLaVA-style generative VLMs;
* ``transformers`` (:mod:`.transformers_lm`): any transformers causal LM or encoder;
* ``custom`` (:mod:`.custom`): any ``nn.Module`` with a feed function.

The registry maps names to import paths so that a family's heavy library (transformers,
diffusers, open_clip) is imported only when that family is used.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

from torch import nn

from ..configuration import ConfigError
from .base import (
    BRANCH_NAMES,
    COND,
    NO_BRANCH,
    UNCOND,
    Capture,
    ContextTracker,
    ForwardContext,
    ForwardScope,
    HookpointInfo,
    InputBatch,
    ModelAdapter,
    Rows,
    Sample,
    first_tensor,
    rows_from_channels_first,
    rows_from_last_dim,
)
from .custom import CustomAdapter, feed_tensors

# name -> "module:Class" of every family adapter.
ADAPTERS: dict[str, str] = {
    "custom": "saekit.adapters.custom:CustomAdapter",
    "clip": "saekit.adapters.clip:CLIPAdapter",
    "open_clip": "saekit.adapters.openclip:OpenCLIPAdapter",
    "diffusion": "saekit.adapters.diffusion:DiffusionAdapter",
    "vlm": "saekit.adapters.vlm:VLMAdapter",
    "transformers": "saekit.adapters.transformers_lm:TransformersAdapter",
}

# transformers model_type -> family (anything else with a config.json is "transformers").
_CONTRASTIVE_TYPES = {
    "clip",
    "clip_vision_model",
    "clip_text_model",
    "siglip",
    "siglip_vision_model",
    "siglip_text_model",
}
_VLM_TYPES = {"llava", "llava_next", "llava_onevision", "vipllava"}


def adapter_class(name: str) -> type[ModelAdapter]:
    """The adapter class registered as ``name``."""
    if name not in ADAPTERS:
        raise ConfigError(
            f"unknown adapter {name!r}; known adapters: {', '.join(sorted(ADAPTERS))}"
        )
    module_name, _, attribute = ADAPTERS[name].partition(":")
    return getattr(importlib.import_module(module_name), attribute)


def detect_adapter(
    model: str, *, revision: str | None = None, local_files_only: bool = False
) -> str:
    """The family of ``model``: ``open_clip:NAME[@TAG]``, ``package.module:factory`` (custom),
    or a hub id / local folder, recognised by its files (``model_index.json``: a diffusers
    pipeline; ``open_clip_config.json``: open_clip; ``config.json``: a transformers model,
    by its ``model_type``)."""
    from .loading import read_model_json
    from .openclip import PREFIX as OPEN_CLIP

    if model.startswith(OPEN_CLIP):
        return "open_clip"
    if ":" in model and "/" not in model.split(":", 1)[0]:
        return "custom"
    files: dict[str, Any] = dict(revision=revision, local_files_only=local_files_only)
    if read_model_json(model, "model_index.json", **files) is not None:
        return "diffusion"
    config = read_model_json(model, "config.json", **files)
    if config is not None and "_class_name" in config:
        raise ConfigError(
            f"{model} holds one diffusers model ({config['_class_name']}); give the folder or "
            "hub id of the whole pipeline (with model_index.json), which feeds it prompts"
        )
    if config is not None:
        model_type = str(config.get("model_type", ""))
        if model_type in _CONTRASTIVE_TYPES:
            return "clip"
        if model_type in _VLM_TYPES:
            return "vlm"
        return "transformers"
    if read_model_json(model, "open_clip_config.json", **files) is not None:
        return "open_clip"
    from .loading import ModelNotFoundError, local_directory, not_found_message

    if local_directory(model) is not None:
        raise ConfigError(
            f"no adapter recognises the folder {model}: it holds no model_index.json (diffusers), "
            "config.json (transformers) or open_clip_config.json; name one with --adapter "
            f"({', '.join(sorted(ADAPTERS))})"
        )
    raise ModelNotFoundError(
        not_found_message(model, "model", revision=revision, local_files_only=local_files_only)
    )


def load_adapter(
    model: str | os.PathLike[str],
    adapter: str = "auto",
    *,
    revision: str | None = None,
    **options: Any,
) -> ModelAdapter:
    """Load ``model`` (a hub id, or a folder as a string or path) with the adapter ``adapter``
    (``auto``: detected from the model).

    ``options`` go to the adapter class's ``load`` (device, dtype, local_files_only,
    trust_remote_code, and the family's own settings)."""
    model = os.fspath(model)
    if adapter == "auto":
        name = detect_adapter(
            model, revision=revision, local_files_only=bool(options.get("local_files_only"))
        )
    else:
        name = adapter
    cls: Any = adapter_class(name)
    if name == "open_clip" and not model.startswith("open_clip:"):
        from .loading import local_directory

        # A hub id or folder holding open_clip_config.json: open_clip's own schemas.
        schema = "local-dir:" if local_directory(model) is not None else "hf-hub:"
        model = f"open_clip:{schema}{model}"
    if name == "custom":  # a factory takes its own options; the loader's are not for it
        options = {
            k: v for k, v in options.items() if k not in ("local_files_only", "trust_remote_code")
        }
    return cls.load(model, revision=revision, **options)


def adapter_for(model: Any, *args: Any, **kwargs: Any) -> ModelAdapter:
    """The family adapter of a model or pipeline built in Python: a diffusers pipeline, a
    transformers CLIP/SigLIP, LLaVA or text model, an open_clip model, any other ``nn.Module``
    (a CustomAdapter). A ``(model, processor)`` or ``(model, tokenizer)`` pair (what the
    testbed's loaders return) gives the second to the adapter. ``args`` / ``kwargs`` go to the
    adapter's constructor."""
    if isinstance(model, ModelAdapter):
        return model
    if isinstance(model, tuple) and len(model) == 2 and not args:
        model, companion = model
        args = (companion,)
    names = {cls.__name__ for cls in type(model).__mro__}
    module = type(model).__module__
    if "DiffusionPipeline" in names:
        from .diffusion import DiffusionAdapter

        return DiffusionAdapter(model, *args, **kwargs)
    config = getattr(model, "config", None)
    model_type = str(getattr(config, "model_type", "")) if config is not None else ""
    if "PreTrainedModel" in names and model_type in _CONTRASTIVE_TYPES:
        from .clip import CLIPAdapter

        if args:
            companion = args[0]
            key = "image_processor" if not hasattr(companion, "encode") else "tokenizer"
            kwargs.setdefault(key, companion)
            args = ()
        return CLIPAdapter(model, *args, **kwargs)
    if "PreTrainedModel" in names and model_type in _VLM_TYPES:
        from .vlm import VLMAdapter

        return VLMAdapter(model, *args, **kwargs)
    if "PreTrainedModel" in names:
        from .transformers_lm import TransformersAdapter

        return TransformersAdapter(model, *args, **kwargs)
    if module.startswith("open_clip"):
        from .openclip import OpenCLIPAdapter

        return OpenCLIPAdapter(model, *args, **kwargs)
    if isinstance(model, nn.Module):
        return CustomAdapter(model, *args, **kwargs)
    raise TypeError(
        f"saekit has no adapter for {type(model).__name__}: give an nn.Module, a diffusers "
        "pipeline, or a ModelAdapter"
    )


__all__ = [
    "ADAPTERS",
    "BRANCH_NAMES",
    "COND",
    "NO_BRANCH",
    "UNCOND",
    "Capture",
    "ContextTracker",
    "CustomAdapter",
    "ForwardContext",
    "ForwardScope",
    "HookpointInfo",
    "InputBatch",
    "ModelAdapter",
    "Rows",
    "Sample",
    "adapter_class",
    "adapter_for",
    "detect_adapter",
    "feed_tensors",
    "first_tensor",
    "load_adapter",
    "rows_from_channels_first",
    "rows_from_last_dim",
]
