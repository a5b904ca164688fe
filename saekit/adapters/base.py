"""The adapter seam: what saekit must know about a family of models to read its activations.

An adapter knows one family (any ``nn.Module`` given in Python, CLIP, a diffusers UNet or
diffusion transformer, a LLaVA-style VLM):

* its **root module**, whose ``named_modules()`` paths are the hookpoints (fnmatch patterns
  allowed); the model is wrapped with hooks, never re-implemented;
* what a hookpoint's tensor **means** (:meth:`ModelAdapter.describe`);
* how a batch of inputs becomes **one or more forward passes** (:meth:`ModelAdapter.run`), each
  announced with a :class:`ForwardContext`: which input each batch element came from, the
  denoising step and timestep, the classifier-free-guidance half, the stream of every token;
* which tensor of a module's inputs/outputs is the activation (:meth:`ModelAdapter.input_tensor`,
  :meth:`ModelAdapter.output_tensor`), and how to **flatten** it into per-token rows ``(N, d)``
  with per-row metadata (:meth:`ModelAdapter.flatten` returning :class:`Rows`).

A diffusion adapter runs one pass per denoising step and announces each step's context from a
pre-hook on its denoiser (:meth:`ForwardScope.set_context`), so the flatten rule sees the step,
the timestep and which half of a CFG batch a row belongs to. A UNet feature map ``(B, C, H, W)``
becomes ``(B·H·W, C)`` rows with the spatial position recorded (:func:`rows_from_channels_first`);
a VLM marks image-token vs text-token positions with ``ForwardContext.streams``.

Each family adapter also lists its suggested hookpoints with what their tensors mean
(:meth:`ModelAdapter.hookpoints`, :class:`HookpointInfo`) and runs the family's own generation
with whatever hooks are installed (:meth:`ModelAdapter.generate`). Generation announces its
calls like caching does: give it a :class:`ContextTracker` and a steering hook can read the
step, timestep, CFG half and token streams of the call it is in.

The activation cache drives adapters through :class:`ForwardScope`; adapters import nothing
from the cache (the import direction of the design notes).
"""

from __future__ import annotations

import contextlib
import math
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Literal, Protocol

import torch
import xxhash
from torch import Tensor, nn

Capture = Literal["output", "input", "update"]
"""What a hook captures: the module's output, its input, or the update ``output - input``
(the block's contribution to a residual stream)."""

# Codes of the classifier-free-guidance half a row came from (the ``branch`` column).
NO_BRANCH, UNCOND, COND = -1, 0, 1
BRANCH_NAMES = {"uncond": UNCOND, "cond": COND}


# ----------------------------------------------------------------------------- inputs


@dataclass
class Sample:
    """One input of the data: an image, a prompt, both, or a tensor."""

    id: int
    """Index of the input in its data source (stable across runs and ranks); rows record it."""
    image: Any = None
    """A ``PIL.Image.Image`` (RGB) when the data holds images."""
    prompt: str | None = None
    """The text prompt when the data holds prompts."""
    tensor: Tensor | None = None
    """A tensor input (token ids, a preprocessed image, ...) when the data holds tensors."""
    source: str = ""
    """Where it came from (a path, ``file:line``), for messages."""


@dataclass
class InputBatch:
    """The inputs of one step of a caching run."""

    samples: list[Sample]

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def ids(self) -> Tensor:
        """Sample ids, ``(B,)`` int64."""
        return torch.tensor([s.id for s in self.samples], dtype=torch.long)

    @property
    def images(self) -> list[Any]:
        return [s.image for s in self.samples]

    @property
    def prompts(self) -> list[str | None]:
        return [s.prompt for s in self.samples]

    def stacked_tensors(self) -> Tensor:
        """The samples' tensors stacked into ``(B, ...)``."""
        missing = [s.source or s.id for s in self.samples if s.tensor is None]
        if missing:
            raise ValueError(
                f"inputs {missing[:3]} hold no tensor; this adapter's feed needs tensor inputs "
                "(data.tensors) or a feed function that turns images/prompts into model inputs"
            )
        return torch.stack([s.tensor for s in self.samples if s.tensor is not None])


# ----------------------------------------------------------------------------- forward context


