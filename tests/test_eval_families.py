"""Splicing and downstream scores through saekit's own family adapters on real tiny models: a
diffusers StableDiffusionPipeline (UNet mid block), a transformers LLaVA (language-model layer
and vision tower), and the dashboard's steering preview on the pipeline."""

from __future__ import annotations

import pytest
import torch
from adapters_support import tiny_llava, tiny_sd_pipeline
from test_eval_support import (
    identity_dictionary,
    one_thread_module,  # noqa: F401 (a fixture)
    random_dictionary,
)

from saekit.adapters.diffusion import DiffusionAdapter
from saekit.dashboard import steering_grid
from saekit.evaluation import SpliceSite, adapter_generator, evaluate_diffusion, evaluate_next_token

pytestmark = pytest.mark.usefixtures("one_thread_module")

PROMPTS = ["a red circle", "a blue square", "a green circle"]


@pytest.fixture(scope="module")
def sd_adapter():
    return DiffusionAdapter(tiny_sd_pipeline(), num_inference_steps=3, guidance_scale=2.0)


def test_diffusion_through_the_adapter(sd_adapter):
    generate = adapter_generator(sd_adapter)
    lossy = random_dictionary(32, 64, 2, hookpoint="mid_block")
    result = evaluate_diffusion(generate, SpliceSite(sd_adapter, lossy), PROMPTS, [0, 1, 2])
    assert result.pixel_rmse["clean"] == 0.0
    assert result.pixel_rmse["spliced_with_error"] == 0.0  # bit for bit through the VAE
    assert result.pixel_rmse["spliced"] > 0.0
    perfect = identity_dictionary(32, hookpoint="mid_block")
    twin = evaluate_diffusion(generate, SpliceSite(sd_adapter, perfect), PROMPTS[:1], [0])
    assert twin.pixel_rmse["spliced"] == pytest.approx(0.0, abs=1e-3)


def test_text_encoder_splice_through_the_adapter(sd_adapter):
    hookpoint = "text_encoder.encoder.layers.0"
    assert hookpoint in dict(sd_adapter.root().named_modules())
    lossy = random_dictionary(32, 64, 2, hookpoint=hookpoint)
    result = evaluate_diffusion(
        adapter_generator(sd_adapter), SpliceSite(sd_adapter, lossy), PROMPTS[:2], [0, 1]
    )
    assert result.pixel_rmse["spliced_with_error"] == 0.0 and result.pixel_rmse["spliced"] > 0


def test_steering_preview_through_the_adapter(sd_adapter):
    sae = random_dictionary(32, 64, 2, hookpoint="mid_block")
    grid = steering_grid(
        adapter_generator(sd_adapter),
        sd_adapter,
        "mid_block",
        "output",
        sae.W_dec[3].detach(),
        latent=3,
        prompt="a red circle",
        scale=1.5,
        multipliers=(0, 1, 10),
        seeds=(0, 1),
    )
    assert grid.images.shape == (3, 2, 3, 16, 16)
    assert grid.strengths == [0.0, 1.5, 15.0]
    unsteered = adapter_generator(sd_adapter)(["a red circle"] * 2, [0, 1])
    assert torch.equal(grid.images[0], unsteered)  # strength 0 is the clean sample
    assert (
        (grid.images[2] - grid.images[0]).abs().mean()
        > (grid.images[1] - grid.images[0]).abs().mean()
        > 0
    )


def _llava_batches(processor, n=4):
    from adapters_support import images

    pictures = images(n, size=16)
    texts = ["<image> a red circle on the left", "<image> a small blue square"] * (n // 2)
    batch = processor(images=pictures, text=texts, return_tensors="pt", padding=True)
    return [dict(batch)]


@pytest.mark.parametrize(
    "hookpoint, d",
    [
        ("model.language_model.layers.0", 48),
        ("model.vision_tower.encoder.layers.0", 32),
    ],
)
def test_llava_next_token_through_splices(hookpoint, d):
    model, processor = tiny_llava()
    image_token = processor.tokenizer.convert_tokens_to_ids("<image>")
    batches = _llava_batches(processor)
    lossy = random_dictionary(d, 2 * d, 2, hookpoint=hookpoint)
    result = evaluate_next_token(
        model, SpliceSite(model, lossy), batches, ignore_token_ids=[image_token]
    )
    assert result.loss["spliced_with_error"] == result.loss["clean"]
    assert result.kl["spliced_with_error"] == 0.0 and result.kl["spliced"] > 0
    targets = batches[0]["input_ids"][:, 1:]
    mask = batches[0]["attention_mask"][:, 1:].bool() & (targets != image_token)
    assert result.tokens == int(mask.sum())
    perfect = identity_dictionary(d, hookpoint=hookpoint)
    same = evaluate_next_token(
        model, SpliceSite(model, perfect), batches, ignore_token_ids=[image_token]
    )
    assert same.loss_recovered == pytest.approx(1.0, abs=1e-3)


def test_next_token_on_prompts_of_a_causal_lm():
    from adapters_support import prompts, tiny_llama

    from saekit.evaluation.downstream import causal_lm_batches

    model, tokenizer = tiny_llama()
    texts = prompts(6)
    batches = list(causal_lm_batches(tokenizer, texts, batch_size=4))
    assert [len(b["input_ids"]) for b in batches] == [4, 2]
    hookpoint = "model.layers.1"
    d = model.config.hidden_size
    lossy = random_dictionary(d, 2 * d, 2, hookpoint=hookpoint)
    result = evaluate_next_token(model, SpliceSite(model, lossy), batches)
    lengths = [int(m.sum()) - 1 for b in batches for m in b["attention_mask"]]
    assert result.tokens == sum(lengths)  # padding is never a target
    assert result.loss["spliced_with_error"] == result.loss["clean"] and result.kl["spliced"] > 0
