"""The testbed world and its oracle: deterministic scenes, right labels, exact pixel reading."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from saekit.testbed import world
from saekit.testbed.degrade import degrade
from saekit.testbed.oracle import Oracle, Reading, connected_components, locate


@pytest.fixture(scope="module")
def scenes() -> list[world.Scene]:
    return world.sample_scenes(1500, seed=123)


@pytest.fixture(scope="module")
def oracle() -> Oracle:
    return Oracle()


def _digest(images: torch.Tensor) -> str:
    return hashlib.sha256(images.numpy().tobytes()).hexdigest()


def test_world_is_deterministic_and_seeds_differ():
    a, b = world.sample_scenes(300, seed=5), world.sample_scenes(300, seed=5)
    assert a == b
    assert _digest(world.render(a)) == _digest(world.render(b))
    assert world.sample_scenes(300, seed=6) != a
    rng_a, rng_b = np.random.default_rng(1), np.random.default_rng(1)
    assert [world.describe(s, "partial", rng_a).text for s in a] == [
        world.describe(s, "partial", rng_b).text for s in a
    ]


def test_factor_counts_and_coverage(scenes):
    assert len(world.SHAPES) >= 5 and len(world.COLORS) >= 6 and len(world.SIZES) >= 2
    assert len(world.POSITIONS) == 9 and len(world.BACKGROUNDS) >= 2
    seen = world.presence(scenes).any(axis=0)
    assert seen.all(), "every factor value occurs in 1500 scenes"
    counts = {s.count for s in scenes}
    assert counts == {1, 2}
    assert all(len({o.position for o in s.objects}) == s.count for s in scenes)


def test_render_paints_exactly_the_labelled_pixels():
    scene = world.Scene(
        "gray",
        (
            world.SceneObject("square", "red", "large", "top left"),
            world.SceneObject("cross", "blue", "small", "bottom right"),
        ),
    )
    (image,) = world.render_uint8([scene])  # (H, W, 3)
    red = (image == world.COLORS["red"]).all(-1)
    blue = (image == world.COLORS["blue"]).all(-1)
    gray = (image == world.BACKGROUNDS["gray"]).all(-1)
    assert (red | blue | gray).all(), "no pixel has any other colour (no anti-aliasing)"
    side = world.SIZES["large"]
    assert red.sum() == side * side and red[:side, :side].all()
    cross = world.shape_mask("cross", world.SIZES["small"])
    assert blue.sum() == cross.sum() and blue[16:, 16:].sum() == cross.sum()


def test_oracle_reads_every_pixel_factor_exactly(scenes, oracle):
    """The acceptance check: colour, position, size, background and count agree on 100%."""
    score = oracle.score(oracle.read(world.render(scenes)), scenes)
    for factor in ("color", "position", "size", "background", "count"):
        assert score.accuracy[factor] == 1.0, factor
    assert score.accuracy["shape"] >= 0.999  # the shipped classifier; 100% when trained
    readings = oracle.read(world.render(scenes[:50]))
    assert [r.to_scene() for r in readings] == scenes[:50]


def test_oracle_survives_sample_like_degradation(scenes, oracle):
    images = degrade(world.render(scenes), torch.Generator().manual_seed(0))
    accuracy = oracle.score(oracle.read(images), scenes).accuracy
    assert min(accuracy.values()) >= 0.95, accuracy


def test_oracle_score_counts_misses_and_wrong_values(oracle):
    scene = world.Scene("white", (world.SceneObject("circle", "red", "large", "center"),))
    wrong = world.counterfactual(world.counterfactual(scene, "color", "blue"), "position", "top")
    readings = oracle.read(world.render([wrong]))
    accuracy = oracle.score(readings, [scene]).accuracy
    assert accuracy["color"] == 0.0 and accuracy["position"] == 0.0
    assert accuracy["shape"] == 1.0 and accuracy["background"] == 1.0
    empty = oracle.score([Reading("white", ())], [scene]).accuracy
    assert empty["shape"] == 0.0 and empty["count"] == 0.0


def test_connected_components_separate_neighbouring_objects():
    mask = torch.zeros(1, 6, 6, dtype=torch.bool)
    mask[0, 0:2, 0:2] = True
    mask[0, 0:2, 3:5] = True  # one empty column apart
    mask[0, 4, 4] = mask[0, 5, 5] = True  # diagonal neighbours: 8-connected
    labels = connected_components(mask)[0]
    assert len(labels.unique()) == 4  # background + 3 components
    assert labels[4, 4] == labels[5, 5] != 0


def test_locate_rejects_wrong_shapes():
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        locate(torch.zeros(3, 32, 32))


@pytest.mark.parametrize("style", ["canonical", "shuffled", "partial", "single"])
def test_captions_parse_back_to_their_facts(scenes, style):
    rng = np.random.default_rng(0)
    for scene in scenes[:400]:
        caption = world.describe(scene, style, rng)
        assert world.parse_caption(caption.text) == caption.description, caption.text
        assert caption.description.holds_for(scene)
        assert set(caption.text.split()) <= set(world.vocabulary())


def test_canonical_caption_reads_naturally():
    scene = world.Scene("gray", (world.SceneObject("circle", "red", "large", "top left"),))
    assert scene.caption() == "a large red circle at the top left on a gray background"
    two = world.Scene(
        "black",
        (
            world.SceneObject("square", "orange", "small", "bottom"),
            world.SceneObject("cross", "blue", "large", "top"),
        ),
    )
    # reading order: the top object first; "an" before a vowel
    assert two.caption() == (
        "a large blue cross at the top and a small orange square at the bottom "
        "on a black background"
    )
    assert world.factor_prompts("color")[1] == "an orange shape"


def test_consistency_matrix_matches_the_definition(scenes):
    rng = np.random.default_rng(3)
    subset = scenes[:200]
    descriptions = [world.describe(s, "partial", rng).description for s in subset]
    expected = np.array([[d.holds_for(s) for s in subset] for d in descriptions])
    matrix = world.consistency(descriptions, subset)
    assert (matrix == expected).all()
    assert matrix.diagonal().all() and not matrix.all()


def test_variant_groups_differ_in_one_factor():
    groups, varied = world.variant_groups(50, 4, seed=0)
    assert len(groups) == 200
    for g, factor in enumerate(varied):
        members = groups[4 * g : 4 * g + 4]
        for other in members[1:]:
            differing = {f for f in world.FACTORS if other.values()[f] != members[0].values()[f]}
            assert differing <= {factor}


def test_labels_presence_and_validation():
    scene = world.Scene("white", (world.SceneObject("diamond", "green", "small", "right"),))
    names = world.value_names()
    row = world.presence([scene])[0]
    assert {names[i] for i in np.flatnonzero(row)} == {
        "shape=diamond",
        "color=green",
        "size=small",
        "position=right",
        "background=white",
    }
    assert world.labels([scene])["position"][0] == world.POSITIONS.index("right")
    with pytest.raises(ValueError, match="choose one of"):
        world.SceneObject("hexagon", "red", "large", "top")
    with pytest.raises(ValueError, match="distinct cells"):
        world.Scene("white", (scene.objects[0], scene.objects[0]))
    with pytest.raises(ValueError, match="rng"):
        world.describe(scene, "partial")