@dataclass(frozen=True)
class ForwardContext:
    """What the rows of one model call mean beyond their place in the hooked tensor."""

    sample_ids: Tensor
    """``(B,)`` int64: the input each element of the call's batch belongs to. A CFG batch of
    ``2B`` lists each sample twice (see :meth:`with_cfg_halves`)."""
    step: int = -1
    """Denoising step index of a diffusion pass (-1: not a diffusion pass)."""
    timestep: float = math.nan
    """The scheduler's timestep (or sigma·1000 for flow-matching models) of that step."""
    branch: Tensor | None = None
    """``(B,)`` int8: which classifier-free-guidance half each batch element is
    (:data:`UNCOND` or :data:`COND`); None when the call has no CFG halves."""
    streams: Tensor | None = None
    """``(B, T)`` or ``(T,)`` int8: the stream of each token position, as an index into the
    adapter's :attr:`ModelAdapter.streams` (e.g. image vs text token); None when not known."""

    @property
    def batch_size(self) -> int:
        return int(self.sample_ids.numel())

    def with_cfg_halves(self) -> ForwardContext:
        """The context of a CFG call whose batch is ``[uncond; cond]`` (the diffusers order)."""
        ids = self.sample_ids.repeat(2)
        n = self.sample_ids.numel()
        branch = torch.cat(
            [torch.full((n,), UNCOND, dtype=torch.int8), torch.full((n,), COND, dtype=torch.int8)]
        )
        streams = self.streams
        if streams is not None and streams.ndim == 2:
            streams = streams.repeat(2, 1)
        return ForwardContext(ids, self.step, self.timestep, branch, streams)


class ForwardScope(Protocol):
    """What an adapter's :meth:`ModelAdapter.run` calls to announce its forward passes.

    The cache implements it: inside ``with scope.forward(ctx):`` every hook that fires records
    ``ctx``. When the cache only needs hookpoints that fire early, it stops a stoppable call
    after the deepest of them (the rest of the model's work is skipped) and the ``with`` block
    ends normally; so the code after a stoppable call must not use its result.
    """

    def forward(
        self, context: ForwardContext, *, stoppable: bool = True
    ) -> AbstractContextManager[None]: ...

    def set_context(self, context: ForwardContext) -> None:
        """Change the context for the hooks that fire next, inside an open ``forward`` block.

        For calls made by library code (a diffusers pipeline's denoising loop): a forward
        pre-hook on the denoiser announces each step here."""
        ...


def announce(
    scope: ForwardScope | None, context: ForwardContext, *, stoppable: bool = False
) -> AbstractContextManager[None]:
    """``scope.forward(context)``, or nothing without a scope (generation nobody listens to)."""
    if scope is None:
        return contextlib.nullcontext()
    return scope.forward(context, stoppable=stoppable)


class ContextTracker:
    """A :class:`ForwardScope` that only remembers the context of the call in progress.

    Generation is announced like caching (``adapter.generate(..., scope=tracker)``), so a hook
    that acts during generation (steering, splicing a dictionary) reads ``tracker.context`` to
    know the denoising step, timestep, CFG half and token streams of the call it is in.
    """

    def __init__(self) -> None:
        self.context: ForwardContext | None = None
        """The context of the model call in progress; None between calls."""

    @contextlib.contextmanager
    def forward(self, context: ForwardContext, *, stoppable: bool = True) -> Iterator[None]:
        previous, self.context = self.context, context
        try:
            yield
        finally:
            self.context = previous

    def set_context(self, context: ForwardContext) -> None:
        self.context = context


# ----------------------------------------------------------------------------- rows


@dataclass
class Rows:
    """Per-token rows of one hooked tensor and what each row is."""

    values: Tensor
    """``(N, d)`` activations."""
    sample: Tensor
    """``(N,)`` int64: the input the row came from."""
    position: Tensor
    """``(N,)`` int64: token or patch index in the hooked tensor (``h·W + w`` for a feature map)."""
    step: Tensor | None = None
    """``(N,)`` denoising step index; None: not a diffusion pass."""
    timestep: Tensor | None = None
    """``(N,)`` float timestep of that step."""
    branch: Tensor | None = None
    """``(N,)`` CFG half (:data:`UNCOND` / :data:`COND`); None: no CFG."""
    stream: Tensor | None = None
    """``(N,)`` index into the adapter's ``streams`` (image vs text token ...); None: unknown."""

    def __post_init__(self) -> None:
        if self.values.ndim != 2:
            raise ValueError(f"Rows.values must be (N, d), got shape {tuple(self.values.shape)}")
        n = self.values.shape[0]
        for name in ("sample", "position", "step", "timestep", "branch", "stream"):
            column = getattr(self, name)
            if column is not None and column.shape != (n,):
                raise ValueError(
                    f"Rows.{name} must have shape ({n},) to match values, got {tuple(column.shape)}"
                )

    def __len__(self) -> int:
        return self.values.shape[0]

    @property
    def d(self) -> int:
        return self.values.shape[1]

    def select(self, keep: Tensor) -> Rows:
        """The rows where the boolean mask (or index tensor) ``keep`` says so."""

        def pick(column: Tensor | None) -> Tensor | None:
            return None if column is None else column[keep.to(column.device)]

        return Rows(
            self.values[keep.to(self.values.device)],
            self.sample[keep.to(self.sample.device)],
            self.position[keep.to(self.position.device)],
            pick(self.step),
            pick(self.timestep),
            pick(self.branch),
            pick(self.stream),
        )


