"""Forward hooks on named modules: several hookpoints in one pass, and an early stop.

A hookpoint is a ``named_modules()`` path (fnmatch patterns allowed) with a capture target:
``blocks.3`` (the module's output), ``blocks.3@input``, ``blocks.3@update`` (output - input, the
block's write into the residual stream). Hooks never change what the model computes: they
return nothing, and they copy what they capture.

Early stop: once every needed hookpoint has fired in a call, the rest of the forward pass is
wasted work (for a ViT read at layer 6 of 12, half the model). The hook then raises a private
exception that :meth:`ActivationCapture.forward` catches at the end of the call. How many
captures make a complete call is learned from the first call, which always runs to the end.
"""

from __future__ import annotations

import contextlib
import difflib
import fnmatch
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ..adapters.base import Capture, ForwardContext, InputBatch, ModelAdapter
from ..configuration import ConfigError

CAPTURES: tuple[Capture, ...] = ("output", "input", "update")


@dataclass(frozen=True)
class Hookpoint:
    """A resolved hookpoint of a model."""

    name: str
    """Its name in the cache: the module path, with ``@input`` / ``@update`` unless it captures
    the output."""
    module: str
    """The ``named_modules()`` path."""
    capture: Capture
    """What is captured there."""


def parse_hookpoint(spec: str, default_capture: Capture) -> tuple[str, Capture]:
    """``"blocks.*.mlp@update"`` -> ``("blocks.*.mlp", "update")``."""
    pattern, at, capture = spec.partition("@")
    if not at:
        return pattern, default_capture
    if capture not in CAPTURES:
        raise ConfigError(
            f"hookpoint {spec!r}: unknown capture {capture!r}; use @output, @input or @update"
        )
    return pattern, cast(Capture, capture)


ROOT_NAME = "root"
"""The cache name of the root module's hookpoint (whose ``named_modules()`` path is empty)."""


def hookpoint_name(module: str, capture: Capture) -> str:
    base = module or ROOT_NAME
    return base if capture == "output" else f"{base}@{capture}"


def resolve_hookpoints(
    root: nn.Module, specs: Sequence[str], default_capture: Capture = "output"
) -> list[Hookpoint]:
    """The hookpoints that ``specs`` name, in the model's module order, each once."""
    if not specs:
        raise ConfigError("no hookpoints given: name at least one module path (--hookpoints)")
    names = [name for name, _ in root.named_modules()]
    found: dict[str, Hookpoint] = {}
    for spec in specs:
        pattern, capture = parse_hookpoint(spec, default_capture)
        matches = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not matches:
            close = difflib.get_close_matches(pattern, names, n=5, cutoff=0.5)
            hint = f"; close matches: {', '.join(close)}" if close else ""
            sample = ", ".join(n for n in names[1:8] if n)
            raise ConfigError(
                f"hookpoint {pattern!r} matches no module of {type(root).__name__}{hint}. "
                f"Module paths look like: {sample}, ... (see model.named_modules())"
            )
        for module in matches:
            hookpoint = Hookpoint(hookpoint_name(module, capture), module, capture)
            if found.get(hookpoint.name, hookpoint) != hookpoint:
                raise ConfigError(
                    f"the root module and a module named {ROOT_NAME!r} would share the cache name "
                    f"{hookpoint.name!r}; hook one of them"
                )
            found[hookpoint.name] = hookpoint
    order = {name: i for i, name in enumerate(names)}
    return sorted(found.values(), key=lambda h: (order[h.module], CAPTURES.index(h.capture)))


class _StopForward(Exception):
    """Raised by a hook once every needed hookpoint has fired; caught by the forward scope."""


OnCapture = Callable[[Hookpoint, Tensor, ForwardContext], None]


