"""The testbed's three models load by path through the family adapters and cache what the demo
caches: the contrastive model's image-tower residual stream at a middle block, the denoiser's
mid block (and the text encoder the pipeline shares with CLIP), the VLM's language model.

The models are built with the testbed's own configurations, tokenizers, processors and
pipeline class (random weights), saved with ``save_pretrained`` and loaded back the way the
shipped ones are, so the test does not depend on the trained weights."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from adapters_support import one_thread, recording
from test_cache_support import read_all

from saekit.adapters import adapter_for, load_adapter
from saekit.adapters.clip import CLS, PATCH, CLIPAdapter
from saekit.adapters.diffusion import IMAGE, DiffusionAdapter
from saekit.adapters.vlm import VLMAdapter
from saekit.cache import CacheConfig, ImageFolder, ImagePromptPairs, cache_activations
from saekit.testbed import models, world
from saekit.testbed import pipeline as testbed_pipeline

N = 6


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def testbed(tmp_path_factory):
    """Folders holding the testbed's CLIP, pipeline and VLM, as their training scripts save
    them (small widths: the classes and files matter here, not the sizes)."""
    from diffusers import DDIMScheduler, UNet2DConditionModel

    root = tmp_path_factory.mktemp("testbed")
    torch.manual_seed(0)
    tokenizer = models.build_tokenizer(add_eos=True)
    clip_config = models.clip_config(len(tokenizer), hidden=32, layers=4)
    clip = transformers.CLIPModel(clip_config).eval()
    clip.save_pretrained(root / "clip")
    tokenizer.save_pretrained(root / "clip")
    models.build_image_processor().save_pretrained(root / "clip")

    text_encoder = transformers.CLIPTextModel(clip_config.text_config).eval()
    text_encoder.load_state_dict(clip.text_model.state_dict())
    unet = UNet2DConditionModel(  # scripts/train_testbed_diffusion.py's layout, narrower
        sample_size=world.IMAGE_SIZE // 2,
        in_channels=12,
        out_channels=12,
        layers_per_block=1,
        block_out_channels=(16, 32, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
    ).eval()
    scheduler = DDIMScheduler(beta_schedule="squaredcos_cap_v2", timestep_spacing="trailing")
    testbed_pipeline.TestbedPipeline(
        unet, scheduler, text_encoder, tokenizer, patch_size=2
    ).save_pretrained(root / "pipeline")

    vlm_tokenizer = models.build_tokenizer(add_eos=False)
    vlm = transformers.LlavaForConditionalGeneration(
        models.llava_config(clip_config, len(vlm_tokenizer), hidden=48, layers=2)
    ).eval()
    processor = transformers.LlavaProcessor(
        image_processor=models.build_image_processor(),
        tokenizer=vlm_tokenizer,
        patch_size=models.PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    vlm.save_pretrained(root / "vlm")
    processor.save_pretrained(root / "vlm")

    scenes = world.sample_scenes(N, seed=12345)
    (root / "images").mkdir()
    with open(root / "pairs.jsonl", "w") as handle:
        for i, image in enumerate(world.to_pil(world.render(scenes))):
            image.save(root / "images" / f"{i}.png")
            handle.write(json.dumps({"image": f"images/{i}.png", "prompt": "describe :"}) + "\n")
    return root, scenes


def _cfg(tmp_path, hookpoints, name, **overrides) -> CacheConfig:
    base = dict(
        hookpoints=hookpoints,
        output_dir=str(tmp_path / name),
        batch_size=4,
        rows_per_shard=256,
        shuffle_buffer_rows=1024,
        dtype="float32",
        progress=False,
    )
    return CacheConfig(**{**base, **overrides})


def test_testbed_clip_caches_the_image_tower_at_a_middle_block(tmp_path, testbed):
    root, scenes = testbed
    adapter = load_adapter(str(root / "clip"))
    assert isinstance(adapter, CLIPAdapter)
    middle = "vision_model.encoder.layers.2"  # of 4
    result = cache_activations(adapter, ImageFolder(root / "images"), _cfg(tmp_path, [middle], "c"))
    assert result.rows == {middle: N * (models.NUM_IMAGE_TOKENS + 1)}
    rows, meta = read_all(tmp_path / "c")
    assert set(meta["stream"][meta["position"] == 0].tolist()) == {CLS}
    assert set(meta["stream"][meta["position"] > 0].tolist()) == {PATCH}
    # the same rows as the model on the testbed's own pixel values (what its processor makes)
    model, _ = models.load_clip(root / "clip")
    with recording(model, [middle]) as seen, torch.no_grad():
        model.get_image_features(pixel_values=models.pixel_values(world.render(scenes)))
    torch.testing.assert_close(rows, seen[middle][0].reshape(-1, 32), rtol=1e-5, atol=1e-5)
    assert isinstance(adapter_for(models.load_clip(root / "clip")), CLIPAdapter)


def test_testbed_pipeline_caches_the_denoisers_mid_block(tmp_path, testbed):
    root, scenes = testbed
    adapter = load_adapter(str(root / "pipeline"), num_inference_steps=2, guidance_scale=3.0)
    assert isinstance(adapter, DiffusionAdapter)
    hooks = ["mid_block.attentions.0", "text_encoder.encoder.layers.3"]
    assert hooks[0] in {h.name for h in adapter.hookpoints()}
    captions = [s.caption() for s in scenes]
    result = cache_activations(adapter, captions, _cfg(tmp_path, hooks, "p"))
    # the mid block runs at 4x4 (32 px in 2x2 space-to-depth is 16x16, down twice)
    assert result.rows[hooks[0]] == N * 2 * 2 * 16  # steps x CFG halves x positions
    _, meta = read_all(tmp_path / "p", hooks[0])
    assert set(meta["step"].tolist()) == {0, 1} and set(meta["branch"].tolist()) == {0, 1}
    assert set(meta["stream"].tolist()) == {IMAGE}
    assert result.rows[hooks[1]] == N * 2 * models.MAX_TEXT_TOKENS  # the prompt and ""
    images = adapter.generate(captions[:2], num_inference_steps=2).images
    assert images.shape == (2, 3, world.IMAGE_SIZE, world.IMAGE_SIZE)
    assert isinstance(adapter_for(models.load_pipeline(root / "pipeline")), DiffusionAdapter)


def test_testbed_vlm_caches_image_and_text_positions(tmp_path, testbed):
    root, _ = testbed
    adapter = load_adapter(str(root / "vlm"))
    assert isinstance(adapter, VLMAdapter)
    layer = "model.language_model.layers.1"
    result = cache_activations(
        adapter, ImagePromptPairs(root / "pairs.jsonl"), _cfg(tmp_path, [layer], "v")
    )
    # "<image> describe :" -> <bos>, one position per patch, "describe", ":"
    assert result.rows == {layer: N * (1 + models.NUM_IMAGE_TOKENS + 2)}
    _, meta = read_all(tmp_path / "v")
    assert int((meta["stream"] == 1).sum()) == N * models.NUM_IMAGE_TOKENS
    pictures = world.to_pil(world.render(world.sample_scenes(2, seed=5)))
    assert len(adapter.generate(pictures, ["<image> describe :"] * 2, max_new_tokens=3)) == 2