def _rows_from_grid(values: Tensor, context: ForwardContext) -> Rows:
    """Rows of ``values`` ``(B, P, d)`` whose P positions per batch element are flattened."""
    b, p, d = values.shape
    if b != context.batch_size:
        raise ValueError(
            f"the hooked tensor has batch size {b} but the forward call announced "
            f"{context.batch_size} samples; if this module's first dimension is not the batch "
            "(e.g. (T, B, d) layouts), give the adapter a flatten rule for it"
        )
    device = values.device
    sample = context.sample_ids.to(device).repeat_interleave(p)  # (B·P,)
    position = torch.arange(p, device=device).repeat(b)  # (B·P,)
    n = b * p
    step = timestep = None
    if context.step >= 0:
        step = torch.full((n,), context.step, dtype=torch.int16, device=device)
        timestep = torch.full((n,), context.timestep, dtype=torch.float32, device=device)
    branch = None
    if context.branch is not None:
        branch = context.branch.to(device).repeat_interleave(p)
    stream = None
    if context.streams is not None:
        streams = context.streams.to(device)
        if streams.ndim == 1:
            streams = streams.expand(b, -1)
        if streams.shape != (b, p):
            raise ValueError(
                f"ForwardContext.streams has shape {tuple(context.streams.shape)} but the hooked "
                f"tensor has {p} positions for {b} samples"
            )
        stream = streams.reshape(n)
    return Rows(values.reshape(n, d), sample, position, step, timestep, branch, stream)


def rows_from_last_dim(tensor: Tensor, context: ForwardContext) -> Rows:
    """The default flatten rule: the last dimension is d, the first is the batch, and every
    dimension between them is a position (flattened in row-major order).

    ``(B, d)`` gives one row per sample (position 0); ``(B, T, d)`` one row per token.
    """
    if tensor.ndim < 2:
        raise ValueError(
            f"cannot flatten a tensor of shape {tuple(tensor.shape)} into (rows, d): it needs a "
            "batch dimension and a feature dimension"
        )
    b, d = tensor.shape[0], tensor.shape[-1]
    return _rows_from_grid(tensor.reshape(b, -1, d), context)


def rows_from_channels_first(tensor: Tensor, context: ForwardContext) -> Rows:
    """Feature maps ``(B, C, H, W)`` (or ``(B, C, *S)``) to ``(B·H·W, C)`` rows; the position is
    the spatial index ``h·W + w``."""
    if tensor.ndim < 3:
        return rows_from_last_dim(tensor, context)
    b, c = tensor.shape[:2]
    return _rows_from_grid(tensor.reshape(b, c, -1).transpose(1, 2), context)  # (B, H·W, C)


def rows_of_stream(tensor: Tensor, context: ForwardContext, stream: int) -> Rows:
    """:func:`rows_from_last_dim` rows that all belong to one stream (e.g. every token of an
    image tower is an image token), whatever the call's ``context.streams`` say."""
    rows = rows_from_last_dim(tensor, replace(context, streams=None))
    rows.stream = torch.full((len(rows),), stream, dtype=torch.int8, device=rows.values.device)
    return rows


# ----------------------------------------------------------------------------- the adapter


@dataclass(frozen=True)
class HookpointInfo:
    """A hookpoint a family adapter suggests, and what its tensor means."""

    name: str
    """The ``named_modules()`` path (what ``--hookpoints`` takes)."""
    description: str
    """What the captured tensor is, its layout and what one cached row is."""
    d: int | None = None
    """Width of one row, when the adapter knows it from the model's configuration."""


def first_tensor(value: Any) -> Tensor | None:
    """The activation in a module's output: the tensor itself, the first element of a tuple or
    list, or the first tensor field of a ``ModelOutput``-like mapping."""
    if isinstance(value, Tensor):
        return value
    if isinstance(value, (tuple, list)):
        for item in value:
            found = first_tensor(item)
            if found is not None:
                return found
        return None
    if isinstance(value, dict):
        for item in value.values():
            if isinstance(item, Tensor):
                return item
    return None