class ActivationCapture:
    """Hooks ``hookpoints`` of ``adapter``'s model and reports every capture to ``on_capture``.

    Use as a context manager (hooks are removed on exit, even on error) and call :meth:`run`
    once per batch. ``on_capture(hookpoint, tensor, context)`` receives the live tensor: it must
    copy what it keeps, because the model may change the tensor in place afterwards.
    """

    def __init__(
        self,
        adapter: ModelAdapter,
        hookpoints: Sequence[Hookpoint],
        on_capture: OnCapture,
        *,
        early_stop: bool = True,
    ) -> None:
        self.adapter = adapter
        self.hookpoints = list(hookpoints)
        self.on_capture = on_capture
        self.early_stop = early_stop
        self.stopped_calls = 0
        self._handles: list[RemovableHandle] = []
        self._context: ForwardContext | None = None
        self._stoppable = False
        self._fired = 0
        self._fires_per_call: int | None = None
        self._pending_inputs: dict[str, list[tuple[Tensor, int]]] = {}

    # ------------------------------------------------------------------ hooks

    def __enter__(self) -> ActivationCapture:
        root = self.adapter.root()
        for hookpoint in self.hookpoints:
            module = root.get_submodule(hookpoint.module)
            if hookpoint.capture in ("input", "update"):
                self._handles.append(
                    module.register_forward_pre_hook(self._pre_hook(hookpoint), with_kwargs=True)
                )
            if hookpoint.capture in ("output", "update"):
                self._handles.append(
                    module.register_forward_hook(self._post_hook(hookpoint), with_kwargs=True)
                )
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _pre_hook(self, hookpoint: Hookpoint):
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            context = self._current_context(hookpoint)
            x = self.adapter.input_tensor(hookpoint.module, args, kwargs)
            if hookpoint.capture == "input":
                self._emit(hookpoint, x, context)
            else:  # update: remember the input (and its version, to catch in-place changes)
                self._pending_inputs.setdefault(hookpoint.name, []).append((x, x._version))

        return hook

    def _post_hook(self, hookpoint: Hookpoint):
        def hook(
            module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
        ) -> None:
            context = self._current_context(hookpoint)
            y = self.adapter.output_tensor(hookpoint.module, output)
            if hookpoint.capture == "output":
                self._emit(hookpoint, y, context)
                return
            x, version = self._pending_inputs[hookpoint.name].pop()
            if x._version != version:
                raise RuntimeError(
                    f"{hookpoint.module} changed its input in place, so its update (output - "
                    "input) cannot be computed from the hooks; capture @input and @output "
                    "separately, or hook the block that wraps it"
                )
            if x.shape != y.shape:
                raise ConfigError(
                    f"capture 'update' needs {hookpoint.module}'s output and input to have the "
                    f"same shape, got input {tuple(x.shape)} and output {tuple(y.shape)}; "
                    "capture @output or @input instead"
                )
            self._emit(hookpoint, y - x, context)

        return hook

    def _current_context(self, hookpoint: Hookpoint) -> ForwardContext:
        if self._context is None:
            raise RuntimeError(
                f"hookpoint {hookpoint.module} fired outside a forward scope: the adapter "
                f"{type(self.adapter).__name__} must call the model inside scope.forward(context)"
            )
        return self._context

    def _emit(self, hookpoint: Hookpoint, tensor: Tensor, context: ForwardContext) -> None:
        self.on_capture(hookpoint, tensor.detach(), context)
        self._fired += 1
        if (
            self._stoppable
            and self._fires_per_call is not None
            and self._fired >= self._fires_per_call
        ):
            raise _StopForward

    # ------------------------------------------------------------------ the ForwardScope

    @contextlib.contextmanager
    def forward(self, context: ForwardContext, *, stoppable: bool = True) -> Iterator[None]:
        """One model call whose captures carry ``context`` (see ForwardScope)."""
        if self._context is not None:
            raise RuntimeError("forward scopes do not nest; use set_context inside one")
        self._context = context
        self._stoppable = stoppable and self.early_stop
        self._fired = 0
        self._pending_inputs.clear()
        try:
            yield
        except _StopForward:
            self.stopped_calls += 1
        else:
            if self._fired == 0:
                raise RuntimeError(
                    "the model call finished without reaching any hookpoint: check that the "
                    "adapter calls the model whose modules were hooked"
                )
            if stoppable and self._fires_per_call is None:
                self._fires_per_call = self._fired  # learned from a complete call
        finally:
            self._context = None
            self._stoppable = False

    def set_context(self, context: ForwardContext) -> None:
        if self._context is None:
            raise RuntimeError("set_context is only valid inside scope.forward(...)")
        self._context = context

    def run(self, batch: InputBatch) -> None:
        """Feed one batch through the adapter; every capture goes to ``on_capture``."""
        self.adapter.run(batch, self)
