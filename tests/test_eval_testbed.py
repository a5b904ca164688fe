"""The testbed's downstream tasks on models of the testbed's own configurations (random weights,
tiny): zero-shot per factor and caption retrieval on the CLIP, sample distance and oracle
accuracy on the pixel-space pipeline, caption loss on the LLaVA; the error-term condition equals
clean in each. The shipped weights' scores are checked by the testbed's own tests."""

from __future__ import annotations

import pytest
import torch
from steering_support import tiny_testbed_pipeline
from test_eval_support import (
    one_thread_module,  # noqa: F401 (a fixture)
    random_dictionary,
)

from saekit.evaluation import testbed_tasks
from saekit.testbed import models, world

pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def clip():
    from transformers import CLIPModel

    tokenizer = models.build_tokenizer(add_eos=True)
    torch.manual_seed(0)
    model = CLIPModel(models.clip_config(len(tokenizer), hidden=32, layers=2)).eval()
    return model, tokenizer


def test_contrastive_on_testbed(clip):
    model, tokenizer = clip
    sae = random_dictionary(32, 64, 4, hookpoint="vision_model.encoder.layers.1")
    result = testbed_tasks.contrastive_on_testbed(sae, model=model, tokenizer=tokenizer, n=24)
    assert result.images == 24
    clean, kept = result.conditions["clean"], result.conditions["spliced_with_error"]
    assert set(clean.zero_shot_accuracy) == set(world.FACTORS)
    assert kept.zero_shot_accuracy == clean.zero_shot_accuracy
    assert kept.recall_image_to_text == clean.recall_image_to_text
    assert result.conditions["spliced"].retrieval_kl > 0


def test_diffusion_on_testbed(clip):
    from saekit.testbed.oracle import Oracle

    model, tokenizer = clip
    pipe = tiny_testbed_pipeline(text_encoder=model.text_model, tokenizer=tokenizer)
    sae = random_dictionary(32, 64, 4, hookpoint="mid_block")
    result = testbed_tasks.diffusion_on_testbed(
        sae, pipe=pipe, oracle=Oracle(), n=4, num_inference_steps=2
    )
    assert result.pixel_rmse["spliced_with_error"] == 0.0 and result.pixel_rmse["spliced"] > 0
    assert set(result.oracle_accuracy) == {"clean", "spliced", "spliced_with_error"}
    assert result.oracle_accuracy["spliced_with_error"] == result.oracle_accuracy["clean"]
    # a dictionary in the text encoder, named as saekit's diffusion adapter names it
    text = random_dictionary(32, 64, 4, hookpoint="text_encoder.encoder.layers.0")
    text_result = testbed_tasks.diffusion_on_testbed(
        text, pipe=pipe, oracle=Oracle(), n=2, num_inference_steps=2
    )
    assert text_result.pixel_rmse["spliced"] > 0


def test_next_token_on_testbed(clip):
    from transformers import LlavaForConditionalGeneration

    model, _ = clip
    tokenizer = models.build_tokenizer(add_eos=False)
    config = models.llava_config(model.config, len(tokenizer), hidden=48, layers=2)
    torch.manual_seed(0)
    vlm = LlavaForConditionalGeneration(config).eval()
    sae = random_dictionary(48, 96, 4, hookpoint="model.language_model.layers.0")
    result = testbed_tasks.next_token_on_testbed(sae, model=vlm, processor=tokenizer, n=8)
    assert result.loss["spliced_with_error"] == result.loss["clean"]
    assert result.kl["spliced"] > 0 and result.loss["zero_ablated"] > 0
    # targets are the caption tokens and <eos>, not the prompt or the image tokens
    scenes = world.sample_scenes(8, testbed_tasks.HELD_OUT_SEED)
    words = sum(len(s.caption().split()) + 1 for s in scenes)
    assert result.tokens == words
