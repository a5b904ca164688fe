"""The settings of ``saekit demo`` (the full run and the ``--quick`` one the tests use)."""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class DemoConfig:
    """How big each stage of the demo is. The defaults fit in a few minutes on 2 CPU cores."""

    output_dir: str = "saekit-demo"
    """Where the report folder (report.html, report.json, PNG grids, caches) is written."""

    seed: int = 0
    """Seed of the world's scenes, the caches' shuffles and the dictionaries' training."""

    clip_dir: str | None = None
    """The contrastive model (a ``CLIPModel`` folder); default: the testbed's shipped one."""

    pipeline_dir: str | None = None
    """The text-to-image pipeline folder; default: the testbed's shipped one."""

    clip_images: int = 3000
    """Training images for the contrastive model's dictionary (17 rows each: CLS + 16 patches)."""

    denoiser_prompts: int = 800
    """Training prompts for the denoiser's dictionary (one sample per prompt)."""

    held_out: int = 600
    """Fresh scenes for scoring latents against factors (the same number for both models)."""

    denoising_steps: int = 8
    """Sampler steps per prompt while caching the denoiser (every step's rows are kept)."""

    guidance_scale: float = 1.0
    """Classifier-free guidance of the testbed pipeline (1: none, its best setting; above 1
    only the conditional half of each guided batch is cached)."""

    clip_block: str = "vision_model.encoder.layers.2"
    """The contrastive model's image-tower residual stream at a middle block (of 4)."""

    denoiser_block: str = "mid_block.attentions.0"
    """The denoiser's mid block (4x4 feature maps of the 32x32 image)."""

    expansion: int = 4
    """Latents per input dimension of each dictionary."""

    k: int = 16
    """Active latents per row (TopK)."""

    epochs: int = 4
    """Passes over each training cache."""

    batch_size: int = 1024
    """Rows per training step."""

    steering: bool = True
    """Steer the text-to-image model toward a colour and unlearn a shape with the learned
    latents (needs saekit.steering)."""

    steering_prompts: int = 24
    """Prompts per steering / unlearning grid."""

    def quick(self) -> DemoConfig:
        """A run of well under a minute: the same stages on a few hundred inputs."""
        return replace(
            self,
            clip_images=300,
            denoiser_prompts=96,
            held_out=160,
            denoising_steps=3,
            epochs=3,
            batch_size=256,
            steering_prompts=8,
        )
