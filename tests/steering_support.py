"""Tiny models for the steering tests: a testbed pipeline (real UNet2DConditionModel, CLIP text
tower, DDIM), dictionaries at its blocks, and a recorder that sees a hooked module's output
before and after the steering hook."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from saekit.dictionaries import SAEConfig, TopKSAE


def tiny_testbed_pipeline(seed: int = 0, *, text_encoder: Any = None, tokenizer: Any = None) -> Any:
    """A ``TestbedPipeline`` with a 16x16 UNet (8x8 mid block) on a one-layer text tower (or on
    ``text_encoder`` and ``tokenizer``, e.g. a tiny CLIP's text tower, width 32)."""
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    from saekit.testbed import models
    from saekit.testbed.pipeline import TestbedPipeline

    tokenizer = tokenizer or models.build_tokenizer(add_eos=True)
    torch.manual_seed(seed)
    text = text_encoder or CLIPTextModel(
        models.clip_config(len(tokenizer), hidden=32, layers=1).text_config
    )
    text.eval()
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=12,
        out_channels=12,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
    ).eval()
    pipe = TestbedPipeline(unet, DDIMScheduler(num_train_timesteps=100), text, tokenizer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sae(d_in: int, hookpoint: str, *, d_sae: int = 64, k: int = 4, seed: int = 0) -> TopKSAE:
    torch.manual_seed(seed)
    sae = TopKSAE(SAEConfig(d_in=d_in, d_sae=d_sae, k=k, hookpoint=hookpoint))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
    return sae.eval()


@contextlib.contextmanager
def before_and_after(module: nn.Module) -> Iterator[tuple[list[Tensor], list[Tensor]]]:
    """Record ``module``'s output before any hook installed so far (prepended now, so it runs
    first) and after all of them (appended)."""
    raw: list[Tensor] = []
    steered: list[Tensor] = []

    def first(out: Any) -> Tensor:
        return out if isinstance(out, Tensor) else out[0]

    handles = [
        module.register_forward_hook(
            lambda m, a, out: raw.append(first(out).detach().clone()), prepend=True
        ),
        module.register_forward_hook(lambda m, a, out: steered.append(first(out).detach().clone())),
    ]
    try:
        yield raw, steered
    finally:
        for handle in handles:
            handle.remove()


def generate(pipe: Any, prompts: list[str], *, steps: int = 3, guidance: float = 3.0) -> Tensor:
    generator = torch.Generator().manual_seed(0)
    out = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, generator=generator)
    return out.images
