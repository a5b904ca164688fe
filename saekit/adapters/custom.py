"""Any ``nn.Module`` given in Python: the adapter for models saekit has no family adapter for.

    adapter = CustomAdapter(model)                       # inputs are tensors: model(x)
    adapter = CustomAdapter(model, feed=lambda m, batch: m(**tokenize(batch.prompts)))
    adapter = CustomAdapter(unet_like, flatten=rows_from_channels_first)

A feed turns a batch of inputs into one model call; a flatten rule turns a hooked tensor into
per-token rows (default: the last dimension is d, the first the batch, the rest positions).
A model that needs several calls per batch, or context per call (denoising steps), subclasses
:class:`~saekit.adapters.base.ModelAdapter` instead.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .base import (
    MAX_HASHED_PARAMETERS,
    ForwardContext,
    ForwardScope,
    InputBatch,
    ModelAdapter,
    Rows,
    rows_from_last_dim,
    weights_digest,
)

Feed = Callable[[nn.Module, InputBatch], Any]
"""``feed(model, batch)``: call the model on a batch of inputs (its result is not used)."""

FlattenRule = Callable[[str, Tensor, ForwardContext], Rows]
"""``flatten(hookpoint, tensor, context)``: per-token rows of a hooked tensor."""


def feed_tensors(model: nn.Module, batch: InputBatch) -> Any:
    """The default feed: stack the samples' tensors, move them to the model, call ``model(x)``."""
    x = batch.stacked_tensors()
    for tensor in model.parameters():
        x = x.to(tensor.device)
        if x.is_floating_point():
            x = x.to(tensor.dtype)
        break
    return model(x)


class CustomAdapter(ModelAdapter):
    """Hook any ``nn.Module``.

    Args:
        model: the root module; hookpoints are its ``named_modules()`` paths.
        feed: ``feed(model, batch)`` calls the model on a batch (default :func:`feed_tensors`).
        flatten: ``flatten(hookpoint, tensor, context) -> Rows`` (default
            :func:`~saekit.adapters.base.rows_from_last_dim`), or a mapping from hookpoint to
            rule for models whose hookpoints have different layouts.
        name: the model's name or path, recorded with the cache.
        revision: its revision, recorded with the cache.
        streams: names of the stream codes a flatten rule or feed writes, if any.
        descriptions: what each hookpoint's tensor means, for ``saekit cache info``.
    """

    family = "custom"

    def __init__(
        self,
        model: nn.Module,
        *,
        feed: Feed | None = None,
        flatten: FlattenRule | dict[str, FlattenRule] | None = None,
        name: str | None = None,
        revision: str | None = None,
        streams: tuple[str, ...] = (),
        descriptions: dict[str, str] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"CustomAdapter needs an nn.Module, got {type(model).__name__}")
        self.model = model
        self.feed = feed or feed_tensors
        self.flatten_rule = flatten
        self.model_name = name
        self.revision = revision
        self.streams = tuple(streams)
        self.descriptions = dict(descriptions or {})

    @classmethod
    def load(
        cls,
        spec: str,
        *,
        revision: str | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        **options: Any,
    ) -> ModelAdapter:
        """An adapter from ``"package.module:factory"``: ``factory(**options)`` returns a ready
        ModelAdapter, or a model that :func:`saekit.adapters.adapter_for` wraps (a model or
        pipeline of a known family gets its family's adapter, any other ``nn.Module`` a
        CustomAdapter), named ``spec``; the model is moved to ``device`` and ``dtype`` when
        given.

        This imports and runs the named Python code, so name only code you trust (the same
        trust as running a script)."""
        module_name, _, attribute = spec.partition(":")
        if not module_name or not attribute:
            raise ValueError(
                f"a custom model is named 'package.module:factory', got {spec!r}; the factory "
                "returns an nn.Module or a ModelAdapter"
            )
        try:
            factory = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"cannot import custom model factory {spec!r}: {err}") from err
        built = factory(**options)
        adapter: ModelAdapter
        if isinstance(built, ModelAdapter):
            adapter = built
        else:
            # A model (or pipeline, or (model, processor) pair) of a known family gets that
            # family's adapter; any other nn.Module this one.
            from . import adapter_for

            adapter = adapter_for(built)
        adapter.model_name = adapter.model_name or spec
        adapter.revision = adapter.revision or revision
        adapter.to(device=device, dtype=dtype)
        return adapter

    def root(self) -> nn.Module:
        return self.model

    def run(self, batch: InputBatch, scope: ForwardScope) -> None:
        with torch.no_grad(), scope.forward(ForwardContext(batch.ids)):
            self.feed(self.model, batch)

    def flatten(self, hookpoint: str, tensor: Tensor, context: ForwardContext) -> Rows:
        rule = self.flatten_rule
        if isinstance(rule, dict):
            rule = rule.get(hookpoint)
        return (rule or _default_flatten)(hookpoint, tensor, context)

    def describe(self, hookpoint: str) -> str:
        return self.descriptions.get(hookpoint) or super().describe(hookpoint)

    def identity(self) -> dict[str, Any]:
        # The weights behind a factory's name can change between runs: always hash them.
        identity = super().identity()
        if "weights_xxh3" not in identity:
            n_parameters = sum(p.numel() for p in self.model.parameters())
            if n_parameters <= MAX_HASHED_PARAMETERS:
                identity["weights_xxh3"] = weights_digest(self.model)
        return identity


def _default_flatten(hookpoint: str, tensor: Tensor, context: ForwardContext) -> Rows:
    return rows_from_last_dim(tensor, context)
