"""open_clip models behind :class:`~saekit.adapters.clip.ContrastiveAdapter`.

Named ``open_clip:<model>[@<pretrained>]``: ``open_clip:ViT-B-32@laion2b_s34b_b79k`` (a model
name and a pretrained tag, as ``open_clip.create_model_and_transforms`` takes them),
``open_clip:ViT-B-32@/path/to/weights.safetensors`` (a local checkpoint), or
``open_clip:hf-hub:timm/ViT-B-16-SigLIP`` / ``open_clip:local-dir:/path`` (open_clip's own
schemas; a hub id or folder holding ``open_clip_config.json`` is recognised without the
prefix). Checkpoints load with ``weights_only=True``: no pickled code runs.

What to hook (``named_modules()`` of open_clip's model):

* ``visual.transformer.resblocks.{i}``: the image tower's residual stream after block ``i``,
  ``(B, 1+P, d)`` (CLS at position 0, then patches);
* ``...resblocks.{i}.attn`` / ``...resblocks.{i}.mlp``: what attention / the MLP adds;
* ``visual``: the final image embedding ``(B, D)`` (the projection is inside the tower);
* ``transformer.resblocks.{i}``: the text tower's residual stream ``(B, 77, d)`` (tokens, the
  pooled end-of-text token ``eot``; padding dropped); ``ln_final``: the text tower's last
  LayerNorm, whose ``eot`` row times ``text_projection`` is the final text embedding (the
  projection is a parameter, not a module, so it has no hook of its own).
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .._optional import require
from ..configuration import ConfigError
from .base import HookpointInfo
from .clip import ContrastiveAdapter, TextInputs, Tower, _Pattern, text_streams
from .loading import (
    ModelNotFoundError,
    hub_cache_dir,
    offline_mode,
    torch_dtype,
)

PREFIX = "open_clip:"

_OPEN_CLIP_PATTERNS = (
    _Pattern(
        r"(?:visual\.)?transformer\.resblocks\.(\d+)",
        "residual stream after block {0} of the {tower} tower, (B, T, d): {tokens}",
    ),
    _Pattern(
        r"(?:visual\.)?transformer\.resblocks\.(\d+)\.attn",
        "attention output of block {0} of the {tower} tower (what it adds to the residual "
        "stream), (B, T, d): {tokens}",
    ),
    _Pattern(
        r"(?:visual\.)?transformer\.resblocks\.(\d+)\.mlp",
        "MLP output of block {0} of the {tower} tower (what it adds to the residual stream), "
        "(B, T, d): {tokens}",
    ),
    _Pattern(r"visual", "the final image embedding, (B, D), one row per image"),
    _Pattern(r"visual\.ln_post", "the image tower's final LayerNorm, (B, T, d): {tokens}"),
    _Pattern(r"visual\.ln_pre", "the image tower's input after its first LayerNorm: {tokens}"),
    _Pattern(
        r"ln_final",
        "the text tower's final LayerNorm, (B, T, d): {tokens}; the eot row times "
        "text_projection is the final text embedding",
    ),
    _Pattern(r"text", "the final text embedding, (B, D), one row per prompt"),
)


@contextlib.contextmanager
def _cached_files_only(enabled: bool) -> Iterator[None]:
    """Make open_clip's downloads read the Hub cache only (it has no ``local_files_only``)."""
    if not enabled:
        yield
        return
    from open_clip import pretrained

    hub_download = pretrained.hf_hub_download
    url_download = pretrained.download_pretrained_from_url

    def no_url_download(url: str, *args: Any, **kwargs: Any) -> str:
        raise FileNotFoundError(f"{url} is not downloaded when only local files may be used")

    pretrained.hf_hub_download = functools.partial(hub_download, local_files_only=True)
    pretrained.download_pretrained_from_url = no_url_download
    try:
        yield
    finally:
        pretrained.hf_hub_download = hub_download
        pretrained.download_pretrained_from_url = url_download


