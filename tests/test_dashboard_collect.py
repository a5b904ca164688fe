"""The dashboard's one pass over a cache agrees with brute force: per-latent statistics, top
inputs, uniformly sampled inputs, their heatmaps and per-input activations, across several
shuffle groups; layouts, nearest words and the steering hook."""

from __future__ import annotations

import itertools

import pytest
import torch
from test_eval_support import (
    one_hot_tokens,
    one_thread_module,  # noqa: F401 (a fixture)
    random_dictionary,
    tiny_clip,
    tiny_unet,
    word_tokenizer,
)

from saekit.adapters import CustomAdapter
from saekit.adapters.clip import CLIPAdapter
from saekit.cache import CacheConfig, cache_activations
from saekit.dashboard import add_direction, clip_direction_map, collect, infer_layout, nearest_words
from saekit.dashboard.collect import CollectConfig, Examples, keep_best, quantile_examples
from saekit.dashboard.vocabulary import latent_words

N, SEQ, VOCAB = 150, 6, 8


pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def grouped_cache(tmp_path_factory):
    """One-hot token rows in several shuffle groups (rows of an input never straddle two)."""
    tmp = tmp_path_factory.mktemp("grouped")
    ids = torch.randint(0, VOCAB, (N, SEQ), generator=torch.Generator().manual_seed(5))
    cfg = CacheConfig(
        hookpoints=["embed"],
        output_dir=str(tmp / "cache"),
        batch_size=10,
        rows_per_shard=100,
        shuffle_buffer_rows=200,  # about 4 groups of 240 rows
        dtype="float32",
        progress=False,
    )
    cache_activations(CustomAdapter(one_hot_tokens(VOCAB), name="onehot"), ids, cfg)
    return tmp / "cache", ids


def _dense(ids, sae):
    x = torch.eye(VOCAB)[ids]  # (N, T, V)
    return sae.encode_dense(x.reshape(-1, VOCAB)).reshape(N, SEQ, -1)  # (N, T, m)


def test_collect_matches_brute_force(grouped_cache):
    cache, ids = grouped_cache
    sae = random_dictionary(VOCAB, 16, 3, hookpoint="embed")
    result = collect(
        sae,
        cache,
        config=CollectConfig(top_k=3, reservoir=4, histogram_values=50, batch_size=33),
        n_samples=N,
    )
    z = _dense(ids, sae)  # (N, T, m)
    per_input = z.amax(1)  # (N, m)
    assert result.rows == N * SEQ and result.samples == N and result.positions == SEQ
    assert torch.equal(result.fires, (z > 0).sum((0, 1)))
    assert torch.equal(result.input_fires, (per_input > 0).sum(0))
    torch.testing.assert_close(result.max_activation, z.amax((0, 1)))
    torch.testing.assert_close(result.sample_activations, per_input)
    for latent in range(16):
        samples, values = result.top.of(latent)
        expected = per_input[:, latent].sort(descending=True).values[: len(values)]
        torch.testing.assert_close(values.sort(descending=True).values, expected)
        drawn, drawn_values = result.sampled.of(latent)
        assert len(drawn) == min(4, int((per_input[:, latent] > 0).sum()))
        assert len(set(drawn.tolist())) == len(drawn)
        torch.testing.assert_close(drawn_values, per_input[drawn, latent])
        for sample in torch.cat([samples, drawn]).tolist():  # every shown input has its heatmap
            positions, heat = result.heatmaps.of(latent, sample)
            dense = torch.zeros(SEQ)
            dense[positions] = heat
            torch.testing.assert_close(dense, z[sample, :, latent])
        histogram = result.histogram.value[result.histogram.latent == latent]
        assert len(histogram) == min(50, int((z[..., latent] > 0).sum()))
    # several groups were read
    from saekit.cache import CacheReader
    from saekit.dashboard.collect import _group_bounds

    assert len(_group_bounds(CacheReader(cache, "embed", 8))) > 2


