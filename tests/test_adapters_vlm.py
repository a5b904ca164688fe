"""The VLM adapter on a tiny random ``LlavaForConditionalGeneration`` (CLIP vision tower, Llama
language model) with a real ``LlavaProcessor``: every listed hookpoint reaches the cache as
plain hooks see it, image vs text positions recorded; generation with no-op hooks unchanged;
hooks removed after errors; loading a folder and ``saekit cache`` from a YAML config."""

from __future__ import annotations

import json

import pytest
import torch
from adapters_support import (
    images,
    installed_hooks,
    one_thread,
    prompts,
    recording,
    tiny_llava,
    tiny_llava_next,
)
from test_cache_support import read_all

from saekit.adapters import ContextTracker, detect_adapter
from saekit.adapters.vlm import IMAGE, TEXT, VLMAdapter
from saekit.cache import CacheConfig, ImagePromptPairs, cache_activations, load_manifest
from saekit.cli import main

N = 5


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


def _cfg(tmp_path, hookpoints, name="cache", **overrides) -> CacheConfig:
    base = dict(
        hookpoints=hookpoints,
        output_dir=str(tmp_path / name),
        batch_size=2,
        rows_per_shard=128,
        shuffle_buffer_rows=256,
        dtype="float32",
        progress=False,
    )
    return CacheConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm-pairs")
    texts = prompts(N, seed=3)
    with open(root / "pairs.jsonl", "w") as handle:
        for i, image in enumerate(images(N, seed=3)):
            image.save(root / f"{i}.png")
            handle.write(json.dumps({"image": f"{i}.png", "prompt": texts[i]}) + "\n")
    return ImagePromptPairs(root / "pairs.jsonl")


def test_every_listed_hookpoint_with_image_and_text_positions(tmp_path, pairs):
    model, processor = tiny_llava()
    adapter = VLMAdapter(model, processor)
    listed = adapter.hookpoints()
    names = [h.name for h in listed]
    assert {
        "model.language_model.layers.0",
        "model.language_model.layers.1.self_attn",
        "model.language_model.layers.1.mlp",
        "model.vision_tower.encoder.layers.1",
        "model.multi_modal_projector",
    } <= set(names)
    assert {h.name: h.d for h in listed}["model.multi_modal_projector"] == 48
    result = cache_activations(adapter, pairs, _cfg(tmp_path, names))
    assert set(result.rows) == set(names)

    # The reference: the processor and model called the usual way (right padding, so each
    # prompt's positions start at 0), with plain forward hooks.
    samples = [pairs.load(i) for i in range(N)]
    inputs = processor(
        images=[s.image for s in samples],
        text=[f"<image> {s.prompt}" for s in samples],
        padding=True,
        return_tensors="pt",
    )
    with recording(model, names) as seen, torch.no_grad():
        model(**inputs)
    lengths = inputs["attention_mask"].sum(1).tolist()
    image_positions = (inputs["input_ids"] == model.config.image_token_id).nonzero()[:, 1]
    for name in names:
        rows, meta = read_all(tmp_path / "cache", name)
        reference = seen[name][0]
        if name.startswith("model.language_model"):
            expected = torch.cat([reference[i, :n] for i, n in enumerate(lengths)])
            image_rows = meta["stream"] == IMAGE
            assert int(image_rows.sum()) == N * 16  # one position per image feature
            assert set(meta["position"][image_rows].tolist()) == set(image_positions.tolist())
            assert set(meta["stream"][~image_rows].tolist()) == {TEXT}
        else:  # vision tower (N, 1 + 16, 32), projector (N, 16, 48): every row an image token
            expected = reference.reshape(-1, reference.shape[-1])
            assert set(meta["stream"].tolist()) == {IMAGE}
        torch.testing.assert_close(rows, expected, rtol=0, atol=0)
    assert load_manifest(tmp_path / "cache").streams == ["text", "image", "pad"]


def test_images_alone_get_the_default_prompt_and_prompts_alone_skip_the_vision_tower(
    tmp_path, pairs
):
    model, processor = tiny_llava()
    adapter = VLMAdapter(model, processor, default_prompt="describe :")
    layer = "model.language_model.layers.1"
    from saekit.cache import ImageFolder

    folder = pairs.path.parent
    result = cache_activations(adapter, ImageFolder(folder), _cfg(tmp_path, [layer], "images"))
    # "<image> describe :" -> <bos>, 16 image positions, "describe", ":"
    assert result.rows == {layer: N * (1 + 16 + 2)}

    calls = []
    handle = model.model.vision_tower.register_forward_hook(lambda m, a, out: calls.append(1))
    try:
        result = cache_activations(adapter, prompts(N), _cfg(tmp_path, [layer], "prompts"))
    finally:
        handle.remove()
    assert not calls
    _, meta = read_all(tmp_path / "prompts")
    assert set(meta["stream"].tolist()) == {TEXT}


