"""Which call of the model a steering hook is in: denoising step, CFG half, prefill or decoding
step, and which tokens are image or text.

Steering must work when the user calls the model themselves (``pipe(prompt)``,
``model.generate(...)``), not only through an adapter's ``generate``. So the tracker installs its
own forward pre-hooks on the modules whose calls mark the structure of generation, and keeps
what they say in a :class:`CallState` that every steering hook reads:

* a diffusers pipeline: each text encoder (a call after the denoiser has run starts a new
  pipeline call; an encoder's first call encodes the prompt, its second the negative prompt)
  and the denoiser (a new timestep is a new step, the step index counting from 0; a batch of
  twice the prompts is a guided ``[uncond; cond]`` batch, diffusers' order);
* a LLaVA-style VLM: the model's forward (an empty KV cache is the prefill; each later call a
  decoding step, whose one token sits at the cache's length). The cache is found by what it
  is, not by the keyword that carries it (transformers up to 5.23 passed ``past_key_values=``,
  5.24 on pass ``cache=``): see :func:`cached_tokens`;
* CLIP: nothing per call, only which tower a hookpoint is in.

Pre-hooks on the root modules fire before any hook on their submodules, so a steering hook at
``mid_block`` or ``model.language_model.layers.2`` sees the state of its own call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ..adapters.base import COND, UNCOND, ModelAdapter
from ..adapters.dit import check_denoiser, denoiser_call

# Token kinds of a hooked tensor's positions (what Scope.tokens selects).
TEXT, IMAGE, OTHER = 0, 1, 2


@dataclass
class CallState:
    """What is known about the model call in progress."""

    step: int = -1
    """Denoising step index (-1: not a denoiser call)."""
    timestep: float = math.nan
    branch: Tensor | None = None
    """``(B,)`` :data:`UNCOND` / :data:`COND` per element of a guided batch; None: unknown or
    not guided (then the whole batch counts as conditional)."""
    phase: str | None = None
    """``prefill`` or ``decode`` during a VLM's generation; None otherwise."""
    decode_step: int = -1
    """Index of the decoding call (0: the first after the prefill); -1 in the prefill."""
    offset: int = 0
    """Sequence position of the call's first token (the KV cache's length)."""
    token_kinds: Tensor | None = None
    """``(B, T)`` int8 :data:`TEXT` / :data:`IMAGE` / :data:`OTHER` (padding) of a VLM prefill."""
    text_tokens: int | None = None
    """Prompt length of the denoiser's cross-attention keys (a UNet's text tokens)."""
    component: str = ""
    """``denoiser``, ``text_encoder`` or ``""``."""
    prompts: int | None = None
    """Prompts of the pipeline call in progress (its first text-encoder batch)."""
    _encoder_calls: dict[str, int] = field(default_factory=dict)
    _denoised: bool = True


