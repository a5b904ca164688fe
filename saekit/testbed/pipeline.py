"""`TestbedPipeline`: the testbed's text-to-image model as a diffusers pipeline, in pixel space.

Stable Diffusion's conditioning path without its autoencoder: a prompt is tokenised to a fixed 32
tokens, the frozen CLIP text tower of the testbed's contrastive model turns it into
``(B, 32, d)`` hidden states, and a ``UNet2DConditionModel`` denoises RGB pixels while
cross-attending to them, with classifier-free guidance (Ho & Salimans 2022) against the empty
prompt. The UNet sees the pixels in 2x2 space-to-depth form, ``(B, 12, 16, 16)`` for a 32x32
image (``patch_size=2``; the "patching" of Hoogeboom et al. 2023, simple diffusion): a lossless
rearrangement that makes every layer four times cheaper than at full resolution. Two coordinate
channels (y and x in [-1, 1], CoordConv, Liu et al. 2018) are appended to the UNet's input: a
UNet has no positional embedding, and without them "at the top left" is learnt only slowly
through the zero padding of its convolutions. Everything a steering hook may want to touch is a stock module: ``pipe.unet.mid_block``,
``pipe.unet.up_blocks[i]``, the attention processors, ``pipe.text_encoder``.

>>> pipe = saekit.testbed.load_pipeline()
>>> images = pipe(["a large red circle at the top left on a gray background"]).images  # (1, 3, 32, 32)
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor


class TestbedPipeline(DiffusionPipeline):
    """Text-to-image in pixel space: CLIP text tower -> cross-attention UNet -> scheduler.

    Components: ``unet`` (``UNet2DConditionModel``, 3 channels in and out), ``scheduler`` (any
    diffusers scheduler; DDIM ships), ``text_encoder`` (``CLIPTextModel``), ``tokenizer``.
    """

    def __init__(
        self, unet: Any, scheduler: Any, text_encoder: Any, tokenizer: Any, patch_size: int = 2
    ) -> None:
        super().__init__()
        self.register_modules(
            unet=unet, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer
        )
        self.register_to_config(patch_size=patch_size)

    @property
    def patch_size(self) -> int:
        """Side of the square of pixels that one UNet position holds (space-to-depth)."""
        return int(self.config["patch_size"])

    @property
    def image_size(self) -> int:
        return int(self.unet.config.sample_size) * self.patch_size

    def to_model_space(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``(B, 3, H, W)`` in [0, 1] -> the UNet's sample space ``(B, 3p², H/p, W/p)``."""
        return F.pixel_unshuffle(images * 2 - 1, self.patch_size)

    def with_coordinates(self, sample: torch.Tensor) -> torch.Tensor:
        """``(B, C, h, w)`` -> ``(B, C + 2, h, w)`` with y and x coordinate channels, when the
        UNet takes two input channels more than it returns (else ``sample`` unchanged)."""
        extra = int(self.unet.config.in_channels) - int(self.unet.config.out_channels)
        if extra == 0:
            return sample
        if extra != 2:
            raise ValueError(
                f"the UNet takes {extra} input channels more than it returns; the testbed "
                "pipeline knows only 0 (none) or 2 (y and x coordinates)"
            )
        b, _, h, w = sample.shape
        ys = torch.linspace(-1, 1, h, device=sample.device, dtype=sample.dtype)
        xs = torch.linspace(-1, 1, w, device=sample.device, dtype=sample.dtype)
        grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij"))  # (2, h, w)
        return torch.cat([sample, grid.expand(b, 2, h, w)], dim=1)

    def to_images(self, sample: torch.Tensor) -> torch.Tensor:
        """The UNet's sample space -> images ``(B, 3, H, W)`` in [0, 1]."""
        return (F.pixel_shuffle(sample, self.patch_size) / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, T, d)`` last hidden states and ``(B, d)`` pooled (``<eos>``) state of the text
        tower, prompts padded to a fixed ``T``.

        Like Stable Diffusion: padded to the tokenizer's maximum length and no attention mask, so
        every prompt gives the UNet the same number of keys. Like SDXL, the pooled state also
        conditions the UNet globally (added to its timestep embedding), when its config has
        ``class_embed_type="projection"``.
        """
        tokens = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        ids = tokens["input_ids"].to(self.text_encoder.device)
        out = self.text_encoder(input_ids=ids)
        return out.last_hidden_state, out.pooler_output

    def denoise(
        self,
        sample: torch.Tensor,
        t: Any,
        context: torch.Tensor,
        pooled: torch.Tensor,
        unet: Any = None,
    ) -> torch.Tensor:
        """One call of ``unet`` (default: the pipeline's): coordinates appended to ``sample``,
        the text states as cross-attention keys, the pooled state as class embedding."""
        unet = self.unet if unet is None else unet
        global_text = pooled if unet.config.class_embed_type is not None else None
        return unet(
            self.with_coordinates(sample),
            t,
            encoder_hidden_states=context,
            class_labels=global_text,
        ).sample

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        num_inference_steps: int = 20,
        guidance_scale: float = 1.0,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pt",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple[Any]:
        """Generate images for ``prompt``.

        ``guidance_scale`` 1 (the default) disables classifier-free guidance: the shipped UNet
        follows its prompt best without it (oracle on 192 held-out captions, 20 DDIM steps:
        colour 0.92 / shape 0.96 / position 0.98 unguided, 0.54 / 0.58 / 0.84 at guidance 3, whose
        samples often hold extra objects); larger values still work. ``generator``: one, or one
        per image (diffusers' convention); ``latents`` (starting noise in the UNet's sample
        space, ``(B, 12, 16, 16)``) makes a run repeatable across prompts; ``output_type``: ``"pt"`` (float
        ``(B, 3, H, W)`` in [0, 1]), ``"np"`` (``(B, H, W, 3)``) or ``"pil"``.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        if output_type not in ("pt", "np", "pil"):
            raise ValueError(f"output_type must be 'pt', 'np' or 'pil', got {output_type!r}")
        device, dtype = self.unet.device, self.unet.dtype
        size = self.unet.config.sample_size
        shape = (len(prompts), self.unet.config.out_channels, size, size)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        sample = latents.to(device=device, dtype=dtype) * self.scheduler.init_noise_sigma

        guided = guidance_scale != 1.0
        context, pooled = self.encode_prompt(prompts)  # (B, T, d), (B, d)
        if guided:
            empty, empty_pooled = self.encode_prompt([""] * len(prompts))
            context, pooled = torch.cat([empty, context]), torch.cat([empty_pooled, pooled])

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        for t in self.progress_bar(self.scheduler.timesteps):
            model_input = torch.cat([sample, sample]) if guided else sample
            model_input = self.scheduler.scale_model_input(model_input, t)
            out = self.denoise(model_input, t, context.to(dtype), pooled.to(dtype))
            if guided:
                uncond, text = out.chunk(2)
                out = uncond + guidance_scale * (text - uncond)
            sample = self.scheduler.step(out, t, sample, generator=generator).prev_sample

        images = self.to_images(sample).float().cpu()  # (B, 3, H, W)
        result: Any = images
        if output_type != "pt":
            result = images.permute(0, 2, 3, 1).numpy()
            if output_type == "pil":
                result = self.numpy_to_pil(result)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (result,)
        return ImagePipelineOutput(images=result)


def generate(
    pipe: TestbedPipeline,
    prompts: list[str],
    *,
    seed: int = 0,
    batch_size: int = 64,
    **kwargs: Any,
) -> torch.Tensor:
    """Images ``(N, 3, H, W)`` in [0, 1] for ``prompts``, in batches, from one seeded generator.

    ``kwargs`` go to the pipeline (``num_inference_steps``, ``guidance_scale``, ...). The same
    seed and prompts give the same images.
    """
    generator = torch.Generator().manual_seed(seed)
    chunks = []
    for start in range(0, len(prompts), batch_size):
        out: Any = pipe(prompts[start : start + batch_size], generator=generator, **kwargs)
        chunks.append(out.images)
    if not chunks:
        return torch.zeros(0, 3, pipe.image_size, pipe.image_size)
    return torch.cat(chunks)
