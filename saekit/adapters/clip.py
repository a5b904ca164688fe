"""Contrastive vision-language models: transformers CLIP and SigLIP here, open_clip in
:mod:`.openclip`, both behind :class:`ContrastiveAdapter`.

What to hook (transformers >= 5 module paths of a ``CLIPModel``; a ``CLIPVisionModel`` alone
drops the ``vision_model.`` prefix):

* ``vision_model.encoder.layers.{i}``: the image tower's residual stream after block ``i``,
  ``(B, 1+P, d)``: the CLS token at position 0 (stream ``cls``) and P patch tokens (stream
  ``patch``; SigLIP has no CLS token, every position is a patch). One row per token; keep
  ``--streams cls`` or ``--streams patch`` (or ``--positions 0``) to select.
* ``...layers.{i}.self_attn`` / ``...layers.{i}.mlp``: what attention / the MLP adds to it.
* ``text_model.encoder.layers.{i}``: the text tower's residual stream ``(B, T, d)``, tokens up
  to the end-of-text token (stream ``text``), the pooled end-of-text token itself (``eot``);
  padding after it (``pad``) is dropped unless ``keep_padding=True``.
* ``visual_projection`` / ``text_projection`` (SigLIP: ``vision_model.head`` /
  ``text_model.head``): the final embeddings, ``(B, D)``, one row per input (stream
  ``pooled``).

A batch of images runs the image tower, a batch of prompts the text tower, image+prompt pairs
both (in one call). Zero-shot classification and retrieval on top of the same adapter are in
:mod:`.zero_shot`.
"""

from __future__ import annotations

import re
from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Literal

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
    Sample,
    rows_from_last_dim,
    rows_of_stream,
)
from .loading import from_pretrained, torch_dtype

STREAMS = ("cls", "patch", "text", "eot", "pad", "pooled")
"""Stream names of contrastive models: image-tower CLS and patch tokens, text tokens, the
end-of-text token the text tower pools at, text padding, and pooled embeddings."""
CLS, PATCH, TEXT, EOT, PAD, POOLED = range(len(STREAMS))

Tower = Literal["image", "text"]


@dataclass
class TextInputs:
    """A tokenised batch of prompts."""

    ids: Tensor
    """``(B, T)`` int64 token ids."""
    attention_mask: Tensor | None
    """``(B, T)`` 1 for real tokens (None: the model takes no mask)."""
    streams: Tensor
    """``(B, T)`` int8: :data:`TEXT`, :data:`EOT` or :data:`PAD` per position."""


def text_streams(ids: Tensor, pooled_at: Tensor, pad: Tensor | None = None) -> Tensor:
    """Streams of text positions: ``text`` before the pooled position ``pooled_at`` ``(B,)``,
    ``eot`` there, ``pad`` after it and wherever ``pad`` ``(B, T)`` is true."""
    positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)  # (B, T)
    at = pooled_at.to(ids.device)[:, None]
    streams = torch.full(ids.shape, TEXT, dtype=torch.int8, device=ids.device)
    streams[positions > at] = PAD
    if pad is not None:
        streams[pad.to(ids.device)] = PAD
    streams[positions == at] = EOT
    return streams


@dataclass(frozen=True)
class _Pattern:
    regex: str
    template: str


