"""Downstream effect of splicing, on real tiny CLIP, Llama and UNet models: the error-term
condition equals clean, a perfect dictionary costs nothing, a lossy one costs something, and the
scores (recall, KL, loss recovered) are computed as their definitions say."""

from __future__ import annotations

import math

import pytest
import torch
from test_eval_support import (
    TinyTextToImage,
    identity_dictionary,
    one_thread_module,  # noqa: F401 (a fixture)
    random_dictionary,
    tiny_clip,
    tiny_llama,
    word_tokenizer,
)

from saekit.adapters.clip import CLIPAdapter
from saekit.evaluation import (
    SpliceSite,
    ZeroShotTask,
    evaluate_contrastive,
    evaluate_diffusion,
    evaluate_next_token,
)
from saekit.evaluation.downstream import _kl, _recall

WORDS = ["red", "green", "blue", "circle", "square", "a", "big", "small"]


pytestmark = pytest.mark.usefixtures("one_thread_module")


def test_recall_and_kl_by_hand():
    similarity = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.5, 0.2], [0.5, 0.7, 0.3]])
    # row 0: right answer first; row 1: second; row 2: third
    assert _recall(similarity, (1, 2)) == pytest.approx({"recall@1": 1 / 3, "recall@2": 2 / 3})
    p = torch.tensor([[0.0, 0.0]])  # uniform
    q = torch.tensor([[math.log(3.0), 0.0]])  # (3/4, 1/4)
    expected = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert _kl(p, q) == pytest.approx(expected)
    assert _kl(p, p) == 0.0


def _clip_setup():
    tokenizer = word_tokenizer(WORDS)
    model = tiny_clip(len(tokenizer))
    g = torch.Generator().manual_seed(0)
    images = torch.randn(12, 3, 16, 16, generator=g)
    captions = [f"a {WORDS[i % 3]} {WORDS[3 + i % 2]}" for i in range(12)]
    tasks = {
        "color": ZeroShotTask(["red", "green", "blue"], torch.arange(12) % 3),
        "shape": ZeroShotTask(["circle", "square"], torch.arange(12) % 2),
    }
    return model, tokenizer, images, captions, tasks


def test_contrastive_conditions():
    model, tokenizer, images, captions, tasks = _clip_setup()
    clip = CLIPAdapter(model, tokenizer=tokenizer)
    lossy = random_dictionary(32, 64, 2, hookpoint="vision_model.encoder.layers.1")
    result = evaluate_contrastive(
        clip, SpliceSite(model, lossy), images, zero_shot=tasks, captions=captions
    )
    clean, kept, spliced = (
        result.conditions[c] for c in ("clean", "spliced_with_error", "spliced")
    )
    assert result.logit_scale == pytest.approx(float(model.logit_scale.detach().exp()))
    assert kept.zero_shot_accuracy == clean.zero_shot_accuracy
    assert kept.recall_image_to_text == clean.recall_image_to_text
    assert kept.zero_shot_kl == {"color": 0.0, "shape": 0.0} and kept.retrieval_kl == 0.0
    assert spliced.retrieval_kl > 0 and spliced.zero_shot_kl["color"] > 0
    # the drops are clean minus spliced
    for name in tasks:
        assert result.zero_shot_accuracy_drop[name] == pytest.approx(
            clean.zero_shot_accuracy[name] - spliced.zero_shot_accuracy[name]
        )
    assert set(result.recall_drop) == {
        "image_to_text.recall@1",
        "image_to_text.recall@5",
        "text_to_image.recall@1",
        "text_to_image.recall@5",
    }

    # accuracy recomputed without saekit: argmax of cosine similarities
    with torch.no_grad():
        img = torch.nn.functional.normalize(
            model.get_image_features(pixel_values=images).pooler_output, dim=-1
        )
        batch = tokenizer(["red", "green", "blue"], padding=True, return_tensors="pt")
        txt = torch.nn.functional.normalize(model.get_text_features(**batch).pooler_output, dim=-1)
    expected = float(((img @ txt.T).argmax(1) == tasks["color"].labels).float().mean())
    assert clean.zero_shot_accuracy["color"] == pytest.approx(expected)


def test_perfect_dictionary_costs_clip_nothing_in_the_text_tower():
    model, tokenizer, images, captions, tasks = _clip_setup()
    perfect = identity_dictionary(32, hookpoint="text_model.encoder.layers.0")
    result = evaluate_contrastive(
        CLIPAdapter(model, tokenizer=tokenizer),
        SpliceSite(model, perfect),
        images,
        zero_shot=tasks,
        captions=captions,
    )
    assert result.zero_shot_accuracy_drop == {"color": 0.0, "shape": 0.0}
    assert all(v == 0.0 for v in result.recall_drop.values())
    assert result.conditions["spliced"].retrieval_kl == pytest.approx(0.0, abs=1e-6)