def test_the_sample_is_uniform_not_the_first_inputs(grouped_cache):
    cache, _ = grouped_cache
    sae = random_dictionary(VOCAB, 16, 3, hookpoint="embed")
    seen = torch.zeros(N)
    for seed in range(12):
        result = collect(sae, cache, config=CollectConfig(reservoir=3, seed=seed))
        seen[result.sampled.sample] += 1
    # a bottom-k sketch over 150 inputs: inputs from the last groups are drawn as often as the first
    first, last = seen[: N // 3].sum(), seen[-N // 3 :].sum()
    assert first > 0 and last > 0 and 0.4 < float(first / last) < 2.5


def test_keep_best_and_quantiles():
    pool = Examples(
        torch.tensor([1, 0, 1, 0, 1, 0]),
        torch.tensor([10, 11, 12, 13, 14, 15]),
        torch.tensor([0.1, 0.9, 0.5, 0.3, 0.7, 0.6]),
        torch.tensor([0.1, 0.9, 0.5, 0.3, 0.7, 0.6]),
    )
    kept = keep_best(pool, 2, descending=True)
    assert sorted(zip(kept.latent.tolist(), kept.sample.tolist(), strict=True)) == [
        (0, 11),
        (0, 15),
        (1, 12),
        (1, 14),
    ]
    low = keep_best(pool, 1, descending=False)
    assert sorted(low.sample.tolist()) == [10, 13]


def test_quantile_bands_are_ordered(grouped_cache):
    cache, _ = grouped_cache
    sae = random_dictionary(VOCAB, 16, 3, hookpoint="embed")
    result = collect(sae, cache, config=CollectConfig(reservoir=40))
    latent = int(result.input_fires.argmax())
    bands = quantile_examples(result, latent, 4, 3)
    assert len(bands) == 4
    for (lo, hi, chosen), (_, next_hi, _) in itertools.pairwise(bands):
        assert lo <= hi and next_hi <= lo
        assert all(lo <= v <= hi for _, v in chosen) and 0 < len(chosen) <= 3


def test_layouts():
    assert infer_layout([64, 4, 4], 64, 16, "text").grid == (4, 4)  # a feature map
    cls = infer_layout([17, 32], 32, 17, "image")
    assert cls.kind == "grid" and cls.grid == (4, 4) and cls.offset == 1
    assert infer_layout([16, 32], 32, 16, "image").offset == 0
    assert infer_layout([16, 32], 32, 16, "text").kind == "tokens"
    assert infer_layout([7, 32], 32, 7, "image").kind == "none"
    values = cls.grid_values(torch.tensor([0, 1, 16]), torch.tensor([5.0, 1.0, 2.0]))
    assert values[0] == 1.0 and values[15] == 2.0 and sum(values) == 3.0  # CLS left out


def test_nearest_words_of_clip_directions():
    words = ["red", "green", "blue", "circle", "square"]
    tokenizer = word_tokenizer(words)
    model = tiny_clip(len(tokenizer))
    clip = CLIPAdapter(model, tokenizer=tokenizer)
    embeddings = clip.encode_texts(words)  # (5, 16) unit rows
    # a dictionary on the image embedding whose latents are the words' embeddings
    found = latent_words(
        embeddings.flip(0),
        clip_direction_map(model, "visual_projection", 16),
        clip.encode_texts,
        words,
        k=2,
    )
    assert [row[0][0] for row in found] == words[::-1]
    assert all(row[0][1] == pytest.approx(1.0, abs=1e-5) for row in found)
    # a residual-stream hookpoint goes through post_layernorm's scale and the projection
    direction = torch.randn(3, 32)
    mapped = clip_direction_map(model, "vision_model.encoder.layers.1", 32)(direction)
    with torch.no_grad():
        expected = model.visual_projection(direction * model.vision_model.post_layernorm.weight)
    torch.testing.assert_close(mapped, expected)
    assert clip_direction_map(model, "text_model.encoder.layers.0", 7) is None
    by_hand = nearest_words(
        torch.tensor([[1.0, 0.0], [0.0, -1.0]]),
        torch.tensor([[2.0, 0.0], [0.0, 1.0]]),
        ["x", "y"],
        1,
    )
    assert by_hand == [[("x", 1.0)], [("x", 0.0)]]


def test_add_direction_shifts_every_position_of_a_feature_map():
    unet = tiny_unet()
    sample, t, context = torch.randn(2, 3, 8, 8), torch.tensor(5), torch.randn(2, 4, 16)
    direction = torch.randn(32)
    seen = {}
    handle = unet.mid_block.register_forward_hook(
        lambda m, a, out: seen.__setitem__("y", out.clone())
    )
    with torch.no_grad():
        unet(sample, t, encoder_hidden_states=context)
        clean = seen["y"]
        handle.remove()
        with add_direction(unet, "mid_block", "output", direction, 2.5):
            handle = unet.mid_block.register_forward_hook(
                lambda m, a, out: seen.__setitem__("y", out.clone())
            )
            unet(sample, t, encoder_hidden_states=context)
            handle.remove()
    torch.testing.assert_close(seen["y"], clean + 2.5 * direction[None, :, None, None])


def test_token_inputs_are_shaded_by_activation(grouped_cache, tmp_path):
    from saekit.cache import as_input_source
    from saekit.dashboard import DashboardConfig, SourceInputs, build_dashboard

    cache, ids = grouped_cache
    sae = random_dictionary(VOCAB, 16, 3, hookpoint="embed")
    inputs = SourceInputs(as_input_source(ids), tokenize=lambda row: [f"tok{int(i)}" for i in row])
    result = build_dashboard(
        sae, cache, tmp_path / "site", inputs=inputs, config=DashboardConfig(max_pages=1)
    )
    (page,) = (tmp_path / "site" / "latents").glob("*.html")
    html = page.read_text()
    latent = int(page.stem)
    samples, _ = result.collection.top.of(latent)
    sample = int(samples[0])
    # the top input's tokens, each shaded in proportion to the latent's activation there
    z = sae.encode_dense(torch.eye(VOCAB)[ids[sample]])[:, latent]  # (T,)
    assert all(f"tok{int(t)}</span>" in html for t in ids[sample])
    assert f"rgba(217, 72, 15, {0.85:.2f})" in html  # the strongest token is fully shaded
    assert html.count('class="card text"') >= 1 and z.max() > 0