class ModelAdapter(ABC):
    """One family of models, as the activation cache and steering see it.

    Subclasses implement :meth:`root` and :meth:`run`; the other methods have defaults that fit
    most ``nn.Module`` s (override :meth:`flatten` for feature maps, :meth:`describe` to say what
    a hookpoint means).
    """

    family: ClassVar[str] = ""
    """Registry name of the family (``custom``, ``clip``, ...)."""

    streams: tuple[str, ...] = ()
    """Names of the stream codes in ``ForwardContext.streams`` (e.g. ``("text", "image")``)."""

    model_name: str | None = None
    """Hub id or path of the model (recorded with the cache and the dictionary)."""

    revision: str | None = None
    """Revision of the model."""

    @abstractmethod
    def root(self) -> nn.Module:
        """The module whose ``named_modules()`` paths are hookpoints."""

    @abstractmethod
    def run(self, batch: InputBatch, scope: ForwardScope) -> None:
        """Feed ``batch`` to the model: every model call inside ``scope.forward(context)``."""

    def describe(self, hookpoint: str) -> str:
        """What the tensor at ``hookpoint`` means (shown by ``saekit cache info``)."""
        module = self.root().get_submodule(hookpoint)
        return f"{type(module).__name__} at {hookpoint or '<root>'}"

    def hookpoints(self) -> list[HookpointInfo]:
        """The hookpoints worth caching in this family (residual stream per block, attention and
        MLP outputs, ...), each with what its tensor means. Any other ``named_modules()`` path
        can be hooked too; the default lists every module."""
        return [
            HookpointInfo(name, self.describe(name))
            for name, _ in self.root().named_modules()
            if name
        ]

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """Run the family's own generation (a diffusers pipeline's call, ``model.generate``) with
        whatever hooks are installed on :meth:`root`'s modules; families that generate override
        it. ``scope=`` (a :class:`ForwardScope`, e.g. :class:`ContextTracker`) is told the
        context of every model call, as during caching."""
        raise NotImplementedError(
            f"the {self.family or type(self).__name__} adapter has no generation; "
            "run the model yourself with hooks installed on adapter.root()"
        )

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> Any:
        """Move the model to ``device`` / ``dtype`` and put it in eval mode; returns self."""
        self.root().to(device=device, dtype=dtype).eval()
        return self

    def input_tensor(self, hookpoint: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
        """The activation among a module's inputs: the first tensor argument, else the
        ``hidden_states`` keyword, else the first tensor keyword."""
        found = first_tensor(args)
        if found is None:
            found = kwargs.get("hidden_states")
        if found is None:
            found = first_tensor(list(kwargs.values()))
        if not isinstance(found, Tensor):
            raise ValueError(f"hookpoint {hookpoint!r} received no tensor input to capture")
        return found

    def output_tensor(self, hookpoint: str, output: Any) -> Tensor:
        """The activation in a module's output (see :func:`first_tensor`)."""
        found = first_tensor(output)
        if found is None:
            raise ValueError(
                f"hookpoint {hookpoint!r} returned {type(output).__name__}, which holds no tensor "
                "to capture; hook a submodule that returns one"
            )
        return found

    def flatten(self, hookpoint: str, tensor: Tensor, context: ForwardContext) -> Rows:
        """Per-token rows of the hooked tensor (default: :func:`rows_from_last_dim`)."""
        return rows_from_last_dim(tensor, context)

    def identity(self) -> dict[str, Any]:
        """What identifies the model for a cache: a cache directory written with another model
        is refused. Adapters of hub models return the id and revision; a model given in memory
        (no name) is identified by a digest of its weights when that is cheap."""
        identity: dict[str, Any] = {
            "family": self.family,
            "model": self.model_name,
            "revision": self.revision,
            "class": type(self.root()).__name__,
        }
        if self.model_name is None:
            modules = self.identity_modules()
            if sum(p.numel() for m in modules for p in m.parameters()) <= MAX_HASHED_PARAMETERS:
                identity["weights_xxh3"] = weights_digest(*modules)
        return identity

    def identity_modules(self) -> list[nn.Module]:
        """The modules whose weights identify an unnamed model (default: the root)."""
        return [self.root()]

    @property
    def device(self) -> torch.device:
        """Where the model's parameters live (CPU for a model without any)."""
        for parameter in self.root().parameters():
            return parameter.device
        for buffer in self.root().buffers():
            return buffer.device
        return torch.device("cpu")

    def stream_codes(self, names: Sequence[str]) -> list[int]:
        """Indices of the stream ``names`` in :attr:`streams`, with a clear error for unknowns."""
        codes = []
        for name in names:
            if name not in self.streams:
                known = ", ".join(self.streams) or "none (this adapter does not mark streams)"
                raise ValueError(f"unknown stream {name!r}; this adapter's streams: {known}")
            codes.append(self.streams.index(name))
        return codes


# Hash the weights (to refuse a cache written by another model) only when it is cheap.
MAX_HASHED_PARAMETERS = 200_000_000


def weights_digest(*modules: nn.Module) -> str:
    """A digest of every parameter and buffer of ``modules`` (names, shapes, dtypes, values)."""
    digest = xxhash.xxh3_64()
    for index, module in enumerate(modules):
        for name, tensor in sorted(module.state_dict().items()):
            tensor = tensor.detach().to("cpu").contiguous()
            prefix = f"{index}." if len(modules) > 1 else ""
            digest.update(f"{prefix}{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
            if tensor.numel():
                digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
