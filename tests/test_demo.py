"""``saekit demo --quick`` end to end on the shipped testbed models: caches, dictionaries, factor
scores and a report whose every figure and image is on disk."""

from __future__ import annotations

import json
import re

import pytest

from saekit.cli import main


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "report"
    assert main(["demo", "--quick", "--output_dir", str(out)]) == 0
    return out, json.loads((out / "report.json").read_text())


def test_demo_trains_on_both_models_and_finds_factor_latents(demo):
    _, report = demo
    clip, denoiser = report["models"]["clip"], report["models"]["denoiser"]
    assert clip["hookpoint"].startswith("vision_model.encoder.layers.2")
    assert denoiser["hookpoint"].startswith("mid_block.attentions.0")
    # real dictionaries: they reconstruct held-out rows of both models
    assert clip["held_out"]["fvu"] < 0.2
    assert denoiser["held_out"]["fvu"] < 0.5
    assert clip["held_out"]["l0"] == pytest.approx(16, abs=0.01)
    # the CLIP image tower's latents line up with the world's factors (a random dictionary
    # would cover none): the background and the colours are the easiest
    assert clip["factors"]["values_covered"] >= 6
    assert clip["factors"]["per_factor_covered"]["background"] == 1.0
    names = set(clip["best_latents"])
    assert {"color=red", "shape=circle", "background=gray"} <= names
    # the text-to-image model draws what it is asked for (the oracle's reading)
    assert report["generation"]["oracle_accuracy"]["color"] >= 0.6


def test_demo_steers_toward_red_and_unlearns_circles(demo):
    _, report = demo
    (steered,) = report["steering"]["tables"]["Steering"]
    assert steered["target read before"] <= 0.25  # prompts name other colours
    assert steered["target read after"] >= 0.75
    (forgot,) = report["steering"]["tables"]["Unlearning"]
    assert forgot["named shape drawn, before"] >= 0.75
    assert forgot["named shape drawn, after"] <= 0.25
    assert forgot["other shapes right, after"] >= 0.5  # the rest of the vocabulary survives


def test_demo_report_is_a_page_with_every_image_on_disk(demo):
    out, report = demo
    page = (out / "report.html").read_text()
    sources = re.findall(r'src="([^"]+)"', page)
    assert len(sources) >= 25, "inputs, samples, figures and one strip per factor value"
    for src in sources:
        assert (out / src).is_file(), src
    for part in report["models"].values():
        for file, _ in part["figures"]:
            assert (out / file).stat().st_size > 1000
    assert "color=red" in page and "AUROC" in page


def test_missing_model_folder_names_the_script_that_makes_it(tmp_path, capsys):
    args = ["demo", "--quick", "--output_dir", str(tmp_path / "out"), "--pipeline_dir"]
    assert main([*args, str(tmp_path / "nothing")]) != 0
    assert "scripts/train_testbed_diffusion.py" in capsys.readouterr().err
    assert not (tmp_path / "out" / "caches").exists(), "checked before any work starts"


def test_a_folder_of_a_run_with_other_settings_is_refused_untouched(demo, capsys):
    out, _ = demo
    before = {f: f.stat().st_mtime_ns for f in out.rglob("*") if f.is_file()}
    assert main(["demo", "--quick", "--output_dir", str(out), "--seed", "1"]) != 0
    assert "other settings (seed)" in capsys.readouterr().err
    assert {f: f.stat().st_mtime_ns for f in out.rglob("*") if f.is_file()} == before


def test_a_second_run_with_the_same_settings_reuses_its_caches_and_dictionaries(demo, capsys):
    out, report = demo
    dictionaries = {f: f.stat().st_ino for f in (out / "dictionaries").rglob("*") if f.is_file()}
    shards = {f: f.stat().st_ino for f in (out / "caches").rglob("*.safetensors")}
    assert main(["demo", "--quick", "--output_dir", str(out)]) == 0, capsys.readouterr().err
    again = json.loads((out / "report.json").read_text())
    for name in ("clip", "denoiser"):
        assert again["models"][name]["held_out"] == report["models"][name]["held_out"]
    assert {f: f.stat().st_ino for f in dictionaries} == dictionaries  # not trained again
    assert {f: f.stat().st_ino for f in shards} == shards  # not cached again
