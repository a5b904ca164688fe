"""Put a dictionary into a model: replace a hookpoint's activation by its reconstruction.

    with splice(model, sae):                   # hookpoint and capture from sae.cfg
        logits = model(ids)                    # the model now runs on x_hat at that hookpoint
    with splice(model, sae, error_term=True):  # x_hat + (x - x_hat): the clean model, exactly
        ...
    with ablate(model, "blocks.3"):            # zeros instead (the baseline of loss recovered)
        ...

Splicing is how the downstream cost of a dictionary is measured (Gao et al. 2024, section 4.1;
Bricken et al. 2023): the model runs on the dictionary's reconstruction and we look at what
changes in its outputs. With the **error term** the model receives ``x_hat + (x - x_hat)``: the
SAE sits in the computation but its error is added back, so the output is the clean model's.
Only an ``edit`` of the codes then reaches the model, as ``x + (decode(edit(codes)) - x_hat)``,
which is the form interventions on latents take (Marks et al. 2024, "Sparse feature circuits";
SAeUron keeps the error the same way). Without an edit it returns the hooked tensor itself, so
the clean outputs are reproduced bit for bit.

Hooks are plain forward hooks on ``named_modules()`` paths (the model is never rewritten), and
the handle removes them on exit, even on error. ``capture`` says which tensor the dictionary
reads, as in the cache: the module's ``output``, its ``input``, or its ``update`` (output -
input, a block's write into the residual stream: the block's output becomes ``input + x_hat``).

A hooked tensor becomes rows ``(N, d)`` and back by its layout: ``last`` (``(..., d)``, tokens)
or ``channels_first`` (``(B, d, H, W)``, a UNet feature map); ``auto`` tells them apart by which
dimension has the dictionary's width, and asks the model's adapter when both do.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ..adapters.base import Capture, ForwardContext, ModelAdapter, first_tensor
from ..dictionaries import SparseAutoencoder
from ..kernels import SparseCodes

Layout = Literal["auto", "last", "channels_first"]

Transform = Callable[[Tensor], Tensor | None]
"""``transform(activation) -> replacement`` (same shape and dtype), or None to leave it."""

Observer = Callable[[Tensor, Tensor, SparseCodes], None]
"""``observer(rows, recon, codes)``: sees each spliced call's rows ``(N, d)``, reconstruction
``(N, d)`` and codes (e.g. to measure the reconstruction inside the model)."""

CodeEdit = Callable[[SparseCodes], SparseCodes]
"""``edit(codes) -> codes``: change latents before decoding (ablate, clamp, scale)."""


# ----------------------------------------------------------------------------- layouts


def resolve_layout(
    shape: tuple[int, ...],
    d: int,
    layout: Layout = "auto",
    *,
    adapter: ModelAdapter | None = None,
    hookpoint: str = "",
) -> Literal["last", "channels_first"]:
    """Which dimension of a tensor of ``shape`` holds the ``d`` features."""
    if layout != "auto":
        width = shape[-1] if layout == "last" else (shape[1] if len(shape) > 1 else -1)
        if width != d:
            raise ValueError(
                f"hookpoint {hookpoint!r}: a {layout} tensor of shape {shape} does not have the "
                f"dictionary's width {d} in its feature dimension"
            )
        return layout
    last = len(shape) >= 1 and shape[-1] == d
    first = len(shape) >= 3 and shape[1] == d
    if last and not first:
        return "last"
    if first and not last:
        return "channels_first"
    if last and first and adapter is not None:
        return _adapter_layout(adapter, hookpoint, shape)
    if last and first:
        raise ValueError(
            f"hookpoint {hookpoint!r}: the tensor of shape {shape} has the dictionary's width {d} "
            "both in dimension 1 and last; pass layout='last' or layout='channels_first'"
        )
    raise ValueError(
        f"hookpoint {hookpoint!r} produced a tensor of shape {shape}, which has no dimension of "
        f"the dictionary's width d_in={d}; is this the hookpoint (and capture) the dictionary "
        "was trained on?"
    )


def _adapter_layout(
    adapter: ModelAdapter, hookpoint: str, shape: tuple[int, ...]
) -> Literal["last", "channels_first"]:
    """Ask the adapter's own flatten rule: rows of a probe whose entries are their indices."""
    probe = torch.arange(int(torch.Size(shape[1:]).numel()), dtype=torch.float32)
    probe = probe.reshape(1, *shape[1:])
    rows = adapter.flatten(hookpoint, probe, ForwardContext(torch.zeros(1, dtype=torch.long)))
    first_row = rows.values[0]
    return "last" if bool((first_row.diff() == 1).all()) else "channels_first"