class ContrastiveAdapter(ModelAdapter):
    """What CLIP-like models share: an image tower and a text tower, pooled embeddings compared
    by a scaled cosine similarity. Subclasses know their library (transformers, open_clip)."""

    family: ClassVar[str] = "clip"
    streams = STREAMS
    objective: Literal["softmax", "sigmoid"] = "softmax"
    """How the logits are read: CLIP's softmax over classes, or SigLIP's per-pair sigmoid."""

    # (regex over a tower-relative path, description template) for describe(); {i} = block.
    patterns: ClassVar[tuple[_Pattern, ...]] = ()

    def __init__(
        self,
        model: nn.Module,
        *,
        keep_padding: bool = False,
        name: str | None = None,
        revision: str | None = None,
    ) -> None:
        self.model: Any = model  # a transformers or open_clip model
        self.keep_padding = keep_padding
        self.model_name = name
        self.revision = revision

    # ------------------------------------------------------------------ what subclasses say

    @abstractmethod
    def tower(self, hookpoint: str) -> Tower | None:
        """Which tower the module at ``hookpoint`` belongs to (None: neither, e.g. the root)."""

    @abstractmethod
    def image_inputs(self, images: Sequence[Any]) -> Tensor:
        """PIL images -> the image tower's pixel values ``(B, 3, H, W)``."""

    @abstractmethod
    def text_inputs(self, prompts: Sequence[str]) -> TextInputs:
        """Prompts -> token ids, mask and streams."""

    @abstractmethod
    def token_streams(self, ids: Tensor) -> TextInputs:
        """Already tokenised ids ``(B, T)`` -> the same, with streams."""

    @abstractmethod
    def _call(self, pixels: Tensor | None, text: TextInputs | None) -> None:
        """One model call running the image tower (pixels), the text tower (text), or both."""

    @abstractmethod
    def _image_embeddings(self, pixels: Tensor) -> Tensor:
        """``(B, D)`` final image embeddings (not normalised)."""

    @abstractmethod
    def _text_embeddings(self, text: TextInputs) -> Tensor:
        """``(B, D)`` final text embeddings (not normalised)."""

    @property
    @abstractmethod
    def has_cls(self) -> bool:
        """Whether position 0 of the image tower's tokens is a CLS token."""

    @abstractmethod
    def tower_prefixes(self) -> dict[Tower, str]:
        """The path prefix of each tower present (``""`` for a model that is one tower)."""

    def logit_scale(self) -> float:
        """The learned temperature: logits are ``scale · cos(image, text) + bias``."""
        scale = getattr(self.model, "logit_scale", None)
        if scale is None:
            raise ConfigError(
                f"{type(self.model).__name__} has no logit_scale: zero-shot logits need a model "
                "with both towers (CLIPModel, SiglipModel, an open_clip model)"
            )
        return float(scale.detach().float().exp())

    def logit_bias(self) -> float:
        bias = getattr(self.model, "logit_bias", None)
        return 0.0 if bias is None else float(bias.detach().float().reshape(-1)[0])

    # ------------------------------------------------------------------ the adapter

    def root(self) -> nn.Module:
        return self.model

    def run(self, batch: InputBatch, scope: ForwardScope) -> None:
        pixels, text = self._batch_inputs(batch.samples)
        context = ForwardContext(batch.ids, streams=None if text is None else text.streams)
        with torch.no_grad(), scope.forward(context):
            self._call(pixels, text)

    def _batch_inputs(self, samples: Sequence[Sample]) -> tuple[Tensor | None, TextInputs | None]:
        """The pixel values and/or tokens of a batch: images (PIL), prompts, image+prompt
        pairs, or tensors (float: preprocessed pixel values ``(3, H, W)``; integer: token ids)."""
        images = [s.image for s in samples]
        prompts = [s.prompt for s in samples]
        tensors = [s.tensor for s in samples]
        pixels = text = None
        if all(t is not None for t in tensors):
            stacked = torch.stack([t for t in tensors if t is not None])
            if stacked.is_floating_point():
                pixels = stacked
            else:
                text = self.token_streams(stacked.long())
        elif any(image is not None for image in images):
            _require_all(samples, images, "an image")
            if "image" not in self.tower_prefixes():
                raise ConfigError(
                    f"{type(self.model).__name__} has no image tower; give it prompts"
                )
            pixels = self.image_inputs(images)
        if any(prompt is not None for prompt in prompts):
            _require_all(samples, prompts, "a prompt")
            if "text" not in self.tower_prefixes():
                raise ConfigError(f"{type(self.model).__name__} has no text tower; give it images")
            text = self.text_inputs([p for p in prompts if p is not None])
        if pixels is None and text is None:
            raise ConfigError("the inputs hold neither images, prompts nor tensors")
        device = self.device
        if pixels is not None:
            pixels = pixels.to(device=device, dtype=self._float_dtype())
        if text is not None:
            text = TextInputs(
                text.ids.to(device),
                None if text.attention_mask is None else text.attention_mask.to(device),
                text.streams,
            )
        return pixels, text

    def _float_dtype(self) -> torch.dtype:
        for parameter in self.model.parameters():
            if parameter.is_floating_point():
                return parameter.dtype
        return torch.float32

    def flatten(self, hookpoint: str, tensor: Tensor, context: ForwardContext) -> Rows:
        batch = context.batch_size
        if tensor.ndim == 3 and tensor.shape[0] != batch and tensor.shape[1] == batch:
            tensor = tensor.transpose(0, 1)  # a (T, B, d) sequence-first layout
        if tensor.ndim == 2:  # pooled (B, d): one row per input
            return rows_of_stream(tensor, context, POOLED)
        tower = self.tower(hookpoint)
        if tower == "image":
            rows = rows_from_last_dim(tensor, replace(context, streams=None))
            stream = torch.full_like(rows.position, PATCH, dtype=torch.int8)
            if self.has_cls:
                stream[rows.position == 0] = CLS
            rows.stream = stream
            return rows
        if tower == "text" and context.streams is not None:
            if context.streams.shape[-1] != tensor.shape[1]:
                raise ConfigError(
                    f"{hookpoint} has {tensor.shape[1]} positions but the prompts were "
                    f"tokenised to {context.streams.shape[-1]}"
                )
            rows = rows_from_last_dim(tensor, context)
            if not self.keep_padding and rows.stream is not None:
                rows = rows.select(rows.stream != PAD)
            return rows
        return rows_from_last_dim(tensor, replace(context, streams=None))

    # ------------------------------------------------------------------ what each tensor means

    def _padding(self) -> str:
        return "padding kept (stream pad)" if self.keep_padding else "padding dropped"

    def describe(self, hookpoint: str) -> str:
        tower = self.tower(hookpoint)
        if tower is None:
            return super().describe(hookpoint)
        prefix = self.tower_prefixes()[tower]
        relative = hookpoint[len(prefix) + 1 :] if prefix else hookpoint
        tokens = (
            (
                "CLS at position 0 (stream cls), then patches (stream patch)"
                if self.has_cls
                else "one token per patch (stream patch)"
            )
            if tower == "image"
            else "tokens (stream text), the pooled end-of-text token (eot); " + self._padding()
        )
        for pattern in self.patterns:
            match = re.fullmatch(pattern.regex, relative)
            if match:
                return pattern.template.format(*match.groups(), tower=tower, tokens=tokens)
        return f"{type(self.model.get_submodule(hookpoint)).__name__} in the {tower} tower"

    # ------------------------------------------------------------------ embeddings

    @torch.no_grad()
    def encode_images(self, images: Sequence[Any] | Tensor, *, batch_size: int = 64) -> Tensor:
        """``(N, D)`` final image embeddings (not normalised) of PIL images or pixel values
        ``(N, 3, H, W)``, with whatever hooks are installed on the model."""
        out = []
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            pixels = chunk if isinstance(chunk, Tensor) else self.image_inputs(list(chunk))
            pixels = pixels.to(device=self.device, dtype=self._float_dtype())
            out.append(self._image_embeddings(pixels).float())
        return torch.cat(out) if out else torch.empty(0)

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str], *, batch_size: int = 256) -> Tensor:
        """``(N, D)`` final text embeddings (not normalised) of ``texts``."""
        out = []
        for start in range(0, len(texts), batch_size):
            inputs = self.text_inputs(list(texts[start : start + batch_size]))
            inputs = TextInputs(
                inputs.ids.to(self.device),
                None if inputs.attention_mask is None else inputs.attention_mask.to(self.device),
                inputs.streams,
            )
            out.append(self._text_embeddings(inputs).float())
        return torch.cat(out) if out else torch.empty(0)