class CallTracker:
    """Pre-hooks that keep :attr:`state` up to date for one model (see the module docstring).

    A context manager; the hooks are removed on exit (or :meth:`remove`), even on error.
    """

    def __init__(self, adapter: ModelAdapter) -> None:
        self.adapter = adapter
        self.state = CallState()
        self._handles: list[RemovableHandle] = []
        self.family = adapter.family
        if self.family == "diffusion":
            a: Any = adapter
            check_denoiser(a.denoiser)  # a renamed keyword fails here, not silently per call
            self._handles.append(
                a.denoiser.register_forward_pre_hook(self._on_denoiser, with_kwargs=True)
            )
            for name, encoder in a.text_encoders.items():
                self._handles.append(
                    encoder.register_forward_pre_hook(self._on_encoder(name), with_kwargs=True)
                )
        elif self.family == "vlm":
            self._handles.append(
                adapter.root().register_forward_pre_hook(self._on_vlm, with_kwargs=True)
            )

    # ------------------------------------------------------------------ diffusion

    def _on_encoder(self, name: str):
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            state = self.state
            ids = kwargs.get("input_ids", args[0] if args else None)
            if state._denoised:  # a new pipeline call
                batch = int(ids.shape[0]) if isinstance(ids, Tensor) else None
                self.state = state = CallState(prompts=batch, _denoised=False)
            calls = state._encoder_calls.get(name, 0)
            state._encoder_calls[name] = calls + 1
            state.component = "text_encoder"
            state.step, state.timestep = -1, math.nan
            n = int(ids.shape[0]) if isinstance(ids, Tensor) else 0
            # The prompt is encoded first, the negative prompt second.
            half = COND if calls == 0 else UNCOND if calls == 1 else None
            state.branch = None if half is None else torch.full((n,), half, dtype=torch.int8)

        return hook

    def _on_denoiser(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        batch, timestep, _, text_tokens = denoiser_call(module, args, kwargs)
        state = self.state
        # A new timestep is a new step; a second-order scheduler's second call at the same
        # timestep stays in its step. Steps count from the pipeline call's text encoding.
        if state.component != "denoiser" or timestep != state.timestep:
            state.step += 1
            state.timestep = timestep
        state.component = "denoiser"
        state._denoised = True
        state.text_tokens = text_tokens
        n = state.prompts
        if n is not None and batch == 2 * n:
            state.branch = torch.cat(
                [
                    torch.full((n,), UNCOND, dtype=torch.int8),
                    torch.full((n,), COND, dtype=torch.int8),
                ]
            )
        else:
            state.branch = None

    # ------------------------------------------------------------------ VLM

    def _on_vlm(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], Tensor) else None)
        past = cached_tokens(args, kwargs)
        state = self.state
        if past == 0:
            kinds = None
            if isinstance(ids, Tensor):
                token_id = int(getattr(self.adapter, "image_token_id", -1))
                kinds = torch.full(ids.shape, TEXT, dtype=torch.int8)
                kinds[ids.cpu() == token_id] = IMAGE
                mask = kwargs.get("attention_mask")
                if isinstance(mask, Tensor) and mask.shape == ids.shape:
                    kinds[mask.cpu() == 0] = OTHER
            self.state = CallState(phase="prefill", token_kinds=kinds)
        else:
            decode_step = state.decode_step + 1 if state.phase in ("prefill", "decode") else 0
            self.state = CallState(phase="decode", decode_step=decode_step, offset=past)

    # ------------------------------------------------------------------ token kinds

    def token_kinds(self, hookpoint: str, batch: int, positions: int) -> Tensor | None:
        """``(B, P)`` int8 token kinds of a hooked tensor with ``positions`` per element, or
        None when every position is of one kind that :meth:`uniform_kind` gives."""
        state = self.state
        if self.family == "vlm":
            a: Any = self.adapter
            part = a.part(hookpoint)
            if part == "language_model" and state.phase == "prefill":
                kinds = state.token_kinds
                if kinds is not None and kinds.shape == (batch, positions):
                    return kinds
        return None

    def uniform_kind(self, hookpoint: str, positions: int) -> int | None:
        """The one token kind of every position at ``hookpoint`` in this call (None: unknown)."""
        a: Any = self.adapter
        if self.family == "diffusion":
            if a.component(hookpoint) != a.denoiser_name:
                return TEXT
            text = self.state.text_tokens
            return TEXT if text is not None and positions == text and text > 1 else IMAGE
        if self.family == "vlm":
            part = a.part(hookpoint)
            if part in ("vision_tower", "multi_modal_projector"):
                return IMAGE
            if self.state.phase == "decode":
                return TEXT
            return None
        if self.family in ("clip", "open_clip"):
            tower = a.tower(hookpoint)
            return IMAGE if tower == "image" else TEXT if tower == "text" else None
        return None

    # ------------------------------------------------------------------ lifetime

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.state = CallState()

    def __enter__(self) -> CallTracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def cached_tokens(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    """How many tokens a causal model's KV cache held when it was called with ``args`` /
    ``kwargs``: 0 for a prefill, the new tokens' first position for a decoding step.

    Read from the arguments' values, never from the keyword a transformers version uses for the
    cache (``past_key_values=`` until 5.23, ``cache=`` from 5.24; a keyword lookup made
    ``--phase decode`` silently do nothing there):

    1. any argument that is a transformers ``Cache`` (found by its public ``get_seq_length``);
    2. else a ``cache_position`` tensor (its first entry), which some versions pass;
    3. else the attention mask's width less the new tokens' count (generation passes the mask
       of every token so far with only the new ``input_ids`` / ``inputs_embeds``).
    """
    for value in (*kwargs.values(), *args):
        length = getattr(value, "get_seq_length", None)
        if callable(length) and not isinstance(value, (Tensor, nn.Module)):
            return int(length())
    position = kwargs.get("cache_position")
    if isinstance(position, Tensor) and position.numel():
        return int(position.reshape(-1)[0])
    mask = kwargs.get("attention_mask")
    new = kwargs.get("input_ids")
    if not isinstance(new, Tensor):
        new = kwargs.get("inputs_embeds")
    if not isinstance(new, Tensor) and args and isinstance(args[0], Tensor):
        new = args[0]
    if isinstance(mask, Tensor) and mask.ndim == 2 and isinstance(new, Tensor) and new.ndim >= 2:
        return max(int(mask.shape[1]) - int(new.shape[1]), 0)
    return 0
