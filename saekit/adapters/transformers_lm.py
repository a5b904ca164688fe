"""Any transformers text model by hub id or path: causal language models (Llama, GPT-2, ...)
and encoders (BERT, ...), fed prompts or token ids.

What to hook: the decoder/encoder layers, whose output is the residual stream after the layer
(``model.layers.{i}`` of a Llama-style causal LM, ``encoder.layer.{i}`` of a BERT), and their
attention / MLP children; :meth:`TransformersAdapter.hookpoints` lists them for the model at
hand. A row is one token of one prompt. Streams: ``text``, ``special`` (BOS, CLS, SEP, ...:
their activations are outliers that dictionaries often exclude, ``--streams text``) and
``pad``, whose rows are dropped unless ``keep_padding=True``. Prompts are padded on the right,
so a row's position is its token's index in its prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
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
    announce,
    rows_from_last_dim,
)
from .loading import from_pretrained, torch_dtype

STREAMS = ("text", "special", "pad")
TEXT, SPECIAL, PAD = range(len(STREAMS))

ModelClass = Literal["auto", "causal-lm", "base"]

_SUBLAYER_NAMES = ("self_attn", "attention", "attn", "mlp", "feed_forward", "ffn", "output")


def token_streams(ids: Tensor, attention_mask: Tensor | None, special_ids: Sequence[int]) -> Tensor:
    """``(B, T)`` int8 stream of every position: pad where the mask is 0, special for the
    tokenizer's special tokens, text otherwise."""
    streams = torch.full(ids.shape, TEXT, dtype=torch.int8)
    if special_ids:
        streams[torch.isin(ids.cpu(), torch.tensor(list(special_ids)))] = SPECIAL
    if attention_mask is not None:
        streams[attention_mask.cpu() == 0] = PAD
    return streams