def _require_all(samples: Sequence[Sample], values: Sequence[Any], what: str) -> None:
    missing = [s.source or s.id for s, v in zip(samples, values, strict=True) if v is None]
    if missing:
        raise ConfigError(
            f"inputs {missing[:3]} hold no {what.split()[-1]} while others in the batch do; "
            f"give every input {what} (or none)"
        )


def _pooled(output: Any, *names: str) -> Tensor:
    """The pooled embedding in a transformers output (a tensor in transformers 4)."""
    if isinstance(output, Tensor):
        return output
    for name in names:
        value = getattr(output, name, None)
        if isinstance(value, Tensor):
            return value
    raise TypeError(f"no pooled embedding ({', '.join(names)}) in {type(output).__name__}")


# --------------------------------------------------------------------------------- transformers

_TRANSFORMERS_PATTERNS = (
    _Pattern(
        r"encoder\.layers\.(\d+)",
        "residual stream after block {0} of the {tower} tower, (B, T, d): {tokens}",
    ),
    _Pattern(
        r"encoder\.layers\.(\d+)\.self_attn",
        "attention output of block {0} of the {tower} tower (what it adds to the residual "
        "stream), (B, T, d): {tokens}",
    ),
    _Pattern(
        r"encoder\.layers\.(\d+)\.mlp",
        "MLP output of block {0} of the {tower} tower (what it adds to the residual stream), "
        "(B, T, d): {tokens}",
    ),
    _Pattern(r"embeddings", "token embeddings of the {tower} tower, (B, T, d): {tokens}"),
    _Pattern(r"pre_layrnorm", "image tower input after its first LayerNorm, (B, T, d): {tokens}"),
    _Pattern(
        r"post_layernorm",
        "the {tower} tower's final LayerNorm (CLIP: the pooled CLS token, (B, d), one row per "
        "image; SigLIP: every token, (B, T, d))",
    ),
    _Pattern(
        r"final_layer_norm",
        "the text tower's final LayerNorm, (B, T, d): {tokens}",
    ),
    _Pattern(r"head", "the pooled {tower} embedding (SigLIP head), (B, D), one row per input"),
    _Pattern(r"visual_projection", "the final image embedding, (B, D), one row per image"),
    _Pattern(r"text_projection", "the final text embedding, (B, D), one row per prompt"),
)