def parse_spec(spec: str) -> tuple[str, str | None]:
    """``"open_clip:ViT-B-32@laion2b"`` -> ``("ViT-B-32", "laion2b")``."""
    name = spec[len(PREFIX) :] if spec.startswith(PREFIX) else spec
    model_name, at, pretrained = name.partition("@")
    if not model_name:
        raise ConfigError(
            f"an open_clip model is named 'open_clip:<model>[@<pretrained tag or checkpoint>]', "
            f"got {spec!r}"
        )
    return model_name, (pretrained or None) if at else None


class OpenCLIPAdapter(ContrastiveAdapter):
    """An open_clip model (``open_clip.CLIP``, ``CustomTextCLIP``).

    Args:
        model: the model.
        preprocess: its image transform (PIL -> ``(3, H, W)``), as
            ``create_model_and_transforms`` returns it; needed for PIL images.
        tokenizer: ``open_clip.get_tokenizer(name)``; needed for prompts.
        keep_padding: keep rows of text padding (dropped by default).
        name, revision: recorded with caches.
    """

    patterns: ClassVar[tuple[_Pattern, ...]] = _OPEN_CLIP_PATTERNS

    def __init__(
        self,
        model: nn.Module,
        *,
        preprocess: Any = None,
        tokenizer: Any = None,
        keep_padding: bool = False,
        name: str | None = None,
        revision: str | None = None,
    ) -> None:
        super().__init__(model, keep_padding=keep_padding, name=name, revision=revision)
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        if getattr(model, "logit_bias", None) is not None:
            self.objective = "sigmoid"  # SigLIP weights in open_clip

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
        cache_dir: str | None = None,
    ) -> OpenCLIPAdapter:
        """``open_clip.create_model_and_transforms`` and ``get_tokenizer`` for ``spec`` (see the
        module docstring). ``revision`` is not used by open_clip (a pretrained tag or a
        checkpoint names the weights)."""
        open_clip = require("open_clip", "open_clip models")
        model_name, pretrained = parse_spec(spec)
        if revision:
            raise ConfigError(
                "open_clip names weights by a pretrained tag or checkpoint path, not a revision: "
                f"use 'open_clip:{model_name}@<tag or path>'"
            )
        local_files_only = local_files_only or offline_mode()
        try:
            with _cached_files_only(local_files_only):
                model, _, preprocess = open_clip.create_model_and_transforms(
                    model_name,
                    pretrained=pretrained,
                    cache_dir=cache_dir,
                    weights_only=True,  # never unpickle code from a checkpoint
                )
                tokenizer = open_clip.get_tokenizer(model_name, cache_dir=cache_dir)
        except (OSError, RuntimeError) as err:
            where = pretrained or model_name
            mode = (
                "only local files may be used (HF_HUB_OFFLINE or local_files_only), so nothing "
                "was downloaded"
                if local_files_only
                else "it could not be downloaded"
            )
            raise ModelNotFoundError(
                f"cannot load the open_clip model {model_name!r}"
                + (f" with pretrained={pretrained!r}" if pretrained else "")
                + f": {where} is neither a local checkpoint nor cached under {cache_dir or hub_cache_dir()}"
                f", and {mode} ({type(err).__name__}: {str(err).splitlines()[0][:300]}). Known "
                "tags: open_clip.list_pretrained(); or give a local checkpoint as "
                f"'open_clip:{model_name}@/path/to/weights.safetensors'"
            ) from err
        adapter = cls(
            model,
            preprocess=preprocess,
            tokenizer=tokenizer,
            keep_padding=keep_padding,
            name=spec if spec.startswith(PREFIX) else PREFIX + spec,
        )
        return adapter.to(device=device, dtype=torch_dtype(dtype))

    # ------------------------------------------------------------------ towers

    def tower_prefixes(self) -> dict[Tower, str]:
        prefixes: dict[Tower, str] = {}
        children = dict(self.model.named_children())
        if "visual" in children:
            prefixes["image"] = "visual"
        if "transformer" in children or "text" in children:
            prefixes["text"] = ""
        return prefixes

    def tower(self, hookpoint: str) -> Tower | None:
        head = hookpoint.split(".", 1)[0]
        if head == "visual":
            return "image"
        if head in ("transformer", "token_embedding", "ln_final", "text"):
            return "text"
        return None

    @property
    def has_cls(self) -> bool:
        return getattr(getattr(self.model, "visual", None), "class_embedding", None) is not None

    def describe(self, hookpoint: str) -> str:
        # Tower-relative paths would lose the visual./text distinction of resblocks: match the
        # full path.
        tower = self.tower(hookpoint)
        if tower is None:
            return super().describe(hookpoint)
        tokens = (
            "CLS at position 0 (stream cls), then patches (stream patch)"
            if tower == "image" and self.has_cls
            else "one token per patch (stream patch)"
            if tower == "image"
            else "tokens (stream text), the pooled end-of-text token (eot); " + self._padding()
        )
        for pattern in self.patterns:
            match = re.fullmatch(pattern.regex, hookpoint)
            if match:
                return pattern.template.format(*match.groups(), tower=tower, tokens=tokens)
        return f"{type(self.model.get_submodule(hookpoint)).__name__} in the {tower} tower"

    def hookpoints(self) -> list[HookpointInfo]:
        out = []
        for prefix in ("visual.transformer", "transformer"):
            try:
                blocks = self.model.get_submodule(f"{prefix}.resblocks")
            except AttributeError:
                continue
            width = getattr(self.model.get_submodule(prefix), "width", None)
            for i in range(len(blocks)):
                for suffix in ("", ".attn", ".mlp"):
                    name = f"{prefix}.resblocks.{i}{suffix}"
                    out.append(HookpointInfo(name, self.describe(name), width))
        embed_dim = getattr(getattr(self.model, "visual", None), "output_dim", None)
        text_width = getattr(getattr(self.model, "transformer", None), "width", None)
        children = dict(self.model.named_children())
        for name, d in (("visual", embed_dim), ("ln_final", text_width), ("text", embed_dim)):
            if name in children:
                out.append(HookpointInfo(name, self.describe(name), d))
        return out

    # ------------------------------------------------------------------ inputs

    def image_inputs(self, images: Sequence[Any]) -> Tensor:
        if self.preprocess is None:
            raise ConfigError(
                "this open_clip model was given without its image transform: pass "
                "OpenCLIPAdapter(model, preprocess=...) (from create_model_and_transforms), or "
                "give preprocessed tensors"
            )
        return torch.stack([self.preprocess(image) for image in images])

    def text_inputs(self, prompts: Sequence[str]) -> TextInputs:
        if self.tokenizer is None:
            raise ConfigError(
                "this open_clip model was given without a tokenizer: pass "
                "OpenCLIPAdapter(model, tokenizer=open_clip.get_tokenizer(name))"
            )
        return self.token_streams(self.tokenizer(list(prompts)))

    def token_streams(self, ids: Tensor) -> TextInputs:
        pool = getattr(self.model, "text_pool_type", "argmax")
        batch = ids.shape[0]
        if pool == "argmax":
            pooled_at = ids.argmax(-1)
        elif pool == "eos":
            pooled_at = (ids == getattr(self.model, "text_eos_id", -1)).int().argmax(-1)
        elif pool == "first":
            pooled_at = torch.zeros(batch, dtype=torch.long)
        else:  # "last", and the custom (HF) text towers, which pool inside
            pooled_at = torch.full((batch,), ids.shape[1] - 1, dtype=torch.long)
        pad_id = getattr(self.tokenizer, "pad_token_id", None)
        pad = ids == (0 if pad_id is None else pad_id)
        pad &= torch.arange(ids.shape[1])[None, :] != pooled_at[:, None]
        return TextInputs(ids, None, text_streams(ids, pooled_at, pad))

    # ------------------------------------------------------------------ calls

    def _call(self, pixels: Tensor | None, text: TextInputs | None) -> None:
        if pixels is not None:
            self.model.encode_image(pixels)
        if text is not None:
            self.model.encode_text(text.ids)

    def _image_embeddings(self, pixels: Tensor) -> Tensor:
        return self.model.encode_image(pixels)

    def _text_embeddings(self, text: TextInputs) -> Tensor:
        return self.model.encode_text(text.ids)
