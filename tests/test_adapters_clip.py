"""Contrastive adapters (transformers CLIP and SigLIP, open_clip) on tiny random models of the
real classes: every listed hookpoint reaches the cache with its documented shape and streams,
the cached rows equal what plain forward hooks see, CLS/patch selection, loading by path and
through ``saekit cache``, hooks removed after errors, zero-shot and retrieval helpers."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from adapters_support import (
    EOS_ID,
    OPEN_CLIP_CONFIG,
    clip_tokenizer,
    images,
    installed_hooks,
    one_thread,
    prompts,
    recording,
    register_open_clip_config,
    tiny_clip,
    tiny_siglip,
)
from safetensors.torch import save_file
from test_cache_support import read_all

from saekit.adapters import adapter_for, detect_adapter, load_adapter
from saekit.adapters.clip import CLS, EOT, PATCH, POOLED, TEXT, CLIPAdapter, ContrastiveAdapter
from saekit.adapters.zero_shot import (
    retrieval,
    similarity_logits,
    zero_shot_classifier,
    zero_shot_classify,
)
from saekit.cache import CacheConfig, ImagePromptPairs, RowFilter, cache_activations, load_manifest
from saekit.cli import main

N = 6


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


def _cfg(tmp_path, name="cache", **overrides) -> CacheConfig:
    base = dict(
        output_dir=str(tmp_path / name),
        batch_size=4,
        rows_per_shard=64,
        shuffle_buffer_rows=128,
        dtype="float32",
        progress=False,
    )
    return CacheConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def pair_files(tmp_path_factory):
    """N image files and a JSONL of image+prompt pairs."""
    root = tmp_path_factory.mktemp("pairs")
    texts = prompts(N)
    with open(root / "pairs.jsonl", "w") as handle:
        for i, image in enumerate(images(N)):
            image.save(root / f"{i}.png")
            handle.write(json.dumps({"image": f"{i}.png", "prompt": texts[i]}) + "\n")
    return root


def _image_processor():
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(
        size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}, do_center_crop=True
    )


def _per_sample(tensor: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """Rows of ``(B, T, d)`` in (sample, position) order, the first ``lengths[i]`` of sample i."""
    return torch.cat([tensor[i, :n] for i, n in enumerate(lengths)])


def test_clip_every_listed_hookpoint_is_cached_as_the_hooks_see_it(tmp_path, pair_files):
    model, tokenizer, processor = tiny_clip(), clip_tokenizer(), _image_processor()
    adapter = CLIPAdapter(model, tokenizer=tokenizer, image_processor=processor)
    listed = adapter.hookpoints()
    names = [h.name for h in listed]
    # Both towers' residual stream, attention and MLP per block, and the final embeddings.
    for tower in ("vision_model", "text_model"):
        for i in range(2):
            for suffix in ("", ".self_attn", ".mlp"):
                assert f"{tower}.encoder.layers.{i}{suffix}" in names
    assert {"visual_projection", "text_projection"} <= set(names)
    assert {h.name: h.d for h in listed}["visual_projection"] == 24

    pairs = ImagePromptPairs(pair_files / "pairs.jsonl")
    result = cache_activations(adapter, pairs, _cfg(tmp_path, hookpoints=names))
    assert set(result.rows) == set(names)

    # The reference: the model called the usual transformers way, with plain forward hooks.
    samples = [pairs.load(i) for i in range(N)]
    text = tokenizer(
        [s.prompt for s in samples],
        padding=True,
        truncation=True,
        max_length=16,
        return_tensors="pt",
    )
    pixels = processor(images=[s.image for s in samples], return_tensors="pt")["pixel_values"]
    with recording(model, names) as seen, torch.no_grad():
        model(**text, pixel_values=pixels)
    lengths = text["attention_mask"].sum(1).tolist()  # up to and including <|endoftext|>
    manifest = load_manifest(tmp_path / "cache")
    for name in names:
        rows, meta = read_all(tmp_path / "cache", name)
        reference = seen[name][0]
        if name.endswith("projection"):  # (B, D): one row per input
            assert reference.shape == (N, 24)
            expected, streams = reference, {POOLED}
        elif name.startswith("vision_model"):  # (B, 1 + 16 patches, d)
            assert reference.shape == (N, 17, 32)
            expected = reference.reshape(-1, 32)
            assert meta["stream"][meta["position"] == 0].unique().tolist() == [CLS]
            assert meta["stream"][meta["position"] > 0].unique().tolist() == [PATCH]
            streams = {CLS, PATCH}
        else:  # text tokens, padding dropped
            expected = _per_sample(reference, lengths)
            eot = meta["stream"] == EOT
            assert int(eot.sum()) == N  # one pooled end-of-text token per prompt
            ends = torch.tensor(lengths) - 1
            assert meta["position"][eot].tolist() == ends.tolist()
            streams = {TEXT, EOT}
        # batches of a different size may take another matmul blocking: float32 rounding only
        torch.testing.assert_close(rows, expected, rtol=1e-5, atol=1e-6)
        assert set(meta["stream"].tolist()) == streams
        assert manifest.hookpoints[name].description == adapter.describe(name)
    assert manifest.streams == ["cls", "patch", "text", "eot", "pad", "pooled"]


def test_clip_cls_or_patch_tokens_are_selected_by_stream(tmp_path, pair_files):
    model = tiny_clip()
    adapter = CLIPAdapter(model, tokenizer=clip_tokenizer(), image_processor=_image_processor())
    layer = "vision_model.encoder.layers.1"
    source = ImagePromptPairs(pair_files / "pairs.jsonl")
    cls = cache_activations(
        adapter, source, _cfg(tmp_path, "cls", hookpoints=[layer], rows=RowFilter(streams=["cls"]))
    )
    patch = cache_activations(
        adapter,
        source,
        _cfg(tmp_path, "patch", hookpoints=[layer], rows=RowFilter(streams=["patch"])),
    )
    assert cls.rows == {layer: N} and patch.rows == {layer: N * 16}
    full, _ = read_all(tmp_path / "cls")
    _, meta = read_all(tmp_path / "patch")
    assert set(meta["position"].tolist()) == set(range(1, 17))
    pixels = _image_processor()(
        images=[source.load(i).image for i in range(N)], return_tensors="pt"
    )
    with recording(model, [layer]) as seen, torch.no_grad():
        model.get_image_features(pixel_values=pixels["pixel_values"])
    torch.testing.assert_close(full, seen[layer][0][:, 0], rtol=1e-5, atol=1e-6)


def test_siglip_has_no_cls_and_pools_the_last_token(tmp_path):
    model, tokenizer = tiny_siglip(), clip_tokenizer()
    adapter = CLIPAdapter(model, tokenizer=tokenizer)
    assert adapter.objective == "sigmoid" and not adapter.has_cls
    names = [h.name for h in adapter.hookpoints()]
    assert {"vision_model.head", "text_model.head", "text_model.encoder.layers.1"} <= set(names)
    texts = prompts(N)
    result = cache_activations(
        adapter,
        texts,
        _cfg(tmp_path, hookpoints=["text_model.encoder.layers.1", "text_model.head"]),
    )
    # SigLIP is fed text padded to its full length and pools the last position: each prompt
    # keeps its tokens and that last position; the padding between them is dropped.
    encoded = tokenizer(texts, padding="max_length", max_length=16, truncation=True)["input_ids"]
    kept = [sum(1 for t in ids[:-1] if t != EOS_ID) + 1 for ids in encoded]
    assert result.rows["text_model.encoder.layers.1"] == sum(kept)
    _, meta = read_all(tmp_path / "cache", "text_model.encoder.layers.1")
    assert meta["position"][meta["stream"] == EOT].unique().tolist() == [15]
    pooled, _ = read_all(tmp_path / "cache", "text_model.head")
    with torch.no_grad():
        reference = model.get_text_features(
            input_ids=torch.tensor(encoded)
        ).pooler_output  # what SiglipModel compares
    torch.testing.assert_close(pooled, reference, rtol=1e-5, atol=1e-6)

    # Images alone run the image tower only: every position is a patch.
    result = cache_activations(
        adapter,
        _image_source(tmp_path),
        _cfg(tmp_path, "img", hookpoints=["vision_model.encoder.layers.0"]),
    )
    _, meta = read_all(tmp_path / "img")
    assert result.rows == {"vision_model.encoder.layers.0": N * 16}
    assert set(meta["stream"].tolist()) == {PATCH}


def _image_source(tmp_path):
    from saekit.cache import ImageFolder

    folder = tmp_path / "images"
    folder.mkdir(exist_ok=True)
    for i, image in enumerate(images(N)):
        image.save(folder / f"{i}.png")
    return ImageFolder(folder)


def test_open_clip_residual_stream_and_embeddings(tmp_path, pair_files):
    import open_clip

    name = register_open_clip_config(str(tmp_path))
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(name)
    model.eval()
    tokenizer = open_clip.get_tokenizer(name)
    adapter = adapter_for(model, preprocess=preprocess, tokenizer=tokenizer)
    assert adapter.family == "clip" and adapter.has_cls
    listed = [h.name for h in adapter.hookpoints()]
    assert {"visual.transformer.resblocks.1", "transformer.resblocks.1.mlp", "visual"} <= set(
        listed
    )
    hooks = ["visual.transformer.resblocks.1", "transformer.resblocks.0", "visual", "ln_final"]
    pairs = ImagePromptPairs(pair_files / "pairs.jsonl")
    cache_activations(adapter, pairs, _cfg(tmp_path, hookpoints=hooks))

    samples = [pairs.load(i) for i in range(N)]
    ids = tokenizer([s.prompt for s in samples])  # (N, 16), 0-padded after <end_of_text>
    pixels = torch.stack([preprocess(s.image) for s in samples])
    with recording(model, hooks) as seen, torch.no_grad():
        image_features, text_features, _ = model(pixels, ids)
    lengths = (ids.argmax(-1) + 1).tolist()  # up to the end-of-text token (the highest id)
    for hook in hooks:
        rows, meta = read_all(tmp_path / "cache", hook)
        reference = seen[hook][0]
        if hook == "visual":
            expected = reference
            # open_clip's forward returns the normalised embeddings
            torch.testing.assert_close(F.normalize(reference, dim=-1), image_features)
        elif hook.startswith("visual."):
            expected = reference.reshape(-1, reference.shape[-1])
            assert meta["stream"][meta["position"] == 0].unique().tolist() == [CLS]
        else:
            expected = _per_sample(reference, lengths)
            assert int((meta["stream"] == EOT).sum()) == N
        torch.testing.assert_close(rows, expected, rtol=1e-5, atol=1e-6)

    # The weights saved as a checkpoint load by 'open_clip:<name>@<path>' (weights_only).
    checkpoint = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), checkpoint)
    loaded = load_adapter(f"open_clip:{name}@{checkpoint}")
    assert type(loaded).__name__ == "OpenCLIPAdapter"
    texts = [s.prompt for s in samples]
    torch.testing.assert_close(F.normalize(loaded.encode_texts(texts), dim=-1), text_features)

    # A folder in open_clip's own layout (open_clip_config.json + weights) is recognised.
    folder = tmp_path / "open-clip-folder"
    folder.mkdir()
    config = {"model_cfg": OPEN_CLIP_CONFIG, "preprocess_cfg": {}}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    save_file(model.state_dict(), folder / "open_clip_model.safetensors")
    from_folder = load_adapter(str(folder))
    assert from_folder.model_name == f"open_clip:local-dir:{folder}"
    torch.testing.assert_close(from_folder.encode_texts(texts), loaded.encode_texts(texts))


def test_clip_loads_by_path_and_caches_from_a_yaml_config(tmp_path, pair_files, monkeypatch):
    model, tokenizer, processor = tiny_clip(), clip_tokenizer(), _image_processor()
    folder = tmp_path / "tiny-clip"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    processor.save_pretrained(folder)
    assert detect_adapter(str(folder)) == "clip"

    layer = "vision_model.encoder.layers.1"
    config = tmp_path / "cache.yaml"
    config.write_text(
        f"model: {folder}\nhookpoints: [{layer}, text_projection]\n"
        f"data:\n  pairs: {pair_files / 'pairs.jsonl'}\n"
        f"output_dir: {tmp_path / 'cli'}\ndtype: float32\nbatch_size: 4\n"
        "rows_per_shard: 64\nshuffle_buffer_rows: 128\nprogress: false\n"
    )
    assert main(["cache", "--config", str(config)]) == 0
    manifest = load_manifest(tmp_path / "cli")
    assert manifest.adapter == "clip" and manifest.model == str(folder)

    in_memory = CLIPAdapter(model, tokenizer=tokenizer, image_processor=processor)
    cache_activations(
        in_memory,
        ImagePromptPairs(pair_files / "pairs.jsonl"),
        _cfg(tmp_path, "memory", hookpoints=[layer, "text_projection"]),
    )
    for name in (layer, "text_projection"):
        a, meta_a = read_all(tmp_path / "cli", name)
        b, meta_b = read_all(tmp_path / "memory", name)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert torch.equal(meta_a["stream"], meta_b["stream"])


def test_hooks_are_removed_after_an_error(tmp_path):
    model = tiny_clip()
    adapter = CLIPAdapter(model, tokenizer=clip_tokenizer())

    def explode(module, args, output):
        raise RuntimeError("boom in layer 1")

    before = installed_hooks(model)
    handle = model.vision_model.encoder.layers[1].register_forward_hook(explode)
    with pytest.raises(RuntimeError, match="boom in layer 1"):
        cache_activations(
            adapter,
            _image_source(tmp_path),
            _cfg(tmp_path, hookpoints=["vision_model.encoder.layers.0", "visual_projection"]),
        )
    handle.remove()
    assert installed_hooks(model) == before  # saekit's hooks are gone


# ----------------------------------------------------------------------------- zero-shot


def test_zero_shot_logits_are_the_models_own_temperature_scaled_logits():
    model, tokenizer, processor = tiny_clip(), clip_tokenizer(), _image_processor()
    adapter = CLIPAdapter(model, tokenizer=tokenizer, image_processor=processor)
    with torch.no_grad():
        model.logit_scale.fill_(2.0)
    pictures, classes = images(5), ["red cat", "blue dog", "green square"]
    classifier = zero_shot_classifier(adapter, classes, templates=("{}",))
    result = zero_shot_classify(adapter, pictures, [0, 1, 2, 0, 1], classifier)
    # CLIPModel's forward computes logits_per_image = exp(logit_scale) * cos(image, text).
    with torch.no_grad():
        out = model(
            **tokenizer(classes, padding=True, truncation=True, max_length=16, return_tensors="pt"),
            pixel_values=processor(images=pictures, return_tensors="pt")["pixel_values"],
        )
    torch.testing.assert_close(result.logits, out.logits_per_image, rtol=1e-5, atol=1e-5)
    assert result.predictions.tolist() == out.logits_per_image.argmax(-1).tolist()
    expected = (out.logits_per_image.argmax(-1) == torch.tensor([0, 1, 2, 0, 1])).float().mean()
    assert result.accuracy == pytest.approx(float(expected))
    assert result.top5_accuracy == 1.0  # three classes: top-3 always holds the label

    # A hook on the image tower (what splicing a dictionary does) changes the logits.
    handle = model.vision_model.encoder.layers[1].register_forward_hook(lambda m, a, out: out * 0.0)
    try:
        spliced = zero_shot_classify(adapter, pictures, [0, 1, 2, 0, 1], classifier)
    finally:
        handle.remove()
    assert not torch.allclose(spliced.logits, result.logits)


def test_siglip_logits_include_the_learned_bias():
    model, tokenizer = tiny_siglip(), clip_tokenizer()
    with torch.no_grad():
        model.logit_scale.fill_(1.5)
        model.logit_bias.fill_(-3.0)
    adapter = CLIPAdapter(model, tokenizer=tokenizer)
    pictures, texts = images(3), ["red", "blue dog", "a cat"]
    logits = similarity_logits(
        adapter, adapter.encode_images(pictures), adapter.encode_texts(texts)
    )
    with torch.no_grad():
        out = model(
            # SigLIP's tokenizer gives no attention mask: the model reads the padding too
            input_ids=tokenizer(texts, padding="max_length", max_length=16, return_tensors="pt")[
                "input_ids"
            ],
            pixel_values=adapter.image_inputs(pictures),
        )
    torch.testing.assert_close(logits, out.logits_per_image, rtol=1e-5, atol=1e-5)


class _FixedEmbeddings(ContrastiveAdapter):
    """Embeddings chosen by the test, to check the retrieval arithmetic on a known answer."""

    def __init__(self, image_embeddings, text_embeddings):
        super().__init__(torch.nn.Linear(1, 1))
        self.image_embeddings, self.text_embeddings = image_embeddings, text_embeddings

    def encode_images(self, images, *, batch_size=64):
        return self.image_embeddings[torch.as_tensor(images)]

    def encode_texts(self, texts, *, batch_size=256):
        return self.text_embeddings[[int(t) for t in texts]]

    def logit_scale(self):
        return 10.0

    tower = image_inputs = text_inputs = token_streams = _call = None  # type: ignore[assignment]
    _image_embeddings = _text_embeddings = has_cls = tower_prefixes = None  # type: ignore[assignment]


def test_retrieval_recall_on_a_known_answer():
    # Three images along the axes; four captions: 0 and 1 describe image 0 (one of them only
    # second-nearest), 2 describes image 1, 3 describes image 2 but sits nearest image 1.
    image_embeddings = torch.eye(3)
    text_embeddings = torch.tensor(
        [[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [0.0, 1.0, 0.0], [0.0, 0.9, 0.1]]
    )
    adapter = _FixedEmbeddings(image_embeddings, text_embeddings)
    result = retrieval(adapter, [0, 1, 2], ["0", "1", "2", "3"], text_image=[0, 0, 1, 2], ks=(1, 2))
    # image->text top-1: image 0 -> caption 0 (hit), image 1 -> caption 2 (hit), image 2 ->
    # caption 3 (hit). text->image top-1: 0->0 hit, 1->1 miss, 2->1 hit, 3->1 miss.
    assert result.image_to_text[1] == pytest.approx(1.0)
    assert result.text_to_image[1] == pytest.approx(0.5)
    assert result.text_to_image[2] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="text_image"):
        retrieval(adapter, [0, 1, 2], ["0", "1"], text_image=[0, 5])


def test_one_tower_models(tmp_path):
    from adapters_support import tiny_clip_config
    from transformers import CLIPTextModelWithProjection, CLIPVisionModel

    config, tokenizer = tiny_clip_config(), clip_tokenizer()
    vision = adapter_for(CLIPVisionModel(config.vision_config).eval())
    assert vision.tower_prefixes() == {"image": ""}
    assert "encoder.layers.1" in {h.name for h in vision.hookpoints()}
    cache_activations(
        vision, _image_source(tmp_path), _cfg(tmp_path, "vision", hookpoints=["encoder.layers.1"])
    )
    rows, meta = read_all(tmp_path / "vision")
    pixels = vision.image_inputs(images(N))
    with recording(vision.model, ["encoder.layers.1"]) as seen, torch.no_grad():
        vision.model(pixel_values=pixels)
    torch.testing.assert_close(
        rows, seen["encoder.layers.1"][0].reshape(-1, 32), rtol=1e-5, atol=1e-6
    )
    assert set(meta["stream"][meta["position"] == 0].tolist()) == {CLS}

    text = adapter_for(CLIPTextModelWithProjection(config.text_config).eval(), tokenizer=tokenizer)
    texts = prompts(N)
    cache_activations(text, texts, _cfg(tmp_path, "text", hookpoints=["text_projection"]))
    rows, meta = read_all(tmp_path / "text")
    with torch.no_grad():
        embeds = text.model(
            **tokenizer(texts, padding=True, truncation=True, max_length=16, return_tensors="pt")
        ).text_embeds
    torch.testing.assert_close(rows, embeds, rtol=1e-5, atol=1e-6)
    assert set(meta["stream"].tolist()) == {POOLED}
    with pytest.raises(ValueError, match="no text tower"):
        cache_activations(vision, texts, _cfg(tmp_path, "bad", hookpoints=["encoder.layers.1"]))