def test_next_token_loss_recovered():
    model = tiny_llama()
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(3, 40, (4, 12), generator=g)} for _ in range(2)]
    lossy = random_dictionary(32, 64, 2, hookpoint="model.layers.0", capture="update")
    result = evaluate_next_token(model, SpliceSite(model, lossy), batches)
    loss = result.loss
    assert result.tokens == 2 * 4 * 11
    assert loss["spliced_with_error"] == loss["clean"] and result.kl["spliced_with_error"] == 0.0
    assert result.kl["clean"] == 0.0 and result.kl["spliced"] > 0
    assert result.loss_recovered == pytest.approx(
        (loss["zero_ablated"] - loss["spliced"]) / (loss["zero_ablated"] - loss["clean"])
    )
    # the clean loss is the model's own cross-entropy
    with torch.no_grad():
        own = [model(**b, labels=b["input_ids"]).loss for b in batches]
    assert loss["clean"] == pytest.approx(float(torch.stack(own).mean()), rel=1e-5)

    # the reconstruction of the activations these inputs produced, every position of both batches
    assert result.in_model.rows == 2 * 4 * 12 and result.in_model.fvu > 0.05
    perfect = identity_dictionary(32, hookpoint="model.layers.0", capture="update")
    exact = evaluate_next_token(model, SpliceSite(model, perfect), batches)
    assert exact.loss_recovered == pytest.approx(1.0, abs=1e-4)
    assert exact.in_model.fvu == pytest.approx(0.0, abs=1e-10)


def test_next_token_labels_and_ignored_tokens():
    model = tiny_llama()
    ids = torch.randint(3, 40, (2, 8), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :4] = -100  # a prompt: only the last tokens are targets
    site = SpliceSite(model, identity_dictionary(32, hookpoint="model.layers.0"))
    result = evaluate_next_token(model, site, [{"input_ids": ids, "labels": labels}])
    assert result.tokens == 2 * 4
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    ignored = evaluate_next_token(
        model,
        site,
        [{"input_ids": ids, "attention_mask": mask}],
        ignore_token_ids=[int(ids[0, 3])],
        conditions=("clean",),
    )
    expected = int(mask[:, 1:].sum()) - int((ids[:, 1:][mask[:, 1:].bool()] == ids[0, 3]).sum())
    assert ignored.tokens == expected and math.isnan(ignored.loss_recovered)


def test_diffusion_sample_distance():
    generate = TinyTextToImage(WORDS)
    prompts = ["a red circle", "a blue square", "a green circle"]
    seeds = [0, 1, 2]
    lossy = random_dictionary(32, 64, 2, hookpoint="mid_block")

    class Oracle:  # counts bright images: enough to see the accuracy table filled per condition
        def accuracy(self, images, scenes):
            return {"bright": float((images.mean((1, 2, 3)) > 0.5).float().mean())}

    result = evaluate_diffusion(
        generate,
        SpliceSite(generate.unet, lossy),
        prompts,
        seeds,
        batch_size=2,
        scenes=prompts,
        oracle=Oracle(),
    )
    assert result.images == 3
    assert result.pixel_rmse["clean"] == 0.0 and result.pixel_rmse["spliced_with_error"] == 0.0
    assert result.pixel_rmse["spliced"] > 0.0
    assert set(result.oracle_accuracy) == {"clean", "spliced", "spliced_with_error"}
    assert result.in_model.rows == 3 * 4 * 4 * 4  # images x steps x the 4 x 4 mid-block map
    # same seed, same sample: the comparison is between twins
    torch.testing.assert_close(generate(prompts[:1], [0]), generate(prompts[:1], [0]))

    perfect = identity_dictionary(32, hookpoint="mid_block")
    twin = evaluate_diffusion(generate, SpliceSite(generate.unet, perfect), prompts, seeds)
    assert twin.pixel_rmse["spliced"] == pytest.approx(0.0, abs=1e-4)


def test_a_splice_that_never_fires_is_an_error():
    model = tiny_llama()
    site = SpliceSite(model, random_dictionary(32, 64, 2, hookpoint="model.layers.0"))
    batches = [{"input_ids": torch.randint(3, 40, (1, 4))}]

    def other_model(**inputs):
        return tiny_llama(seed=1)(**inputs)

    with pytest.raises(RuntimeError, match=r"never ran through 'model\.layers\.0'"):
        evaluate_next_token(other_model, site, batches)
