"""Tiny models built in code for the activation-cache tests (and factories the CLI can import
as ``test_cache_support:tiny_transformer``)."""

from __future__ import annotations

import math
import time

import torch
from torch import Tensor, nn

from saekit.adapters import (
    CustomAdapter,
    ForwardContext,
    ForwardScope,
    InputBatch,
    ModelAdapter,
    Rows,
    rows_from_channels_first,
)
from saekit.cache import CacheReader

VOCAB, WIDTH, SEQ = 64, 16, 8


class Block(nn.Module):
    """A pre-norm transformer block: x + attn(ln(x)), then + mlp(ln(x))."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x: Tensor) -> Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class TinyTransformer(nn.Module):
    """Token ids ``(B, T)`` -> logits ``(B, T, vocab)``."""

    def __init__(self, vocab: int = VOCAB, d: int = WIDTH, layers: int = 3, seq: int = SEQ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(seq, d) * 0.1)
        self.blocks = nn.ModuleList(Block(d) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, ids: Tensor) -> Tensor:
        x = self.embed(ids) + self.pos[: ids.shape[1]]  # (B, T, d)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def tiny_transformer(seed: int = 0) -> TinyTransformer:
    """The factory ``saekit cache --model test_cache_support:tiny_transformer`` loads."""
    torch.manual_seed(seed)
    return TinyTransformer().eval()


class SlowFeedAdapter(CustomAdapter):
    """A custom adapter that sleeps per batch, so a test can kill its run mid-way."""

    def run(self, batch: InputBatch, scope: ForwardScope) -> None:
        time.sleep(0.05)
        super().run(batch, scope)


def slow_tiny_transformer() -> SlowFeedAdapter:
    return SlowFeedAdapter(tiny_transformer())


def token_inputs(n: int = 120, seed: int = 1) -> Tensor:
    return torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(seed))


def reference_outputs(model: nn.Module, module: str, ids: Tensor) -> Tensor:
    """The output of ``module`` for inputs ``ids`` with a plain forward hook (no saekit)."""
    seen: list[Tensor] = []
    handle = model.get_submodule(module).register_forward_hook(
        lambda m, a, out: seen.append(out.detach().clone())
    )
    try:
        with torch.no_grad():
            model(ids)
    finally:
        handle.remove()
    (out,) = seen
    return out


def read_all(cache, hookpoint=None) -> tuple[Tensor, dict[str, Tensor]]:
    """Every row of a cache hookpoint with its metadata, sorted by (sample, position, step,
    branch)."""
    reader = CacheReader(cache, hookpoint, 1 << 20, shuffle=False, metadata=True)
    values, meta = [], []
    for batch in reader:
        values.append(batch.activations)
        meta.append(batch.metadata)
    x = torch.cat(values)
    columns = {k: torch.cat([m[k] for m in meta]) for k in meta[0]}
    key = (
        columns["sample"] * 1_000_000
        + columns["step"].long().clamp(min=0) * 10_000
        + columns["branch"].long().clamp(min=0) * 5_000
        + columns["position"].long()
    )
    order = key.argsort()
    return x[order], {k: v[order] for k, v in columns.items()}


class ToyDenoiser(nn.Module):
    """A conv net standing in for a UNet: latents ``(B, C, H, W)`` and a timestep."""

    def __init__(self, channels: int = 4, width: int = 8) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(channels, width, 3, padding=1)
        self.mid = nn.Conv2d(width, width, 3, padding=1)
        self.conv_out = nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, latents: Tensor, timestep: Tensor, cond: Tensor) -> Tensor:
        h = self.conv_in(latents) + cond[:, :, None, None] + timestep.view(-1, 1, 1, 1) / 1000
        h = torch.tanh(self.mid(h))
        return self.conv_out(h)


class ToyDiffusionAdapter(ModelAdapter):
    """A diffusion-style adapter: several denoising steps per batch, each a CFG call whose
    batch is [uncond; cond], announced to the cache with its step and timestep."""

    family = "toy-diffusion"

    def __init__(self, steps: int = 3, size: int = 4) -> None:
        torch.manual_seed(0)
        self.model = ToyDenoiser().eval()
        self.steps = steps
        self.size = size
        self.timesteps = [999.0 - 333.0 * i for i in range(steps)]
        self.calls: list[ForwardContext] = []

    def root(self) -> nn.Module:
        return self.model

    def run(self, batch: InputBatch, scope: ForwardScope) -> None:
        ids = batch.ids
        generator = torch.Generator().manual_seed(int(ids[0]))
        latents = torch.randn(len(ids), 4, self.size, self.size, generator=generator)
        cond = batch.stacked_tensors()  # (B, 8)
        uncond = torch.zeros_like(cond)
        with torch.no_grad():
            for step, t in enumerate(self.timesteps):
                context = ForwardContext(ids, step=step, timestep=t).with_cfg_halves()
                self.calls.append(context)
                with scope.forward(context, stoppable=False):  # the output is needed
                    noise = self.model(
                        torch.cat([latents, latents]),
                        torch.full((2 * len(ids),), t),
                        torch.cat([uncond, cond]),
                    )
                noise_uncond, noise_cond = noise.chunk(2)
                latents = latents - 0.1 * (noise_uncond + 2.0 * (noise_cond - noise_uncond))

    def flatten(self, hookpoint: str, tensor: Tensor, context: ForwardContext) -> Rows:
        return rows_from_channels_first(tensor, context)


class ToyVLMAdapter(CustomAdapter):
    """Marks the first ``image_tokens`` positions as image tokens, the rest as text."""

    streams = ("text", "image")

    def __init__(self, model: nn.Module, image_tokens: int = 3) -> None:
        super().__init__(model, streams=("text", "image"))
        self.image_tokens = image_tokens

    def run(self, batch: InputBatch, scope: ForwardScope) -> None:
        x = batch.stacked_tensors()
        streams = torch.zeros(x.shape[1], dtype=torch.int8)
        streams[: self.image_tokens] = 1
        with torch.no_grad(), scope.forward(ForwardContext(batch.ids, streams=streams)):
            self.model(x)


def assert_finite(x: Tensor) -> None:
    assert bool(torch.isfinite(x).all()) and not math.isnan(float(x.float().sum()))
