"""The release registry shipped in the package, the model card template, and `saekit pull --list`."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from saekit.cli import main
from saekit.dictionaries import SAEConfig
from saekit.hub import releases
from saekit.hub.card import CardEntry, render_card, template
from saekit.hub.formats import FORMATS
from saekit.hub.registry import Release, ReleaseDictionary

REPO = Path(__file__).resolve().parents[1]


def test_every_release_is_complete_and_says_what_was_not_verified():
    known = releases()
    assert {
        "sdxl-turbo-unbox",
        "saeuron-unlearncanvas",
        "llava-next-8b-131k",
        "prisma-clip-b32-vanilla",
    } <= set(known)
    fields = {f.name for f in dataclasses.fields(Release)} | {
        f.name for f in dataclasses.fields(ReleaseDictionary)
    }
    for release in known.values():
        assert release.format in FORMATS
        assert release.sources, f"{release.name} cites no source"
        assert set(release.unverified) <= fields, f"{release.name}: unverified names unknown fields"
        if release.unverified:
            assert release.notes, f"{release.name} marks fields unverified without saying why"
        assert len(set(release.hookpoints)) == len(release.hookpoints)
        for entry in release.dictionaries:
            assert release.repo_of(entry).count("/") == 1
    # the shipped file is the one the registry reads, and each release maps to real formats
    raw = yaml.safe_load((REPO / "saekit" / "hub" / "releases.yaml").read_text())["releases"]
    assert set(raw) == set(known)


def test_a_release_lookup_names_the_hookpoints_when_none_matches():
    release = releases()["sdxl-turbo-unbox"]
    entry = release.dictionary("down_blocks.2.attentions.1")
    assert entry.path.startswith("unet.down_blocks.2.attentions.1_k10")
    assert release.dictionary(entry.path) is entry  # the folder in the repository works too
    with pytest.raises(ValueError, match=r"mid_block\.attentions\.0"):
        release.dictionary("down_blocks.9")
    with pytest.raises(ValueError, match="refusing"):
        ReleaseDictionary(hookpoint="x", path="../../etc")


def test_the_packaged_template_is_the_repository_model_card():
    assert template() == (REPO / "MODEL_CARD.md").read_text()


def test_the_card_fills_every_placeholder_and_declares_the_library():
    entries = [
        CardEntry(
            "vision.layers.3",
            SAEConfig(
                architecture="topk",
                d_in=8,
                d_sae=32,
                k=4,
                model="org/clip",
                model_revision="r1",
                hookpoint="vision.layers.3",
            ),
            {"train": {"lr": 0.001}, "steps": 10, "tokens": 1000},
            {"fvu": 0.2, "histogram": [1, 2, 3], "eval": {"recall_drop": 0.01}},
        ),
        CardEntry(
            "unet--mid",
            SAEConfig(
                architecture="jumprelu",
                d_in=8,
                d_sae=16,
                hookpoint="mid_block.attentions.0",
                capture="update",
            ),
            {"imported": {"library": "sdxl-unbox", "repo_id": "a/b", "revision": "f" * 40}},
        ),
    ]
    card = render_card("me/saes", entries, data={"cache": "runs/cache", "activations": None})
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "saekit" and front["base_model"] == ["org/clip"]
    assert "${" not in card
    for text in (
        'saekit.load("me/saes", "vision.layers.3")',
        "revision: r1",
        "the module's update to its input (output - input)",
        "cache: runs/cache",
        "imported from sdxl-unbox (`a/b` at commit " + "f" * 40,
        "| vision.layers.3 | eval.recall_drop | 0.01 |",
        "## Intended use",
        "## Limitations",
    ):
        assert text in card, text
    assert "histogram" not in card  # lists (histograms) stay out of the metrics table


def test_pull_list_prints_the_registry(capsys):
    assert main(["pull", "--list"]) == 0
    out = capsys.readouterr().out
    assert "llava-next-8b-131k" in out and "model.language_model.layers.24" in out
    assert "unverified:" in out
