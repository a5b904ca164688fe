"""`saekit steer` and `saekit unlearn` end to end on tiny models saved to folders."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from adapters_support import images, one_thread, tiny_llava
from steering_support import tiny_sae, tiny_testbed_pipeline

from saekit.cli import main
from saekit.dictionaries import save_dictionary
from saekit.steering import DEFAULT_MIN_SPECIFICITY


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("steer-cli")
    tiny_testbed_pipeline().save_pretrained(root / "pipeline")
    save_dictionary(tiny_sae(32, "mid_block"), root / "sae")
    return root


def _pixels(path: Path) -> bytes:
    return Image.open(path).tobytes()


def test_steer_command_writes_images_and_what_was_applied(pipeline_dir, tmp_path):
    root = pipeline_dir
    out = tmp_path / "out"
    code = main(
        ["steer", str(root / "pipeline"), "--saes", str(root / "sae"), "--features", "3", "5",
         "--strength", "4", "--steps", "1", "2", "--branch", "cond", "--mask_box", "0", "0",
         "0.5", "0.5", "--prompts", "a red circle", "a blue square", "--num_inference_steps", "2",
         "--compare", "true", "--output_dir", str(out)]
    )  # fmt: skip
    assert code == 0
    applied = json.loads((out / "applied.json").read_text())
    (entry,) = applied["interventions"]
    assert entry["features"] == [3, 5] and entry["hookpoint"] == "mid_block"
    assert entry["scope"]["steps"] == [1, 2] and entry["scope"]["branch"] == "cond"
    assert entry["applied_calls"] == 1  # one of the two steps
    assert entry["applied_rows"] == 2 * 4 * 4  # cond half, 2 prompts, the top-left 4x4 of 8x8
    steered = [out / p for p in applied["outputs"]["images"]]
    clean = [out / p for p in applied["clean"]["images"]]
    assert len(steered) == 2 and all(p.is_file() for p in steered + clean)
    assert any(_pixels(a) != _pixels(b) for a, b in zip(steered, clean, strict=True))


def test_steer_with_nothing_in_scope_reproduces_the_clean_images(pipeline_dir, tmp_path):
    root = pipeline_dir
    out = tmp_path / "out"
    assert main(
        ["steer", str(root / "pipeline"), "--saes", str(root / "sae"), "--features", "3",
         "--steps", "5", "9", "--prompts", "a red circle", "--num_inference_steps", "2",
         "--compare", "true", "--output_dir", str(out)]
    ) == 0  # fmt: skip
    assert _pixels(out / "images" / "000.png") == _pixels(out / "clean" / "000.png")


def test_unlearn_command_selects_saves_and_applies(pipeline_dir, tmp_path):
    root = pipeline_dir
    (tmp_path / "with.txt").write_text("a red circle\na large red circle\n")
    (tmp_path / "without.txt").write_text("a blue square\na green square\n")
    out = tmp_path / "out"
    assert main(
        ["unlearn", str(root / "pipeline"), "--saes", str(root / "sae"), "--concept", "red",
         "--with_prompts", str(tmp_path / "with.txt"), "--without_prompts",
         str(tmp_path / "without.txt"), "--count", "2", "--multiplier", "-2",
         "--prompts", "a red circle", "--num_inference_steps", "2", "--output_dir", str(out)]
    ) == 0  # fmt: skip
    selection = json.loads((out / "red.json").read_text())
    assert selection["concept"] == "red" and {e["step"] for e in selection["entries"]} == {0, 1}
    applied = json.loads((out / "applied.json").read_text())
    assert applied["concepts"] == ["red"] and applied["min_specificity"] == DEFAULT_MIN_SPECIFICITY
    assert all(len(e["specificity"]) == len(e["features"]) for e in selection["entries"])
    assert all(i["kind"] == "scale" and i["strength"] == -2.0 for i in applied["interventions"])
    # the saved selection is read back by a second run (two concepts at once)
    out2 = tmp_path / "out2"
    assert main(
        ["unlearn", str(root / "pipeline"), "--saes", str(root / "sae"), "--selections",
         str(out / "red.json"), str(out / "red.json"), "--prompts", "a red circle",
         "--num_inference_steps", "2", "--output_dir", str(out2)]
    ) == 0  # fmt: skip
    again = json.loads((out2 / "applied.json").read_text())
    assert [i["features"] for i in again["interventions"]] == [
        i["features"] for i in applied["interventions"]
    ]  # a latent named twice is scaled once
    # steer reads the selection too: its latents, with strengths in units of their typical value
    out3 = tmp_path / "out3"
    assert main(
        ["steer", str(root / "pipeline"), "--saes", str(root / "sae"), "--selection",
         str(out / "red.json"), "--relative", "true", "--strength", "2", "--prompts",
         "a blue square", "--num_inference_steps", "2", "--output_dir", str(out3)]
    ) == 0  # fmt: skip
    (steered,) = json.loads((out3 / "applied.json").read_text())["interventions"]
    selected = {f for e in selection["entries"] for f in e["features"]}
    assert set(steered["features"]) == selected and steered["relative"] is True
    # an anchor: a second concept (selected the other way round) put in red's place
    assert main(
        ["unlearn", str(root / "pipeline"), "--saes", str(root / "sae"), "--concept", "square",
         "--with_prompts", str(tmp_path / "without.txt"), "--without_prompts",
         str(tmp_path / "with.txt"), "--count", "2", "--prompts", "a blue square",
         "--num_inference_steps", "2", "--output_dir", str(tmp_path / "sq")]
    ) == 0  # fmt: skip
    out4 = tmp_path / "out4"
    assert main(
        ["unlearn", str(root / "pipeline"), "--saes", str(root / "sae"), "--selections",
         str(out / "red.json"), "--multiplier", "0", "--anchor", str(tmp_path / "sq" / "square.json"),
         "--anchor_strength", "1.5", "--prompts", "a red circle", "--num_inference_steps", "2",
         "--output_dir", str(out4)]
    ) == 0  # fmt: skip
    anchored = json.loads((out4 / "applied.json").read_text())
    assert anchored["anchor"] == "square" and anchored["anchor_strength"] == 1.5
    adds = [i for i in anchored["interventions"] if i["kind"] == "add"]
    assert adds and all(i["relative"] and i["scope"]["weight_by"] for i in adds)
    assert any(i["applied_rows"] > 0 for i in adds)  # red fired, so the anchor went in


def test_steer_command_on_a_vlm_writes_texts(tmp_path):
    model, processor = tiny_llava()
    model.save_pretrained(tmp_path / "vlm")
    processor.save_pretrained(tmp_path / "vlm")
    save_dictionary(tiny_sae(48, "model.language_model.layers.1"), tmp_path / "sae")
    images(1)[0].save(tmp_path / "a.png")
    out = tmp_path / "out"
    assert main(
        ["steer", str(tmp_path / "vlm"), "--saes", str(tmp_path / "sae"), "--features", "2",
         "--kind", "set", "--strength", "40", "--phase", "decode", "--images",
         str(tmp_path / "a.png"), "--prompts", "the", "--max_new_tokens", "4", "--compare",
         "true", "--output_dir", str(out)]
    ) == 0  # fmt: skip
    texts = json.loads((out / "texts.json").read_text())
    assert len(texts["steered"]) == 1 and len(texts["clean"]) == 1
    (entry,) = json.loads((out / "applied.json").read_text())["interventions"]
    assert entry["applied_calls"] >= 1 and entry["scope"]["phase"] == "decode"


def test_steer_command_errors_are_one_line(pipeline_dir, tmp_path, capsys):
    root = pipeline_dir
    code = main(
        ["steer", str(root / "pipeline"), "--saes", str(root / "sae"), "--prompts", "a",
         "--output_dir", str(tmp_path)]
    )  # fmt: skip
    assert code == 2
    assert "give --features" in capsys.readouterr().err


def test_unlearn_command_rejects_a_specificity_outside_0_1_before_loading(tmp_path, capsys):
    # a missing model folder would fail later: the bad value is caught first, nothing written
    out = tmp_path / "out"
    code = main(
        ["unlearn", str(tmp_path / "no-such-model"), "--saes", str(tmp_path / "none"),
         "--selections", "red.json", "--min_specificity", "1.5", "--output_dir", str(out)]
    )  # fmt: skip
    assert code == 2
    assert "--min_specificity must be in [0, 1]" in capsys.readouterr().err
    assert not out.exists()
