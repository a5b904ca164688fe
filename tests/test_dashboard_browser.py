"""The dashboard in a real headless Chromium (Debian's package, driven by Playwright), opened from
disk: no console errors, no request leaves the file system, every image decodes, heatmaps are
drawn, the index sorts and filters; screenshots go to test-artifacts/.

Two sites: a CLIP vision tower on labelled images (patch heatmaps after a CLS token, factor
scores, nearest words), and a text-to-image UNet's mid block on prompts (spatial heatmaps over
the remade samples, a steering preview grid)."""

from __future__ import annotations

import pytest
import torch
from test_dashboard_support import ARTIFACTS, chromium, image_cache
from test_eval_support import (
    TinyTextToImage,
    one_thread_module,  # noqa: F401 (a fixture)
    random_dictionary,
    word_tokenizer,
)
from torch import nn

from saekit.adapters import CustomAdapter, rows_from_channels_first
from saekit.adapters.clip import CLIPAdapter
from saekit.cache import CacheConfig, InputConfig, cache_activations, open_inputs
from saekit.dashboard import DashboardConfig, SourceInputs, SteeringSpec, build_dashboard
from saekit.dashboard.vocabulary import clip_direction_map, latent_words

WORDS = ["red", "green", "blue", "square", "circle", "black", "white"]


pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def clip_site(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("clip-site")
    cache, labels, model = image_cache(tmp, n=40)
    sae = random_dictionary(32, 64, 4, hookpoint="vision_model.encoder.layers.1")
    tokenizer = word_tokenizer(WORDS)
    text_model = _with_vocabulary(model, len(tokenizer))
    words = latent_words(
        sae.W_dec.detach(),
        clip_direction_map(text_model, "vision_model.encoder.layers.1", 32),
        CLIPAdapter(text_model, tokenizer=tokenizer).encode_texts,
        WORDS,
    )
    result = build_dashboard(
        sae,
        cache,
        tmp / "site",
        labels=labels,
        words=words,
        config=DashboardConfig(title="tiny CLIP"),
    )
    return result


def _with_vocabulary(model, vocab_size):
    model.text_model.embeddings.token_embedding = nn.Embedding(vocab_size, 32)
    return model


@pytest.fixture(scope="module")
def diffusion_site(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("unet-site")
    prompts = [f"a {c} {s}" for c in ("red", "green", "blue") for s in ("circle", "square")] * 3
    (tmp / "prompts.txt").write_text("\n".join(prompts) + "\n")
    t2i = TinyTextToImage([*WORDS, "a"])
    root = nn.ModuleDict({"unet": t2i.unet}).eval()
    adapter = CustomAdapter(
        root,
        feed=lambda model, batch: t2i(batch.prompts, batch.ids.tolist()),
        flatten=lambda hookpoint, tensor, context: rows_from_channels_first(tensor, context),
        name="tiny-t2i",
    )
    data = InputConfig(prompts=str(tmp / "prompts.txt"))
    cfg = CacheConfig(
        hookpoints=["unet.mid_block"],
        output_dir=str(tmp / "cache"),
        batch_size=6,
        rows_per_shard=256,
        shuffle_buffer_rows=512,
        dtype="float32",
        progress=False,
        data=data,
    )
    cache_activations(adapter, open_inputs(data), cfg)
    sae = random_dictionary(32, 48, 4, hookpoint="unet.mid_block")
    inputs = SourceInputs(open_inputs(data), generate=lambda prompt, i: t2i([prompt], [i])[0])
    steering = SteeringSpec(
        t2i, root, "a red circle", seeds=(0, 1), multipliers=(0, 2, 8), latents=2
    )
    return build_dashboard(
        sae,
        tmp / "cache",
        tmp / "site",
        inputs=inputs,
        steering=steering,
        config=DashboardConfig(top_k=4, quantiles=2, per_quantile=2),
    )


def _open(context, path, problems):
    page = context.new_page()
    page.on(
        "console",
        lambda m: (
            problems.append(f"console {m.type}: {m.text}")
            if m.type in ("error", "warning")
            else None
        ),
    )
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
    page.on(
        "request",
        lambda r: (
            problems.append(f"network: {r.url}")
            if not r.url.startswith(("file://", "data:"))
            else None
        ),
    )
    page.goto(path.as_uri())
    page.wait_for_load_state("load")
    return page


def _all_images_decoded(page):
    page.evaluate("window.scrollTo(0, document.body.scrollHeight)")  # lazy thumbnails load
    page.wait_for_function("Array.from(document.images).every(i => i.complete)")
    images = page.evaluate(
        "Array.from(document.images).map(i => [i.getAttribute('src'), i.naturalWidth])"
    )
    assert images, "the page shows no images"
    broken = [src for src, width in images if width == 0]
    assert not broken, f"images that did not load: {broken[:5]}"
    return len(images)


def _column(page, index):
    return page.eval_on_selector_all(
        "table#latents tbody tr", f"rows => rows.map(r => r.children[{index}].textContent)"
    )


def test_clip_index_loads_sorts_and_filters(clip_site, tmp_path):
    problems: list[str] = []
    ARTIFACTS.mkdir(exist_ok=True)
    with chromium(tmp_path / "profile") as context:
        page = _open(context, clip_site.index, problems)
        assert page.title() == "tiny CLIP"
        rows = page.locator("table#latents tbody tr")
        assert rows.count() == 64
        assert _all_images_decoded(page) > 10
        page.screenshot(path=str(ARTIFACTS / "dashboard-index.png"))

        density = [float(v) for v in _column(page, 2)]  # default: density, descending
        assert density == sorted(density, reverse=True) and density[0] > 0
        page.click("th[data-key=max]")
        maxima = [float(v) for v in _column(page, 3)]
        assert maxima == sorted(maxima, reverse=True)
        page.click("th[data-key=max]")  # again: ascending
        maxima = [float(v) for v in _column(page, 3)]
        assert maxima == sorted(maxima)
        page.click("th[data-key=best]")
        best = [v for v in _column(page, 6) if v]
        assert best == sorted(best) and best[0].startswith("background=")
        page.fill("#filter", "color=")
        assert all("color=" in v for v in _column(page, 6)) and rows.count() > 0
        page.fill("#filter", "")
        page.check("#live-only")
        assert rows.count() == clip_site.pages
    assert not problems, problems


def test_clip_latent_page_shows_heatmaps_factors_and_words(clip_site, tmp_path):
    problems: list[str] = []
    with chromium(tmp_path / "profile") as context:
        index = _open(context, clip_site.index, problems)
        first = index.locator("table#latents tbody tr a").first
        latent = first.text_content()
        first.click()
        index.wait_for_load_state("load")
        page = index
        assert page.locator("h1").text_content() == f"Latent {latent}"
        assert _all_images_decoded(page) >= 8
        drawn = page.eval_on_selector_all(
            "canvas.heat",
            "cs => cs.map(c => [c.width, c.height, c.getContext('2d').getImageData(0, 0, c.width, c.height).data.some((v, i) => i % 4 === 3 && v > 0)])",
        )
        assert drawn and all(w == 4 and h == 4 for w, h, _ in drawn)  # 4 x 4 patches after CLS
        assert any(visible for _, _, visible in drawn)
        assert page.locator("#top figure.card").count() == 8
        assert page.locator("#quantiles h3.band").count() >= 2
        assert page.locator(".words span").count() == 5  # latent_words keeps 5
        assert page.locator("text=AUROC").count() >= 1
        assert page.locator("svg.hist rect").count() > 0
        page.screenshot(path=str(ARTIFACTS / "dashboard-latent.png"), full_page=True)
    assert not problems, problems


def test_diffusion_site_has_spatial_heatmaps_and_steering(diffusion_site, tmp_path):
    problems: list[str] = []
    result = diffusion_site
    steered = sorted(int(p.name) for p in (result.index.parent / "steer").iterdir())
    assert len(steered) == 2
    page_path = result.index.parent / "latents" / f"{steered[0]:02d}.html"
    with chromium(tmp_path / "profile") as context:
        page = _open(context, page_path, problems)
        assert _all_images_decoded(page) == 4 + 2 * 2 + 3 * 2  # top, bands, steering grid
        grids = page.eval_on_selector_all("canvas.heat", "cs => cs.map(c => [c.width, c.height])")
        assert grids and all(g == [4, 4] for g in grids)  # the mid block's 4 x 4 feature map
        assert page.locator("#steering table.steer img").count() == 6
        assert "×8" in page.locator("#steering").text_content()
        page.screenshot(path=str(ARTIFACTS / "dashboard-steering.png"), full_page=True)
        index = _open(context, result.index, problems)
        assert _all_images_decoded(index) > 0
    assert not problems, problems
    # the steering grid really steers: strength 0 differs from strength 8
    from PIL import Image

    steer = result.index.parent / "steer" / str(steered[0])
    calm = torch.tensor(list(Image.open(steer / "0-0.png").getdata())).float()
    strong = torch.tensor(list(Image.open(steer / "2-0.png").getdata())).float()
    assert (calm - strong).abs().mean() > 1.0