class CLIPAdapter(ContrastiveAdapter):
    """transformers ``CLIPModel`` / ``SiglipModel`` and their one-tower classes
    (``CLIPVisionModel[WithProjection]``, ``CLIPTextModel[WithProjection]``,
    ``SiglipVisionModel``, ``SiglipTextModel``).

    Args:
        model: the model.
        tokenizer: its tokenizer (needed for prompts).
        image_processor: its image processor (default: one built from the vision config with
            the model family's normalisation).
        keep_padding: keep rows of text padding (dropped by default: they carry no input).
        name, revision: the hub id or path and revision, recorded with caches.
    """

    patterns = _TRANSFORMERS_PATTERNS

    def __init__(
        self,
        model: nn.Module,
        *,
        tokenizer: Any = None,
        image_processor: Any = None,
        keep_padding: bool = False,
        name: str | None = None,
        revision: str | None = None,
    ) -> None:
        super().__init__(model, keep_padding=keep_padding, name=name, revision=revision)
        self.tokenizer = tokenizer
        self._image_processor = image_processor
        config = model.config
        self.model_type: str = str(getattr(config, "model_type", ""))
        self.is_siglip = self.model_type.startswith("siglip")
        self.objective = "sigmoid" if self.is_siglip else "softmax"
        text_config = getattr(config, "text_config", config)
        self._eos_token_id = getattr(text_config, "eos_token_id", None)
        self._pad_token_id = getattr(text_config, "pad_token_id", None)
        self._max_text_tokens = getattr(text_config, "max_position_embeddings", None)
        names = dict(model.named_children())
        self._prefixes: dict[Tower, str] = {}
        if "vision_model" in names:
            self._prefixes["image"] = "vision_model"
        if "text_model" in names:
            self._prefixes["text"] = "text_model"
        if not self._prefixes:  # a one-tower model: its own modules are the tower
            self._prefixes["image" if "Vision" in type(model).__name__ else "text"] = ""

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
        keep_padding: bool = False,
    ) -> CLIPAdapter:
        """Load a CLIP or SigLIP model (and its tokenizer and image processor, where the folder
        has them) by hub id or local path with transformers' ``from_pretrained``."""
        transformers = require("transformers", "CLIP models")
        common: dict[str, Any] = dict(
            revision=revision,
            local_files_only=local_files_only,
            trust_remote_code=trust_remote_code,
        )
        model = from_pretrained(
            transformers.AutoModel.from_pretrained,
            spec,
            what="CLIP/SigLIP model",
            dtype=torch_dtype(dtype),
            **common,
        )
        tokenizer = _optional_component(transformers.AutoTokenizer.from_pretrained, spec, common)
        processor = _optional_component(
            transformers.AutoImageProcessor.from_pretrained, spec, common
        )
        adapter = cls(
            model,
            tokenizer=tokenizer,
            image_processor=processor,
            keep_padding=keep_padding,
            name=spec,
            revision=revision,
        )
        return adapter.to(device=device)

    # ------------------------------------------------------------------ towers

    def tower_prefixes(self) -> dict[Tower, str]:
        return dict(self._prefixes)

    def tower(self, hookpoint: str) -> Tower | None:
        for tower, prefix in self._prefixes.items():
            if not prefix or hookpoint == prefix or hookpoint.startswith(prefix + "."):
                return tower
        if hookpoint == "visual_projection":
            return "image"
        if hookpoint == "text_projection":
            return "text"
        return None

    @property
    def has_cls(self) -> bool:
        return not self.is_siglip

    def hookpoints(self) -> list[HookpointInfo]:
        config = self.model.config
        out = []
        for tower, prefix in self._prefixes.items():
            tower_config = (
                getattr(config, "vision_config" if tower == "image" else "text_config", None)
                or config
            )
            d = getattr(tower_config, "hidden_size", None)
            layers = self.model.get_submodule(
                f"{prefix}.encoder.layers" if prefix else "encoder.layers"
            )
            base = f"{prefix}." if prefix else ""
            for i in range(len(layers)):
                for suffix in ("", ".self_attn", ".mlp"):
                    name = f"{base}encoder.layers.{i}{suffix}"
                    out.append(HookpointInfo(name, self.describe(name), d))
        names = dict(self.model.named_modules())
        projection_dim = getattr(config, "projection_dim", None)
        vision = getattr(getattr(config, "vision_config", None), "hidden_size", None)
        text_config = getattr(config, "text_config", None)
        text = getattr(text_config, "projection_size", None) or getattr(
            text_config, "hidden_size", None
        )
        # CLIP projects to projection_dim; SigLIP's heads keep their tower's width.
        finals = {
            "visual_projection": projection_dim,
            "text_projection": projection_dim,
            "vision_model.head": vision,
            "text_model.head": text,
        }
        for name, d in finals.items():
            if name in names:
                out.append(HookpointInfo(name, self.describe(name), d))
        return out

    # ------------------------------------------------------------------ inputs

    @property
    def image_processor(self) -> Any:
        if self._image_processor is None:
            self._image_processor = _default_image_processor(self.model.config, self.is_siglip)
        return self._image_processor

    def image_inputs(self, images: Sequence[Any]) -> Tensor:
        return self.image_processor(images=list(images), return_tensors="pt")["pixel_values"]

    def text_inputs(self, prompts: Sequence[str]) -> TextInputs:
        if self.tokenizer is None:
            raise ConfigError(
                f"{type(self.model).__name__} was given without a tokenizer: pass "
                "CLIPAdapter(model, tokenizer=...) or load the model by hub id or path"
            )
        encoded = self.tokenizer(
            list(prompts),
            # SigLIP was trained on text padded to its full length (it pools the last token).
            padding="max_length" if self.is_siglip else True,
            truncation=True,
            max_length=self._max_text_tokens,
            return_tensors="pt",
        )
        inputs = self.token_streams(encoded["input_ids"])
        if not self.is_siglip and "attention_mask" in encoded:
            inputs.attention_mask = encoded["attention_mask"]
        return inputs

    def token_streams(self, ids: Tensor) -> TextInputs:
        if self.is_siglip:  # pools the last position
            pooled_at = torch.full((ids.shape[0],), ids.shape[1] - 1, dtype=torch.long)
        elif self._eos_token_id == 2:  # transformers' legacy CLIP configs: the highest id
            pooled_at = ids.argmax(-1)
        else:
            pooled_at = torch.eq(ids, int(self._eos_token_id or 0)).int().argmax(-1)
        pad = None if self._pad_token_id is None else torch.eq(ids, int(self._pad_token_id))
        if pad is not None and not self.is_siglip:
            pad &= torch.arange(ids.shape[1])[None, :] > pooled_at[:, None]
        return TextInputs(ids, None, text_streams(ids, pooled_at, pad))

    # ------------------------------------------------------------------ calls

    def _text_kwargs(self, text: TextInputs) -> dict[str, Tensor]:
        kwargs = {"input_ids": text.ids}
        if text.attention_mask is not None:
            kwargs["attention_mask"] = text.attention_mask
        return kwargs

    def _call(self, pixels: Tensor | None, text: TextInputs | None) -> None:
        both = len(self._prefixes) == 2
        if pixels is not None and "image" not in self._prefixes:
            raise ConfigError(f"{type(self.model).__name__} has no image tower; give prompts")
        if text is not None and "text" not in self._prefixes:
            raise ConfigError(f"{type(self.model).__name__} has no text tower; give images")
        if both and pixels is not None and text is not None:
            self.model(pixel_values=pixels, **self._text_kwargs(text))
        elif both and pixels is not None:
            self.model.get_image_features(pixel_values=pixels)
        elif both and text is not None:
            self.model.get_text_features(**self._text_kwargs(text))
        elif pixels is not None:
            self.model(pixel_values=pixels)
        elif text is not None:
            self.model(**self._text_kwargs(text))

    def _image_embeddings(self, pixels: Tensor) -> Tensor:
        if "text" in self._prefixes:  # both towers
            return _pooled(self.model.get_image_features(pixel_values=pixels), "pooler_output")
        return _pooled(self.model(pixel_values=pixels), "image_embeds", "pooler_output")

    def _text_embeddings(self, text: TextInputs) -> Tensor:
        if "image" in self._prefixes:
            return _pooled(self.model.get_text_features(**self._text_kwargs(text)), "pooler_output")
        return _pooled(self.model(**self._text_kwargs(text)), "text_embeds", "pooler_output")


def _optional_component(load: Any, spec: str, common: dict[str, Any]) -> Any:
    """A tokenizer or processor when the model folder has one (a vision-only CLIP has no
    tokenizer), else None."""
    try:
        return load(spec, **common)
    except (OSError, ValueError, KeyError, TypeError):
        return None


# OpenAI CLIP's pixel normalisation (Radford et al. 2021); SigLIP normalises to [-1, 1].
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _default_image_processor(config: Any, siglip: bool) -> Any:
    transformers = require("transformers", "CLIP models")
    vision = getattr(config, "vision_config", config)
    size = int(vision.image_size)
    if siglip:
        return transformers.SiglipImageProcessor(
            size={"height": size, "width": size}, image_mean=[0.5] * 3, image_std=[0.5] * 3
        )
    return transformers.CLIPImageProcessor(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )
