"""Text-to-image diffusion: any diffusers pipeline whose denoiser is a ``UNet2DConditionModel``
(SD 1.x/2.x, SDXL, SDXL-Turbo) or a diffusion transformer (``SD3Transformer2DModel``,
``FluxTransformer2DModel``, ``PixArtTransformer2DModel``; see :mod:`.dit`), and the testbed's
``TestbedPipeline``.

The pipeline runs its own ``__call__`` (its scheduler, its classifier-free guidance, its prompt
encoding); saekit only hooks modules. Hookpoints are one namespace:

* the denoiser's own module paths, unprefixed, as the published dictionaries name them:
  ``down_blocks.2.attentions.1``, ``mid_block.attentions.0``, ``up_blocks.0.attentions.1``
  (SDXL-Turbo, Surkov et al. 2024), ``up_blocks.1.attentions.1`` (SD 1.5, SAeUron),
  ``transformer_blocks.12``, ``single_transformer_blocks.5`` (Flux);
* the denoiser itself under its component name (``unet`` / ``transformer``: its prediction);
* each text encoder under its component name: ``text_encoder.encoder.layers.10`` (CLIP),
  ``text_encoder_3.encoder.block.5`` (T5). Steering through the text encoder is a published
  method, and its rows are cached like the denoiser's.

Rows: a UNet feature map ``(B, C, H, W)`` gives ``B·H·W`` rows of width ``C`` (position
``h·W + w``); a DiT block's tokens one row per token; every denoiser row records the step index
(the count of the denoiser's calls at a new timestep: a second-order scheduler such as Heun's
calls it twice per scheduler step), the scheduler's timestep (Flux: ``1000·t``) and, with
classifier-free guidance, which half of the ``[uncond, cond]`` batch it came from
(``--branches cond`` keeps the conditional half).
Text-encoder rows record the CFG half of their call (the prompt is encoded first, then the
negative prompt) and no step. Streams: ``image`` (latent positions, image tokens) and ``text``.

Each input's starting noise comes from a generator seeded with ``seed + sample id``, so a row
does not depend on which batch its prompt was in.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .._optional import require
from ..configuration import ConfigError
from .base import (
    COND,
    UNCOND,
    ForwardContext,
    ForwardScope,
    HookpointInfo,
    InputBatch,
    ModelAdapter,
    Rows,
    rows_from_channels_first,
    rows_from_last_dim,
    rows_of_stream,
)
from .dit import denoiser_call, is_joint_block, joint_input, joint_output
from .loading import from_pretrained, read_model_json, torch_dtype

STREAMS = ("image", "text")
IMAGE, TEXT = range(len(STREAMS))

DENOISERS = ("unet", "transformer")
"""Component names of a pipeline's denoiser, in the order they are looked for."""

KNOWN_PIPELINES = {"TestbedPipeline": "saekit.testbed.pipeline:TestbedPipeline"}
"""Pipeline classes outside diffusers that saekit can load from a folder's model_index.json."""


class PipelineModules(nn.Module):
    """One ``named_modules()`` namespace over a pipeline's hookable modules: the denoiser's
    children unprefixed, the denoiser under its component name, each text encoder under its
    own. It only names modules (the pipeline calls them); it is never called itself."""

    def __init__(
        self, denoiser_name: str, denoiser: nn.Module, text_encoders: dict[str, nn.Module]
    ):
        super().__init__()
        for name, child in denoiser.named_children():
            self.add_module(name, child)
        for name, module in [(denoiser_name, denoiser), *text_encoders.items()]:
            if name in self._modules:
                raise ConfigError(
                    f"the pipeline component {name!r} has the name of a module of the denoiser"
                )
            # Registered after the denoiser's children: named_modules() lists each module once,
            # under its first name, so the denoiser's blocks keep their unprefixed paths.
            self.add_module(name, module)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("PipelineModules only names a pipeline's modules; call the pipeline")


@dataclass
class _CallState:
    """What the denoiser pre-hook knows about the pipeline call in progress."""

    sample_ids: Tensor
    cfg: bool
    step: int = -1
    timestep: float | None = None
    image_tokens: int | None = None
    text_tokens: int | None = None
    component: str = ""


class DiffusionAdapter(ModelAdapter):
    """A diffusers text-to-image pipeline.

    Args:
        pipeline: the pipeline (``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``,
            ``StableDiffusion3Pipeline``, ``FluxPipeline``, ``PixArtAlphaPipeline``, ...).
        num_inference_steps: denoising steps per prompt when caching.
        guidance_scale: classifier-free guidance scale (None: the pipeline's default;
            SDXL-Turbo is run with 0.0, which turns guidance off).
        negative_prompt: the unconditional prompt (None: the pipeline's default, usually "").
        seed: base seed of the starting noise (input ``i`` uses ``seed + i``).
        pipeline_kwargs: further arguments of the pipeline's call (``height``, ``width``,
            ``max_sequence_length``, ...).
        name, revision: the hub id or path and revision, recorded with caches.
    """

    family: ClassVar[str] = "diffusion"
    streams = STREAMS

    def __init__(
        self,
        pipeline: Any,
        *,
        num_inference_steps: int = 20,
        guidance_scale: float | None = None,
        negative_prompt: str | None = None,
        seed: int = 0,
        pipeline_kwargs: dict[str, Any] | None = None,
        name: str | None = None,
        revision: str | None = None,
    ) -> None:
        if num_inference_steps < 1:
            raise ConfigError(f"num_inference_steps must be at least 1, got {num_inference_steps}")
        self.pipeline = pipeline
        components = getattr(pipeline, "components", None) or {}
        self.denoiser_name = next((n for n in DENOISERS if components.get(n) is not None), "")
        if not self.denoiser_name:
            raise ConfigError(
                f"{type(pipeline).__name__} has no 'unet' or 'transformer' component; "
                "DiffusionAdapter needs a text-to-image pipeline"
            )
        self.denoiser: nn.Module = components[self.denoiser_name]
        self.text_encoders: dict[str, nn.Module] = {
            n: m
            for n, m in components.items()
            if n.startswith("text_encoder") and isinstance(m, nn.Module)
        }
        self.modules = PipelineModules(self.denoiser_name, self.denoiser, self.text_encoders)
        self.modules.training = self.denoiser.training  # what the cache's train-mode check reads
        self.num_inference_steps = num_inference_steps
        self.guidance_scale = guidance_scale
        self.negative_prompt = negative_prompt
        self.seed = seed
        self.pipeline_kwargs = dict(pipeline_kwargs or {})
        self.model_name = name
        self.revision = revision
        self._call: _CallState | None = None
        self._joint_text: dict[str, int] = {}
        if hasattr(pipeline, "set_progress_bar_config"):
            pipeline.set_progress_bar_config(disable=True)

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
    ) -> DiffusionAdapter:
        """Load a pipeline by hub id or local folder with diffusers' ``from_pretrained`` (the
        class named in its ``model_index.json``); ``options`` are this class's arguments."""
        diffusers = require("diffusers", "diffusion models")
        index = read_model_json(
            spec, "model_index.json", revision=revision, local_files_only=local_files_only
        )
        if index is None:
            raise ConfigError(
                f"{spec} has no model_index.json: DiffusionAdapter loads a whole diffusers "
                "pipeline (a folder or hub repository with model_index.json), not one component"
            )
        pipeline_class = _pipeline_class(diffusers, str(index.get("_class_name", "")))
        pipeline = from_pretrained(
            pipeline_class.from_pretrained,
            spec,
            what="diffusers pipeline",
            revision=revision,
            local_files_only=local_files_only,
            trust_remote_code=trust_remote_code,
            dtype=torch_dtype(dtype),
        )
        adapter = cls(pipeline, name=spec, revision=revision, **options)
        return adapter.to(device=device)

    # ------------------------------------------------------------------ the model

    def root(self) -> nn.Module:
        return self.modules

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> Any:
        kwargs: dict[str, Any] = {}
        if device is not None:
            kwargs["device"] = device
        if dtype is not None:
            kwargs["dtype"] = dtype
        if kwargs:
            self.pipeline.to(**kwargs)
        self.modules.eval()
        return self

    def identity_modules(self) -> list[nn.Module]:
        return [self.denoiser, *self.text_encoders.values()]

    def identity(self) -> dict[str, Any]:
        identity = super().identity()
        identity["class"] = type(self.pipeline).__name__
        identity["denoiser"] = type(self.denoiser).__name__
        return identity

    # ------------------------------------------------------------------ running the pipeline

    def run(self, batch: InputBatch, scope: ForwardScope) -> None:
        prompts = batch.prompts
        missing = [
            s.source or s.id for s, p in zip(batch.samples, prompts, strict=True) if p is None
        ]
        if missing:
            raise ConfigError(
                f"inputs {missing[:3]} hold no prompt; a text-to-image pipeline is fed prompts "
                "(data.prompts or data.pairs)"
            )
        with torch.no_grad():
            self._run_pipeline([p for p in prompts if p is not None], batch.ids, scope, cache=True)

    def generate(
        self,
        prompts: str | Sequence[str],
        *,
        seed: int | None = None,
        scope: ForwardScope | None = None,
        **kwargs: Any,
    ) -> Any:
        """The pipeline's own call on ``prompts`` with the adapter's settings (``kwargs``
        override them), returning what the pipeline returns. Hooks installed on the pipeline's
        modules act; ``scope`` is told each text-encoder and denoiser call's context (step,
        timestep, CFG half), as during caching. Prompt ``i`` starts from noise seeded with
        ``seed + i`` (default seed: the adapter's)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        ids = torch.arange(len(prompts))
        return self._run_pipeline(prompts, ids, scope, cache=False, seed=seed, **kwargs)

    def _run_pipeline(
        self,
        prompts: list[str],
        ids: Tensor,
        scope: ForwardScope | None,
        *,
        cache: bool,
        seed: int | None = None,
        **overrides: Any,
    ) -> Any:
        kwargs = self._call_kwargs(ids, cache=cache, seed=seed)
        kwargs.update(overrides)
        state = _CallState(ids, cfg=self._cfg_expected(kwargs))
        with contextlib.ExitStack() as stack:
            if scope is not None:
                stack.enter_context(scope.forward(ForwardContext(ids), stoppable=cache))
            stack.enter_context(self._announcing(state, scope))
            return self.pipeline(prompt=prompts, **kwargs)

    def _call_kwargs(self, ids: Tensor, *, cache: bool, seed: int | None) -> dict[str, Any]:
        base = self.seed if seed is None else seed
        kwargs: dict[str, Any] = {
            "num_inference_steps": self.num_inference_steps,
            # One generator per input: its noise does not depend on its batch.
            "generator": [torch.Generator("cpu").manual_seed(base + int(i)) for i in ids],
        }
        if self.guidance_scale is not None:
            kwargs["guidance_scale"] = self.guidance_scale
        if self.negative_prompt is not None:
            kwargs["negative_prompt"] = [self.negative_prompt] * len(ids)
        if cache and getattr(self.pipeline, "vae", None) is not None:
            kwargs["output_type"] = "latent"  # the rows are captured: skip decoding the image
        kwargs.update(self.pipeline_kwargs)
        return kwargs

    def _cfg_expected(self, kwargs: dict[str, Any]) -> bool:
        """Whether the pipeline will guide (and so encode a negative prompt): what its own
        ``do_classifier_free_guidance`` will say, read before the call sets it."""
        scale = kwargs.get("guidance_scale")
        if scale is None:
            parameter = inspect.signature(self.pipeline.__call__).parameters.get("guidance_scale")
            scale = None if parameter is None else parameter.default
        if type(self.pipeline).__name__.startswith("Flux"):
            return False  # guidance-distilled: the scale is an input of the transformer
        if isinstance(scale, (int, float)):
            if type(self.pipeline).__name__ == "TestbedPipeline":
                return scale != 1.0
            return scale > 1.0
        return False

    @contextlib.contextmanager
    def _announcing(self, state: _CallState, scope: ForwardScope | None) -> Iterator[None]:
        """Pre-hooks that tell ``scope`` each model call's context while the pipeline runs,
        and keep what the flatten rule needs (image/text token counts); removed on exit,
        also after an error."""
        self._call = state
        handles = []

        def on_denoiser(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            batch, timestep, image_tokens, text_tokens = denoiser_call(module, args, kwargs)
            if state.timestep is None or timestep != state.timestep:
                state.step += 1
                state.timestep = timestep
            state.image_tokens, state.text_tokens = image_tokens, text_tokens
            state.component = self.denoiser_name
            context = ForwardContext(state.sample_ids, step=state.step, timestep=timestep)
            n = len(state.sample_ids)
            if batch == 2 * n:
                context = context.with_cfg_halves()  # diffusers' order: [uncond; cond]
            elif batch != n:
                raise ConfigError(
                    f"the {self.denoiser_name} was called on a batch of {batch} for {n} prompts; "
                    "saekit caches one image per prompt (num_images_per_prompt=1)"
                )
            if scope is not None:
                scope.set_context(context)

        def on_text_encoder(name: str):
            calls = [0]

            def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                # Pipelines encode the prompt first, then (with guidance) the negative prompt.
                branch = None
                if state.cfg:
                    branch = COND if calls[0] == 0 else UNCOND if calls[0] == 1 else None
                calls[0] += 1
                state.component = name
                context = ForwardContext(state.sample_ids)
                if branch is not None:
                    context = replace(
                        context,
                        branch=torch.full((len(state.sample_ids),), branch, dtype=torch.int8),
                    )
                if scope is not None:
                    scope.set_context(context)

            return hook

        try:
            handles.append(self.denoiser.register_forward_pre_hook(on_denoiser, with_kwargs=True))
            for name, encoder in self.text_encoders.items():
                handles.append(
                    encoder.register_forward_pre_hook(on_text_encoder(name), with_kwargs=True)
                )
            yield
        finally:
            for handle in handles:
                handle.remove()
            self._call = None

    # ------------------------------------------------------------------ rows

    def component(self, hookpoint: str) -> str:
        """The pipeline component a hookpoint lies in (the denoiser's name or a text encoder's)."""
        head = hookpoint.split(".", 1)[0]
        return head if head in self.text_encoders else self.denoiser_name

    def input_tensor(self, hookpoint: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
        module = self.modules.get_submodule(hookpoint)
        if is_joint_block(module):
            return joint_input(module, args, kwargs)
        return super().input_tensor(hookpoint, args, kwargs)

    def output_tensor(self, hookpoint: str, output: Any) -> Tensor:
        module = self.modules.get_submodule(hookpoint)
        if is_joint_block(module):
            tensor, text_tokens = joint_output(module, output)
            self._joint_text[hookpoint] = text_tokens
            return tensor
        return super().output_tensor(hookpoint, output)

    def flatten(self, hookpoint: str, tensor: Tensor, context: ForwardContext) -> Rows:
        plain = replace(context, streams=None)
        if self.component(hookpoint) != self.denoiser_name:
            return rows_of_stream(tensor, plain, TEXT)
        if tensor.ndim == 4:  # a UNet feature map (B, C, H, W): one row per latent position
            rows = rows_from_channels_first(tensor, plain)
            rows.stream = torch.full(
                (len(rows),), IMAGE, dtype=torch.int8, device=rows.values.device
            )
            return rows
        rows = rows_from_last_dim(tensor, plain)
        if tensor.ndim != 3:
            return rows
        state = self._call
        stream = None
        if hookpoint in self._joint_text:  # [text; image] tokens of a joint block
            stream = torch.where(rows.position < self._joint_text[hookpoint], TEXT, IMAGE)
        elif type(self.denoiser).__name__ == "UNet2DConditionModel":
            # Tokens of a latent feature map, except the keys/values of cross-attention.
            text = state is not None and tensor.shape[1] == state.text_tokens
            stream = torch.full_like(rows.position, TEXT if text else IMAGE)
        elif state is not None and state.image_tokens != state.text_tokens:
            length = tensor.shape[1]
            if length == state.image_tokens:
                stream = torch.full_like(rows.position, IMAGE)
            elif length == state.text_tokens:
                stream = torch.full_like(rows.position, TEXT)
        if stream is not None:
            rows.stream = stream.to(torch.int8)
        return rows

    # ------------------------------------------------------------------ what each tensor means

    def describe(self, hookpoint: str) -> str:
        component = self.component(hookpoint)
        module = self.modules.get_submodule(hookpoint)
        kind = type(module).__name__
        if component != self.denoiser_name:
            return (
                f"{kind} of the text encoder {component}, (B, T, d) prompt tokens (stream text), "
                "one row per token per prompt; branch = CFG half of the call (cond: the prompt)"
            )
        if hookpoint == self.denoiser_name:
            return f"the {self.denoiser_name}'s prediction, one row per latent position per step"
        per = "one row per latent position, per denoising step and CFG half"
        if is_joint_block(module):
            return (
                f"{kind} output, text and image streams as one (B, T_text + N, d) sequence (text "
                "first; stream text / image), one row per token per step and CFG half"
            )
        if type(self.denoiser).__name__ == "UNet2DConditionModel":
            if re.fullmatch(
                r"(down_blocks|up_blocks)\.\d+\.attentions\.\d+|mid_block\.attentions\.\d+",
                hookpoint,
            ):
                return (
                    f"{kind} (cross-attention transformer) output, a (B, C, H, W) feature map "
                    f"flattened to (B·H·W, C): {per}; position h·W + w"
                )
            return f"{kind} in the UNet; 4-D feature maps become (B·H·W, C) rows: {per}"
        return f"{kind} in the {type(self.denoiser).__name__}: one row per token, per step and CFG half"

    def hookpoints(self) -> list[HookpointInfo]:
        out = []
        names = dict(self.modules.named_modules())
        config = getattr(self.denoiser, "config", None)
        if type(self.denoiser).__name__ == "UNet2DConditionModel":
            for name in names:
                if re.fullmatch(
                    r"(down_blocks|up_blocks)\.\d+\.attentions\.\d+|mid_block\.attentions\.\d+",
                    name,
                ):
                    channels = getattr(names[name], "in_channels", None)
                    out.append(HookpointInfo(name, self.describe(name), channels))
        else:
            inner = None
            if config is not None:
                heads = getattr(config, "num_attention_heads", None)
                head_dim = getattr(config, "attention_head_dim", None)
                inner = heads * head_dim if heads and head_dim else None
            for name in names:
                if re.fullmatch(r"(single_)?transformer_blocks\.\d+", name):
                    out.append(HookpointInfo(name, self.describe(name), inner))
        for encoder_name, encoder in self.text_encoders.items():
            width = getattr(getattr(encoder, "config", None), "hidden_size", None) or getattr(
                getattr(encoder, "config", None), "d_model", None
            )
            for name, _ in encoder.named_modules():
                if re.fullmatch(r"(.*\.)?(layers|block)\.\d+", name):
                    full = f"{encoder_name}.{name}"
                    out.append(HookpointInfo(full, self.describe(full), width))
        return out


def _pipeline_class(diffusers: Any, class_name: str) -> Any:
    """The pipeline class named by a model_index.json: a diffusers class, or one saekit ships."""
    if hasattr(diffusers, class_name):
        return getattr(diffusers, class_name)
    if class_name in KNOWN_PIPELINES:
        module_name, _, attribute = KNOWN_PIPELINES[class_name].partition(":")
        return getattr(importlib.import_module(module_name), attribute)
    raise ConfigError(
        f"the pipeline class {class_name!r} (model_index.json) is neither in diffusers nor known "
        "to saekit; build it in Python and wrap it: DiffusionAdapter(pipeline)"
    )
