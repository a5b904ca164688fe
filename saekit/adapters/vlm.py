"""Generative vision-language models of the LLaVA family in transformers:
``LlavaForConditionalGeneration`` (LLaVA-1.5, Liu et al. 2023), ``LlavaNextForConditionalGeneration``
(LLaVA-NeXT, whose images are split into several crops) and the models with the same three
parts: a vision tower, a projector, a language model.

What to hook (transformers >= 5 paths):

* ``model.language_model.layers.{i}``: the language model's residual stream after decoder
  layer ``i``, ``(B, T, d)``, one row per position of the prompt. The ``<image>`` placeholder
  is expanded into one position per image feature: rows there are stream ``image``, the
  prompt's words stream ``text``, and padding (``pad``) is dropped unless ``keep_padding``.
* ``model.language_model.layers.{i}.self_attn`` / ``.mlp``: what attention / the MLP adds.
* ``model.vision_tower.encoder.layers.{i}``: the vision tower's residual stream, ``(B, 1+P, d)``
  per image (CLS at position 0); LLaVA-NeXT's crops are numbered on: position =
  ``crop·(1+P) + token``.
* ``model.multi_modal_projector``: the image features as the language model receives them,
  ``(B, P, d_lm)``.

Prompts: a prompt that already holds the image token (``"<image> describe :"``) is used as
is; otherwise the processor's chat template formats it when it has one, else
``prompt_template`` (default ``"{image} {prompt}"``). Images without prompts are asked
``default_prompt``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .._optional import require
from ..configuration import ConfigError
from .base import (
    ForwardContext,
    ForwardScope,
    HookpointInfo,
    InputBatch,
    ModelAdapter,
    Rows,
    announce,
    rows_from_last_dim,
)
from .loading import from_pretrained, torch_dtype

STREAMS = ("text", "image", "pad")
TEXT, IMAGE, PAD = range(len(STREAMS))

PARTS = ("vision_tower", "multi_modal_projector", "language_model")


class VLMAdapter(ModelAdapter):
    """A LLaVA-style VLM and its processor.

    Args:
        model: ``LlavaForConditionalGeneration`` or a model with the same parts.
        processor: its processor (tokenizer + image processor), needed to feed images/prompts.
        prompt_template: how a prompt without the image token is formatted, with ``{image}``
            and ``{prompt}`` (None: the processor's chat template, else ``"{image} {prompt}"``).
        default_prompt: the prompt of an image given alone.
        keep_padding: keep rows of padding positions (dropped by default).
        name, revision: recorded with caches.
    """

    family: ClassVar[str] = "vlm"
    streams = STREAMS

    def __init__(
        self,
        model: nn.Module,
        processor: Any = None,
        *,
        prompt_template: str | None = None,
        default_prompt: str = "Describe the image.",
        keep_padding: bool = False,
        name: str | None = None,
        revision: str | None = None,
    ) -> None:
        self.model: Any = model
        self.processor = processor
        self.prompt_template = prompt_template
        self.default_prompt = default_prompt
        self.keep_padding = keep_padding
        self.model_name = name
        self.revision = revision
        self.parts = _find_parts(model)
        config: Any = model.config
        self.image_token_id = int(
            getattr(config, "image_token_id", None) or config.image_token_index
        )
        # Which image (sample id) and crop each element of the vision tower's batch is: set
        # for every call, read by flatten.
        self._vision_samples: Tensor | None = None
        self._vision_crops: Tensor | None = None

    @classmethod
    def load(
        cls,
        spec: str,
        *,
        revision: str | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        local_files_only: bool = False,
        trust_remote_code: bool = False,
        **options: Any,
    ) -> VLMAdapter:
        """Load the model (the class its config names, through ``AutoModelForImageTextToText``)
        and its processor with transformers' ``from_pretrained``."""
        transformers = require("transformers", "VLMs")
        common: dict[str, Any] = dict(
            revision=revision,
            local_files_only=local_files_only,
            trust_remote_code=trust_remote_code,
        )
        model = from_pretrained(
            transformers.AutoModelForImageTextToText.from_pretrained,
            spec,
            what="vision-language model",
            dtype=torch_dtype(dtype),
            **common,
        )
        processor = from_pretrained(
            transformers.AutoProcessor.from_pretrained, spec, what="processor", **common
        )
        return cls(model, processor, name=spec, revision=revision, **options).to(device=device)

    def root(self) -> nn.Module:
        return self.model

    # ------------------------------------------------------------------ inputs

    @property
    def image_token(self) -> str:
        token = getattr(self.processor, "image_token", None)
        if token is None:
            token = self.processor.tokenizer.convert_ids_to_tokens(self.image_token_id)
        return str(token)

    def format_prompt(self, prompt: str, *, image: bool) -> str:
        """The text the processor gets for ``prompt`` (see the module docstring)."""
        if not image or self.image_token in prompt:
            return prompt
        if self.prompt_template is None and getattr(self.processor, "chat_template", None):
            conversation = [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}
            ]
            return str(self.processor.apply_chat_template(conversation, add_generation_prompt=True))
        template = self.prompt_template or "{image} {prompt}"
        return template.format(image=self.image_token, prompt=prompt)

    def processor_inputs(
        self, images: Sequence[Any] | None, prompts: Sequence[str], *, padding_side: str = "right"
    ) -> dict[str, Tensor]:
        """The processor's model inputs for (optional) images and prompts."""
        if self.processor is None:
            raise ConfigError(
                f"{type(self.model).__name__} was given without its processor: pass "
                "VLMAdapter(model, processor) or load the model by hub id or path"
            )
        texts = [self.format_prompt(p, image=images is not None) for p in prompts]
        kwargs: dict[str, Any] = dict(text=texts, padding=True, return_tensors="pt")
        if images is not None:
            kwargs["images"] = list(images)
        tokenizer = getattr(self.processor, "tokenizer", None)
        side = getattr(tokenizer, "padding_side", None)
        try:  # prompts padded on the right: a row's position is its token's index
            if tokenizer is not None:
                tokenizer.padding_side = padding_side
            return dict(self.processor(**kwargs))
        finally:
            if tokenizer is not None and side is not None:
                tokenizer.padding_side = side

    def streams_of(self, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
        """``(B, T)`` int8: image positions, prompt tokens, padding."""
        streams = torch.full(input_ids.shape, TEXT, dtype=torch.int8)
        streams[input_ids.cpu() == self.image_token_id] = IMAGE
        if attention_mask is not None:
            streams[attention_mask.cpu() == 0] = PAD
        return streams

    def _batch(self, batch: InputBatch) -> tuple[dict[str, Tensor], Tensor]:
        samples = batch.samples
        has_image = [s.image is not None for s in samples]
        has_prompt = [s.prompt is not None for s in samples]
        if any(has_image) and not all(has_image):
            raise ConfigError(
                "some inputs of the batch hold an image and others none; give all or none"
            )
        if not any(has_image) and not all(has_prompt):
            missing = [s.source or s.id for s in samples if s.prompt is None]
            raise ConfigError(f"inputs {missing[:3]} hold neither an image nor a prompt")
        prompts = [s.prompt if s.prompt is not None else self.default_prompt for s in samples]
        images = [s.image for s in samples] if all(has_image) else None
        inputs = self.processor_inputs(images, prompts)
        streams = self.streams_of(inputs["input_ids"], inputs.get("attention_mask"))
        self._set_vision_map(batch.ids, inputs)
        device = self.device
        dtype = _float_dtype(self.model)
        moved = {
            k: v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device)
            for k, v in inputs.items()
        }
        return moved, streams

    def _set_vision_map(self, ids: Tensor, inputs: dict[str, Tensor]) -> None:
        """Which sample and crop each element of the vision tower's batch is."""
        pixels = inputs.get("pixel_values")
        if pixels is None:
            self._vision_samples = self._vision_crops = None
            return
        if pixels.ndim == 5 and "image_sizes" in inputs:  # LLaVA-NeXT: (B, crops, 3, H, W)
            crops = _next_crop_counts(self.model, inputs["image_sizes"])
        else:
            crops = [1] * len(ids)
        counts = torch.tensor(crops)
        self._vision_samples = ids.repeat_interleave(counts)
        self._vision_crops = torch.cat([torch.arange(n) for n in crops])

    # ------------------------------------------------------------------ running

    def run(self, batch: InputBatch, scope: ForwardScope) -> None:
        inputs, streams = self._batch(batch)
        try:
            with torch.no_grad(), scope.forward(ForwardContext(batch.ids, streams=streams)):
                self.model(**inputs)
        finally:
            self._vision_samples = self._vision_crops = None

    def generate(
        self,
        images: Sequence[Any] | None,
        prompts: Sequence[str] | None = None,
        *,
        max_new_tokens: int = 32,
        scope: ForwardScope | None = None,
        **kwargs: Any,
    ) -> list[str]:
        """``model.generate`` (greedy unless ``kwargs`` say otherwise) on images and/or prompts,
        with the installed hooks in place; the generated texts, decoded."""
        if images is None and prompts is None:
            raise ConfigError("give images, prompts, or both")
        n = len(images) if images is not None else len(prompts or [])
        prompts = list(prompts) if prompts is not None else [self.default_prompt] * n
        if images is not None and len(images) != len(prompts):
            raise ConfigError(f"{len(images)} images but {len(prompts)} prompts")
        inputs = self.processor_inputs(images, prompts, padding_side="left")
        ids = torch.arange(n)
        self._set_vision_map(ids, inputs)
        dtype = _float_dtype(self.model)
        inputs = {
            k: v.to(device=self.device, dtype=dtype) if v.is_floating_point() else v.to(self.device)
            for k, v in inputs.items()
        }
        tokenizer = self.processor.tokenizer
        kwargs.setdefault("do_sample", False)
        kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
        context = ForwardContext(
            ids, streams=self.streams_of(inputs["input_ids"], inputs.get("attention_mask"))
        )
        try:
            with torch.no_grad(), announce(scope, context):
                out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, **kwargs)
        finally:
            self._vision_samples = self._vision_crops = None
        new = out[:, inputs["input_ids"].shape[1] :]
        return [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]

    # ------------------------------------------------------------------ rows

    def part(self, hookpoint: str) -> str | None:
        """Which part a hookpoint lies in: vision_tower, multi_modal_projector, language_model."""
        for part, path in self.parts.items():
            if hookpoint == path or hookpoint.startswith(path + "."):
                return part
        return None

    def flatten(self, hookpoint: str, tensor: Tensor, context: ForwardContext) -> Rows:
        part = self.part(hookpoint)
        if part in ("vision_tower", "multi_modal_projector"):
            return self._image_rows(tensor, context)
        streams = context.streams
        if tensor.ndim != 3 or streams is None or streams.shape[-1] != tensor.shape[1]:
            return rows_from_last_dim(tensor, replace(context, streams=None))
        rows = rows_from_last_dim(tensor, context)
        if not self.keep_padding and rows.stream is not None:
            rows = rows.select(rows.stream != PAD)
        return rows

    def _image_rows(self, tensor: Tensor, context: ForwardContext) -> Rows:
        """Rows of a vision-tower or projector tensor ``(crops, T, d)``: each crop's sample,
        positions numbered on across a sample's crops."""
        samples, crops = self._vision_samples, self._vision_crops
        if (samples is None or crops is None) and tensor.shape[0] == context.batch_size:
            # Not inside one of this adapter's calls (a caller probing the flatten rule): one
            # image per element of the announced batch.
            samples = context.sample_ids
            crops = torch.zeros_like(samples)
        if samples is None or crops is None or tensor.shape[0] != len(samples):
            raise ConfigError(
                f"the vision tower ran on a batch of {tensor.shape[0]}, but the call announced "
                f"{0 if samples is None else len(samples)} images"
            )
        tokens = tensor.reshape(tensor.shape[0], -1, tensor.shape[-1])  # (crops, T, d)
        rows = rows_from_last_dim(tokens, ForwardContext(samples))
        t = tokens.shape[1]
        device = rows.values.device
        rows.position = rows.position + crops.to(device).repeat_interleave(t) * t
        rows.stream = torch.full((len(rows),), IMAGE, dtype=torch.int8, device=device)
        return rows

    # ------------------------------------------------------------------ what each tensor means

    def describe(self, hookpoint: str) -> str:
        part = self.part(hookpoint)
        module = type(self.model.get_submodule(hookpoint)).__name__
        if part == "language_model":
            layers = f"{self.parts[part]}.layers."
            if hookpoint.startswith(layers):
                index, _, child = hookpoint[len(layers) :].partition(".")
                what = (
                    f"residual stream after decoder layer {index}"
                    if not child
                    else f"{child} output of decoder layer {index}"
                )
                return (
                    f"{what} ({module}), (B, T, d): one row per prompt position; image "
                    "positions (stream image), prompt tokens (text), padding "
                    + ("kept (stream pad)" if self.keep_padding else "dropped")
                )
            return f"{module} in the language model: one row per prompt position"
        if part == "vision_tower":
            return (
                f"{module} in the vision tower, (images, 1+P, d): one row per image token "
                "(stream image; CLS at position 0)"
            )
        if part == "multi_modal_projector":
            return (
                "projected image features, (images, P, d_lm): what the language model receives "
                "at the image positions, one row per image feature (stream image)"
            )
        return super().describe(hookpoint)

    def hookpoints(self) -> list[HookpointInfo]:
        out = []
        config = self.model.config
        text_d = getattr(getattr(config, "text_config", None), "hidden_size", None)
        vision_d = getattr(getattr(config, "vision_config", None), "hidden_size", None)
        language = self.parts.get("language_model")
        if language is not None:
            layers = self.model.get_submodule(f"{language}.layers")
            for i in range(len(layers)):
                for suffix in ("", ".self_attn", ".mlp"):
                    name = f"{language}.layers.{i}{suffix}"
                    out.append(HookpointInfo(name, self.describe(name), text_d))
        vision = self.parts.get("vision_tower")
        if vision is not None:
            for name, _ in self.model.get_submodule(vision).named_modules():
                parts = name.split(".")
                if len(parts) >= 2 and parts[-2] == "layers" and parts[-1].isdigit():
                    full = f"{vision}.{name}"
                    out.append(HookpointInfo(full, self.describe(full), vision_d))
        projector = self.parts.get("multi_modal_projector")
        if projector is not None:
            out.append(HookpointInfo(projector, self.describe(projector), text_d))
        return out


def _find_parts(model: nn.Module) -> dict[str, str]:
    """The module path of each part (the shortest path ending in the part's name)."""
    found: dict[str, str] = {}
    for name, _ in model.named_modules():
        last = name.rsplit(".", 1)[-1]
        if last in PARTS and (last not in found or len(name) < len(found[last])):
            found[last] = name
    if "language_model" not in found:
        raise ConfigError(
            f"{type(model).__name__} has no language_model module; VLMAdapter takes LLaVA-style "
            "models (vision_tower, multi_modal_projector, language_model)"
        )
    return found


def _next_crop_counts(model: nn.Module, image_sizes: Tensor) -> list[int]:
    """LLaVA-NeXT's crops per image (the model's own computation from the image sizes)."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    config: Any = model.config
    return [
        int(
            image_size_to_num_patches(
                image_size=size,
                grid_pinpoints=config.image_grid_pinpoints,
                patch_size=config.vision_config.image_size,
            )
        )
        for size in image_sizes
    ]


def _float_dtype(model: nn.Module) -> torch.dtype:
    for parameter in model.parameters():
        if parameter.is_floating_point():
            return parameter.dtype
    return torch.float32
