"""`saekit dashboard` end to end: train on an image cache, build the site with factor labels and a
CLIP model loaded through its adapter from a local folder (nearest words), check what was
written; bad input is one clear line."""

from __future__ import annotations

import json

import pytest
from test_dashboard_support import image_cache
from test_eval_support import (
    one_thread_module,  # noqa: F401 (a fixture)
    word_tokenizer,
)

from saekit.cli import main
from saekit.evaluation import write_labels

pytestmark = pytest.mark.usefixtures("one_thread_module")

WORDS = ["red", "green", "blue", "square", "circle", "black", "white"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dash-cli")
    cache, labels, model = image_cache(tmp, n=48)
    # the same CLIP, saved as a folder the CLIP adapter loads (with a tokenizer for the words)
    tokenizer = word_tokenizer(WORDS)  # ids below the tiny CLIP's 20 text tokens
    model.save_pretrained(tmp / "clip")
    tokenizer.save_pretrained(tmp / "clip")
    write_labels(tmp / "labels.json", labels)
    run = tmp / "run"
    code = main(
        ["train", "--cache", str(cache), "--hookpoint", "vision_model.encoder.layers.1",
         "--k", "4", "--expansion_factor", "2", "--batch_size", "128", "--epochs", "4",
         "--checkpoint_every", "0", "--output_dir", str(run)]
    )  # fmt: skip
    assert code == 0
    return tmp, cache, run


def test_dashboard_command_writes_the_site(trained, capsys):
    tmp, cache, run = trained
    (tmp / "words.txt").write_text("\n".join(WORDS) + "\n")
    site = tmp / "site"
    code = main(
        ["dashboard", str(run), "--cache", str(cache), "--labels", str(tmp / "labels.json"),
         "--model", str(tmp / "clip"), "--adapter", "clip", "--vocabulary", str(tmp / "words.txt"),
         "--output_dir", str(site), "--top_k", "5", "--max_pages", "10"]
    )  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "10 latent pages" in out and "open" in out
    data = (site / "data" / "index.js").read_text()
    payload = json.loads(data.removeprefix("window.SAEKIT_INDEX = ").rstrip().rstrip(";"))
    assert len(payload["latents"]) == 64
    columns = payload["columns"]
    rows = [dict(zip(columns, row, strict=True)) for row in payload["latents"]]
    with_pages = [r for r in rows if r["page"]]
    assert len(with_pages) == 10
    assert all(r["words"] for r in rows)  # nearest words for every latent
    assert all(r["best"] and r["auroc"] is not None for r in with_pages)
    page = (site / with_pages[0]["page"]).read_text()
    assert page.count('class="card"') >= 5 and "canvas" in page and "AUROC" in page
    assert any(word in page for word in WORDS)
    assert len(list((site / "thumbs").glob("*.png"))) > 5
    assert (site / "assets" / "dashboard.js").is_file() and (
        site / "assets" / "dashboard.css"
    ).is_file()
    html = (site / "index.html").read_text()
    assert "http://" not in html and "https://" not in html  # nothing from the network


def test_dashboard_errors_are_one_line(trained, capsys):
    tmp, cache, run = trained
    assert main(["dashboard", str(run)]) == 2
    assert "give --cache" in capsys.readouterr().err
    assert (
        main(["dashboard", str(run), "--cache", str(cache), "--testbed", "clip", "--model", "x"])
        == 2
    )
    assert "not both" in capsys.readouterr().err
    assert main(["dashboard", str(tmp / "nowhere"), "--cache", str(cache)]) == 2
    assert "error" in capsys.readouterr().err