def to_rows(tensor: Tensor, layout: Literal["last", "channels_first"]) -> Tensor:
    """``(N, d)`` rows of ``tensor`` in its ``layout`` (a view when possible)."""
    if layout == "last":
        return tensor.reshape(-1, tensor.shape[-1])
    b, c = tensor.shape[:2]
    return tensor.reshape(b, c, -1).transpose(1, 2).reshape(-1, c)  # (B·H·W, C)


def from_rows(rows: Tensor, like: Tensor, layout: Literal["last", "channels_first"]) -> Tensor:
    """Put ``(N, d)`` rows back into the shape and layout of ``like``."""
    if layout == "last":
        return rows.reshape(like.shape)
    b, c = like.shape[:2]
    return rows.reshape(b, -1, c).transpose(1, 2).reshape(like.shape)


# ----------------------------------------------------------------------------- structures


def replace_tensor(value: Any, old: Tensor, new: Tensor) -> Any:
    """``value`` (a tensor, tuple, list, dict or ``ModelOutput``) with the tensor ``old``
    (found by identity) replaced by ``new``; the containers are copied, never changed in place."""
    if value is old:
        return new
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a NamedTuple
        return type(value)(*(replace_tensor(v, old, new) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(replace_tensor(v, old, new) for v in value)
    if isinstance(value, dict):
        out = copy.copy(value)  # keeps a ModelOutput's class and attributes
        for key, item in value.items():
            replaced = replace_tensor(item, old, new)
            if replaced is not item:
                out[key] = replaced
        return out
    return value


def _output_tensor(adapter: ModelAdapter | None, hookpoint: str, output: Any) -> Tensor:
    if adapter is not None:
        return adapter.output_tensor(hookpoint, output)
    found = first_tensor(output)
    if found is None:
        raise ValueError(
            f"hookpoint {hookpoint!r} returned {type(output).__name__}, which holds no tensor to "
            "splice into; hook a submodule that returns one"
        )
    return found


def _input_tensor(
    adapter: ModelAdapter | None, hookpoint: str, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Tensor:
    if adapter is not None:
        return adapter.input_tensor(hookpoint, args, kwargs)
    found = first_tensor(args)
    if found is None:
        found = kwargs.get("hidden_states")
    if not isinstance(found, Tensor):
        raise ValueError(f"hookpoint {hookpoint!r} received no tensor input to splice into")
    return found


# ----------------------------------------------------------------------------- the handle


class HookHandle:
    """Hooks that transform the activation at one hookpoint; a context manager that removes
    them on exit (even on error), or call :meth:`remove`.

    ``calls`` counts the calls that reached the hookpoint: a spliced run with ``calls == 0``
    never touched the dictionary's hookpoint.
    """

    def __init__(
        self,
        model: nn.Module | ModelAdapter,
        hookpoint: str,
        capture: Capture,
        transform: Transform,
    ) -> None:
        self.adapter = model if isinstance(model, ModelAdapter) else None
        root = model.root() if isinstance(model, ModelAdapter) else model
        if hookpoint == "root":  # the cache's name for the root module
            hookpoint = ""
        try:
            module = root.get_submodule(hookpoint)
        except AttributeError as err:
            raise ValueError(
                f"{type(root).__name__} has no module {hookpoint!r} to splice into ({err}); "
                "hookpoints are named_modules() paths"
            ) from None
        if capture not in ("output", "input", "update"):
            raise ValueError(f"capture must be output, input or update, got {capture!r}")
        self.hookpoint = hookpoint
        self.capture = capture
        self.transform = transform
        self.calls = 0
        self._inputs: list[Tensor] = []
        self._handles: list[RemovableHandle] = []
        # prepend: run before hooks the library installed itself. transformers 5 records
        # hidden states (output_hidden_states, a VLM's vision_feature_layer) with forward hooks;
        # appended after them, a splice would change the module's output for the next layer
        # but not what the model reads back from the recorded hidden states.
        if capture in ("input", "update"):
            self._handles.append(
                module.register_forward_pre_hook(self._pre, with_kwargs=True, prepend=True)
            )
        if capture in ("output", "update"):
            self._handles.append(
                module.register_forward_hook(self._post, with_kwargs=True, prepend=True)
            )

    def _pre(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        x = _input_tensor(self.adapter, self.hookpoint, args, kwargs)
        if self.capture == "update":
            self._inputs.append(x)  # a stack: a module may run inside itself
            return None
        self.calls += 1
        new = self.transform(x)
        if new is None:
            return None
        return replace_tensor(args, x, new), replace_tensor(kwargs, x, new)

    def _post(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> Any:
        y = _output_tensor(self.adapter, self.hookpoint, output)
        self.calls += 1
        if self.capture == "output":
            new = self.transform(y)
        else:
            x = self._inputs.pop()
            if x.shape != y.shape:
                raise ValueError(
                    f"capture 'update' needs {self.hookpoint}'s input and output to have the same "
                    f"shape, got {tuple(x.shape)} and {tuple(y.shape)}"
                )
            update = self.transform(y - x)
            new = None if update is None else x + update
        return None if new is None else replace_tensor(output, y, new)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._inputs.clear()

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def __enter__(self) -> HookHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def hook_activation(
    model: nn.Module | ModelAdapter, hookpoint: str, capture: Capture, transform: Transform
) -> HookHandle:
    """Install ``transform`` on the activation at ``hookpoint`` (the general form of splicing)."""
    return HookHandle(model, hookpoint, capture, transform)


def splice(
    model: nn.Module | ModelAdapter,
    sae: SparseAutoencoder,
    *,
    hookpoint: str | None = None,
    capture: Capture | None = None,
    error_term: bool = False,
    edit: CodeEdit | None = None,
    layout: Layout = "auto",
    observer: Observer | None = None,
) -> HookHandle:
    """Run ``model`` with ``sae`` at its hookpoint (default: ``sae.cfg.hookpoint`` and
    ``sae.cfg.capture``); the hooks are installed now and removed when the handle exits.

    ``error_term=False``: the activation is replaced by ``decode(edit(encode(x)))``.
    ``error_term=True``: by ``x + decode(edit(codes)) - decode(codes)``: exactly ``x`` without an
    edit. ``observer(rows, recon, codes)`` sees every call. The dictionary computes in its own
    dtype and device; the result is cast back to the activation's.
    """
    hookpoint = sae.cfg.hookpoint if hookpoint is None else hookpoint
    if hookpoint is None:
        raise ValueError(
            "the dictionary's config names no hookpoint; pass hookpoint= (a named_modules() path)"
        )
    capture = capture or sae.cfg.capture
    adapter = model if isinstance(model, ModelAdapter) else None

    def transform(activation: Tensor) -> Tensor | None:
        kind = resolve_layout(
            tuple(activation.shape), sae.d_in, layout, adapter=adapter, hookpoint=hookpoint
        )
        rows = to_rows(activation, kind).to(device=sae.device, dtype=sae.dtype)  # (N, d)
        codes = sae.encode(rows)
        recon = sae.decode(codes)  # (N, d)
        if observer is not None:
            observer(rows, recon, codes)
        if error_term:
            if edit is None:
                return None  # x_hat + (x - x_hat) = x: the hooked tensor itself
            delta = sae.decode(edit(codes)) - recon  # (N, d)
            return activation + from_rows(delta, activation, kind).to(activation)
        if edit is not None:
            recon = sae.decode(edit(codes))
        return from_rows(recon, activation, kind).to(activation)

    return HookHandle(model, hookpoint, capture, transform)


def ablate(
    model: nn.Module | ModelAdapter,
    hookpoint: str,
    capture: Capture = "output",
    *,
    mean: Tensor | None = None,
    layout: Layout = "auto",
) -> HookHandle:
    """Replace the activation at ``hookpoint`` by zeros (or by ``mean`` ``(d,)``, mean
    ablation): the baseline against which "loss recovered" measures a spliced dictionary."""

    def transform(activation: Tensor) -> Tensor:
        if mean is None:
            return torch.zeros_like(activation)
        kind = resolve_layout(tuple(activation.shape), mean.numel(), layout, hookpoint=hookpoint)
        rows = mean.to(activation).expand(to_rows(activation, kind).shape)
        return from_rows(rows.contiguous(), activation, kind)

    return HookHandle(model, hookpoint, capture, transform)
