"""The shipped testbed models: load offline with their libraries' own loaders, meet their targets.

The default run checks a quick held-out sample of each target; ``-m slow`` checks the full one.
Targets (issue 6): CLIP zero-shot >= 95% per factor; the diffusion pipeline's samples read back by
the oracle with the prompted colour >= 90%, shape and position >= 80%; VLM captions >= 90% of
factors right.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import tomllib
import torch

from saekit.testbed import evaluate, models, world
from saekit.testbed.oracle import Oracle
from saekit.testbed.vlm import CAPTION_PROMPT, encode_example, question_prompt

REPO = Path(__file__).resolve().parents[1]
HELD_OUT_SEED = 7_777_777  # never used by a training script


@pytest.fixture(scope="module")
def clip():
    return models.load_clip()


@pytest.fixture(scope="module")
def pipe():
    return models.load_pipeline()


@pytest.fixture(scope="module")
def vlm():
    return models.load_vlm()


@pytest.fixture(scope="module")
def oracle():
    return Oracle()


def test_shipped_files_are_safe_small_and_packaged():
    files = [
        p for p in models.PRETRAINED.rglob("*") if p.is_file() and "__pycache__" not in p.parts
    ]
    suffixes = {p.suffix for p in files}
    assert suffixes <= {".json", ".safetensors", ".txt"}, "no pickles, no code"
    assert sum(p.stat().st_size for p in files) <= 40 * 2**20
    for directory in ("oracle", "clip", "pipeline", "vlm"):
        assert (models.PRETRAINED / directory / "training.json").exists(), directory
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["saekit.testbed"]
    package = REPO / "saekit" / "testbed"
    shipped = {path for pattern in patterns for path in package.glob(pattern)}
    assert set(files) <= shipped, f"not in package-data: {sorted(set(files) - shipped)}"


def test_missing_model_directory_says_how_to_get_one(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"train_testbed_clip\.py"):
        models.load_clip(tmp_path)


# ---------------------------------------------------------------------------------- CLIP


def test_clip_tokenizer_and_processor_load_with_auto_classes(clip):
    from transformers import AutoProcessor, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(models.CLIP_DIR, local_files_only=True)
    caption = "a large red circle at the top left on a gray background"
    ids = tokenizer(caption)["input_ids"]
    assert tokenizer.unk_token_id not in ids
    assert len(ids) == len(caption.split()) + 2  # one token per word, <bos> ... <eos>
    assert ids[-1] == clip[0].config.text_config.eos_token_id
    processor = AutoProcessor.from_pretrained(models.CLIP_DIR, local_files_only=True)
    images = world.render(world.sample_scenes(3, seed=1))
    inputs = processor(images=world.to_pil(images), return_tensors="pt")
    assert torch.allclose(inputs["pixel_values"], models.pixel_values(images), atol=1e-6)


def _clip_check(clip, n: int) -> dict[str, float]:
    model, tokenizer = clip
    scenes = world.sample_scenes(n, seed=HELD_OUT_SEED, objects=1)
    return evaluate.clip_zero_shot(model, tokenizer, scenes)


def test_clip_zero_shot_quick(clip):
    accuracy = _clip_check(clip, 300)
    assert min(accuracy.values()) >= 0.95, accuracy


@pytest.mark.slow
def test_clip_zero_shot_full(clip):
    accuracy = _clip_check(clip, 5000)
    assert min(accuracy.values()) >= 0.95, accuracy


# ---------------------------------------------------------------------------------- diffusion


def test_pipeline_is_a_stock_unet_with_a_clip_text_tower(pipe, clip):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    assert isinstance(pipe.unet, UNet2DConditionModel)
    assert isinstance(pipe.text_encoder, CLIPTextModel)
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    # the conditioning is the contrastive model's own text tower
    for name, weight in pipe.text_encoder.state_dict().items():
        assert torch.equal(weight, clip[0].text_model.state_dict()[name]), name
    # the UNet alone loads with diffusers' own loader
    unet = UNet2DConditionModel.from_pretrained(models.PIPELINE_DIR / "unet", local_files_only=True)
    assert unet.config.sample_size * pipe.patch_size == world.IMAGE_SIZE


def test_pipeline_is_seeded_and_returns_all_output_types(pipe):
    prompt = ["a small blue cross at the center on a white background"] * 2
    a = pipe(prompt, num_inference_steps=4, generator=torch.Generator().manual_seed(0)).images
    b = pipe(prompt, num_inference_steps=4, generator=torch.Generator().manual_seed(0)).images
    assert a.shape == (2, 3, world.IMAGE_SIZE, world.IMAGE_SIZE) and torch.equal(a, b)
    assert float(a.min()) >= 0 and float(a.max()) <= 1
    pil = pipe(prompt[:1], num_inference_steps=2, output_type="pil").images
    assert pil[0].size == (world.IMAGE_SIZE, world.IMAGE_SIZE)
    with pytest.raises(ValueError, match="output_type"):
        pipe(prompt, num_inference_steps=2, output_type="latent")


def _pipeline_check(pipe, oracle, n: int) -> dict[str, float]:
    scenes = world.sample_scenes(n, seed=HELD_OUT_SEED, objects=1)
    return evaluate.pipeline_accuracy(pipe, scenes, oracle, seed=11).score.accuracy


def _assert_pipeline_targets(accuracy: dict[str, float]) -> None:
    assert accuracy["color"] >= 0.9, accuracy
    assert accuracy["shape"] >= 0.8, accuracy
    assert accuracy["position"] >= 0.8, accuracy


def test_pipeline_targets_quick(pipe, oracle):
    _assert_pipeline_targets(_pipeline_check(pipe, oracle, 64))


@pytest.mark.slow
def test_pipeline_targets_full(pipe, oracle):
    _assert_pipeline_targets(_pipeline_check(pipe, oracle, 1000))


# ---------------------------------------------------------------------------------- VLM


def test_vlm_training_encoding_is_the_processors(vlm):
    _, processor = vlm
    images = world.to_pil(world.render(world.sample_scenes(1, seed=0)))
    for prompt, target in [
        (CAPTION_PROMPT, "a large red circle at the top left on a gray background"),
        (question_prompt("what color is the background ?"), "gray"),
    ]:
        ids, labels = encode_example(processor.tokenizer, prompt, target)
        expected = processor(images=images, text=[f"{prompt} {target}"], return_tensors="pt")
        assert ids[:-1] == expected["input_ids"][0].tolist()  # then <eos>
        n_target = len(target.split()) + 1
        assert all(label == -100 for label in labels[:-n_target])
        assert labels[-n_target:] == ids[-n_target:]


def _vlm_check(vlm, n: int) -> tuple[dict[str, float], dict[str, float]]:
    model, processor = vlm
    scenes = world.sample_scenes(n, seed=HELD_OUT_SEED)
    captions = evaluate.vlm_caption_accuracy(model, processor, scenes)
    answers = evaluate.vlm_qa_accuracy(model, processor, scenes, seed=1)
    return captions, answers


def test_vlm_captions_and_answers_quick(vlm):
    captions, answers = _vlm_check(vlm, 64)
    assert captions["overall"] >= 0.9, captions
    assert answers["overall"] >= 0.9, answers


@pytest.mark.slow
def test_vlm_captions_and_answers_full(vlm):
    captions, answers = _vlm_check(vlm, 1000)
    assert captions["overall"] >= 0.9, captions  # the target
    # answers are not a target of the issue; the shipped model's record reads 0.884 on 1000
    assert answers["overall"] >= 0.85, answers


def test_caption_scoring_counts_wrong_and_missing_factors():
    scene = world.Scene(
        "gray",
        (
            world.SceneObject("circle", "red", "large", "top left"),
            world.SceneObject("cross", "blue", "small", "bottom"),
        ),
    )
    assert evaluate.caption_factor_accuracy([scene.caption()], [scene])["overall"] == 1.0
    half = "a large red square at the top left on a gray background"  # one object, wrong shape
    accuracy = evaluate.caption_factor_accuracy([half], [scene])
    assert accuracy["shape"] == 0.0 and accuracy["color"] == 0.5 and accuracy["background"] == 1.0
    assert accuracy["overall"] == pytest.approx(4 / 9)