def find_layers(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The model's stack of transformer layers: the longest ``ModuleList`` whose items share
    one class (``model.layers``, ``encoder.layer``, ``transformer.h``, ...)."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        uniform = isinstance(module, nn.ModuleList) and len({type(m) for m in module}) == 1
        if uniform and (best is None or len(module) > len(best[1])):
            best = (name, module)
    return best


class TransformersAdapter(ModelAdapter):
    """A transformers text model and its tokenizer.

    Args:
        model: any transformers model taking ``input_ids`` and ``attention_mask``.
        tokenizer: its tokenizer (needed for prompts; token-id tensors need none).
        max_length: truncate prompts to this many tokens (default: the tokenizer's limit).
        keep_padding: keep rows of padding positions (dropped by default).
        name, revision: recorded with caches.
    """

    family: ClassVar[str] = "transformers"
    streams = STREAMS

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any = None,
        *,
        max_length: int | None = None,
        keep_padding: bool = False,
        name: str | None = None,
        revision: str | None = None,
    ) -> None:
        self.model: Any = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.keep_padding = keep_padding
        self.model_name = name
        self.revision = revision

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
        model_class: ModelClass = "auto",
        max_length: int | None = None,
        keep_padding: bool = False,
    ) -> TransformersAdapter:
        """Load a model and its tokenizer with transformers' ``from_pretrained``.
        ``model_class``: ``causal-lm`` (``AutoModelForCausalLM``, which can generate),
        ``base`` (``AutoModel``), or ``auto`` (causal-lm when the config's architectures name a
        ``...ForCausalLM``)."""
        transformers = require("transformers", "transformers models")
        common: dict[str, Any] = dict(
            revision=revision,
            local_files_only=local_files_only,
            trust_remote_code=trust_remote_code,
        )
        if model_class not in ("auto", "causal-lm", "base"):
            raise ConfigError(f"model_class must be auto, causal-lm or base, got {model_class!r}")
        if model_class == "auto":
            config = from_pretrained(
                transformers.AutoConfig.from_pretrained, spec, what="model configuration", **common
            )
            architectures = getattr(config, "architectures", None) or []
            causal = any(str(a).endswith("ForCausalLM") for a in architectures)
            model_class = "causal-lm" if causal else "base"
        loader = (
            transformers.AutoModelForCausalLM
            if model_class == "causal-lm"
            else transformers.AutoModel
        )
        model = from_pretrained(
            loader.from_pretrained,
            spec,
            what="transformers model",
            dtype=torch_dtype(dtype),
            **common,
        )
        tokenizer = from_pretrained(
            transformers.AutoTokenizer.from_pretrained, spec, what="tokenizer", **common
        )
        adapter = cls(
            model,
            tokenizer,
            max_length=max_length,
            keep_padding=keep_padding,
            name=spec,
            revision=revision,
        )
        return adapter.to(device=device)

    def root(self) -> nn.Module:
        return self.model

    # ------------------------------------------------------------------ inputs

    def tokenize(self, prompts: Sequence[str], *, padding_side: str = "right") -> dict[str, Tensor]:
        if self.tokenizer is None:
            raise ConfigError(
                f"{type(self.model).__name__} was given without a tokenizer: pass "
                "TransformersAdapter(model, tokenizer) or feed token-id tensors"
            )
        if self.tokenizer.pad_token is None:  # GPT-2-style tokenizers: pad with EOS, masked out
            self.tokenizer.pad_token = self.tokenizer.eos_token
        return dict(
            self.tokenizer(
                list(prompts),
                padding=True,
                truncation=True,
                max_length=self.max_length,
                padding_side=padding_side,
                return_tensors="pt",
            )
        )

    def _special_ids(self) -> list[int]:
        if self.tokenizer is None:
            return []
        pad = self.tokenizer.pad_token_id
        return [i for i in self.tokenizer.all_special_ids if i != pad]

    def batch_inputs(self, batch: InputBatch) -> tuple[dict[str, Tensor], Tensor]:
        """Model keyword arguments and ``(B, T)`` streams of a batch of prompts or token ids."""
        if all(s.tensor is not None for s in batch.samples):
            ids = batch.stacked_tensors().long()  # (B, T)
            mask = torch.ones_like(ids)
            inputs = {"input_ids": ids, "attention_mask": mask}
        else:
            prompts = batch.prompts
            missing = [
                s.source or s.id for s, p in zip(batch.samples, prompts, strict=True) if p is None
            ]
            if missing:
                raise ConfigError(
                    f"inputs {missing[:3]} hold neither a prompt nor token ids; a text model is "
                    "fed prompts (data.prompts) or token ids (data.tensors)"
                )
            inputs = self.tokenize([p for p in prompts if p is not None])
        streams = token_streams(
            inputs["input_ids"], inputs.get("attention_mask"), self._special_ids()
        )
        device = self.device
        return {k: v.to(device) for k, v in inputs.items()}, streams

    # ------------------------------------------------------------------ running

    def run(self, batch: InputBatch, scope: ForwardScope) -> None:
        inputs, streams = self.batch_inputs(batch)
        with torch.no_grad(), scope.forward(ForwardContext(batch.ids, streams=streams)):
            self.model(**inputs)

    def generate(
        self,
        prompts: str | Sequence[str],
        *,
        max_new_tokens: int = 32,
        scope: ForwardScope | None = None,
        **kwargs: Any,
    ) -> list[str]:
        """``model.generate`` on ``prompts`` (greedy unless ``kwargs`` say otherwise) with the
        installed hooks in place; the generated continuations, decoded."""
        if (
            not hasattr(self.model, "generate")
            or not getattr(self.model, "can_generate", lambda: False)()
        ):
            raise NotImplementedError(
                f"{type(self.model).__name__} cannot generate; load it with "
                "model_class='causal-lm' (AutoModelForCausalLM)"
            )
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        inputs = {
            k: v.to(self.device) for k, v in self.tokenize(prompts, padding_side="left").items()
        }
        kwargs.setdefault("do_sample", False)
        kwargs.setdefault("pad_token_id", self.tokenizer.pad_token_id)
        ids = torch.arange(len(prompts))
        with torch.no_grad(), announce(scope, ForwardContext(ids)):
            out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, **kwargs)
        new = out[:, inputs["input_ids"].shape[1] :]
        return list(self.tokenizer.batch_decode(new, skip_special_tokens=True))

    # ------------------------------------------------------------------ rows

    def flatten(self, hookpoint: str, tensor: Tensor, context: ForwardContext) -> Rows:
        streams = context.streams
        if tensor.ndim != 3 or streams is None or streams.shape[-1] != tensor.shape[1]:
            return rows_from_last_dim(tensor, replace(context, streams=None))  # pooled, ...
        rows = rows_from_last_dim(tensor, context)
        if not self.keep_padding and rows.stream is not None:
            rows = rows.select(rows.stream != PAD)
        return rows

    def describe(self, hookpoint: str) -> str:
        found = find_layers(self.model)
        module = self.model.get_submodule(hookpoint)
        if found is not None:
            prefix, layers = found
            for i in range(len(layers)):
                layer = f"{prefix}.{i}"
                if hookpoint == layer:
                    return (
                        f"residual stream after layer {i} ({type(module).__name__}), (B, T, d): "
                        "one row per token (streams text / special; padding "
                        + ("kept, stream pad)" if self.keep_padding else "dropped)")
                    )
                if hookpoint.startswith(layer + "."):
                    child = hookpoint[len(layer) + 1 :]
                    return f"{child} ({type(module).__name__}) of layer {i}: one row per token"
        return super().describe(hookpoint)

    def hookpoints(self) -> list[HookpointInfo]:
        found = find_layers(self.model)
        if found is None:
            return super().hookpoints()
        prefix, layers = found
        config = getattr(self.model, "config", None)
        d = getattr(config, "hidden_size", None)
        out = []
        for i, layer in enumerate(layers):
            out.append(HookpointInfo(f"{prefix}.{i}", self.describe(f"{prefix}.{i}"), d))
            for child, _ in layer.named_children():
                if child in _SUBLAYER_NAMES:
                    name = f"{prefix}.{i}.{child}"
                    out.append(HookpointInfo(name, self.describe(name), d))
        return out