def test_generation_with_noop_hooks_is_unchanged_and_announced(pairs):
    model, processor = tiny_llava()
    adapter = VLMAdapter(model, processor)
    samples = [pairs.load(i) for i in range(3)]
    pictures, texts = [s.image for s in samples], [s.prompt for s in samples]
    plain = adapter.generate(pictures, texts, max_new_tokens=4)
    before = installed_hooks(model)
    tracker = ContextTracker()
    seen = []
    handles = [
        model.get_submodule(h.name).register_forward_hook(lambda m, a, out: out)
        for h in adapter.hookpoints()
    ]
    handles.append(
        model.model.language_model.layers[0].register_forward_hook(
            lambda m, a, out: seen.append(tracker.context)
        )
    )
    try:
        hooked = adapter.generate(pictures, texts, max_new_tokens=4, scope=tracker)
    finally:
        for handle in handles:
            handle.remove()
    assert hooked == plain and len(plain) == 3
    assert seen and all(c is not None and c.sample_ids.tolist() == [0, 1, 2] for c in seen)
    assert installed_hooks(model) == before


def test_hooks_are_removed_after_an_error(tmp_path, pairs):
    model, processor = tiny_llava()
    adapter = VLMAdapter(model, processor)
    sample = pairs.load(0)
    adapter.generate([sample.image], [sample.prompt], max_new_tokens=1)  # transformers' own hooks
    before = installed_hooks(model)

    def fail(module, args, output):
        raise RuntimeError("projector failed")

    handle = model.model.multi_modal_projector.register_forward_hook(fail)
    with pytest.raises(RuntimeError, match="projector failed"):
        cache_activations(
            adapter,
            pairs,
            _cfg(
                tmp_path, ["model.vision_tower.encoder.layers.0", "model.language_model.layers.0"]
            ),
        )
    handle.remove()
    assert installed_hooks(model) == before


def test_a_model_folder_caches_from_a_yaml_config(tmp_path, pairs):
    model, processor = tiny_llava()
    folder = tmp_path / "tiny-llava"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    assert detect_adapter(str(folder)) == "vlm"
    layer = "model.language_model.layers.1"
    config = tmp_path / "cache.yaml"
    config.write_text(
        f"model: {folder}\nhookpoints: [{layer}]\n"
        f"data:\n  pairs: {pairs.path}\nrows:\n  streams: [image]\n"
        "model_options:\n  prompt_template: '{image} {prompt}'\n"
        f"output_dir: {tmp_path / 'cli'}\ndtype: float32\nbatch_size: 2\n"
        "rows_per_shard: 128\nshuffle_buffer_rows: 256\nprogress: false\n"
    )
    assert main(["cache", "--config", str(config)]) == 0
    assert load_manifest(tmp_path / "cli").adapter == "vlm"
    rows, meta = read_all(tmp_path / "cli")
    assert set(meta["stream"].tolist()) == {IMAGE} and len(rows) == N * 16

    cache_activations(
        VLMAdapter(model, processor), pairs, _cfg(tmp_path, [layer], "memory", rows=_images_only())
    )
    expected, _ = read_all(tmp_path / "memory")
    torch.testing.assert_close(rows, expected, rtol=0, atol=0)


def _images_only():
    from saekit.cache import RowFilter

    return RowFilter(streams=["image"])


def test_llava_next_crops_map_to_their_image(tmp_path):
    model, processor = tiny_llava_next()
    adapter = VLMAdapter(model, processor)
    pictures = [*images(2, size=16, seed=1), *images(1, size=32, seed=2)]  # 3, 3 and 5 crops
    from saekit.adapters import Sample
    from saekit.cache.inputs import InputSource

    class Pictures(InputSource):
        def __len__(self):
            return len(pictures)

        def load(self, index):
            return Sample(index, image=pictures[index], prompt="red cat")

        def fingerprint(self):
            return "three pictures"

    hooks = ["model.vision_tower.encoder.layers.0", "model.language_model.layers.1"]
    cache_activations(adapter, Pictures(), _cfg(tmp_path, hooks, batch_size=3))
    inputs = processor(
        images=pictures, text=["<image> red cat"] * 3, padding=True, return_tensors="pt"
    )
    with recording(model, hooks) as seen, torch.no_grad():
        model(**inputs)
    crops = seen[hooks[0]][0]  # (3 + 3 + 5 crops, 1 + 16 tokens, d)
    assert crops.shape[:2] == (11, 17)
    rows, meta = read_all(tmp_path / "cache", hooks[0])
    torch.testing.assert_close(rows, crops.reshape(-1, 32), rtol=0, atol=0)
    assert [int((meta["sample"] == i).sum()) for i in range(3)] == [3 * 17, 3 * 17, 5 * 17]
    assert int(meta["position"][meta["sample"] == 2].max()) == 5 * 17 - 1  # numbered across crops
    rows, meta = read_all(tmp_path / "cache", hooks[1])
    lengths = inputs["attention_mask"].sum(1).tolist()
    expected = torch.cat([seen[hooks[1]][0][i, :n] for i, n in enumerate(lengths)])
    torch.testing.assert_close(rows, expected, rtol=0, atol=0)
    image_rows = meta["stream"] == IMAGE
    assert int(image_rows.sum()) == int((inputs["input_ids"] == model.config.image_token_id).sum())
