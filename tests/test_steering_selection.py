"""Concept selection (SAeUron's score) on hand-made activations with a known answer, the
selection file, and unlearning built from it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from adapters_support import one_thread
from steering_support import before_and_after, generate, tiny_sae, tiny_testbed_pipeline

from saekit.adapters.base import Rows
from saekit.dictionaries import SAEConfig, TopKSAE
from saekit.steering import (
    Selection,
    SelectionEntry,
    collect_rows,
    latent_stats,
    pick,
    saeuron_scores,
    select_concept,
    specificities,
    unlearn,
    unlearn_interventions,
)
from saekit.steering import steer as saekit_steer


def identity_sae(d: int = 8, hookpoint: str = "h") -> TopKSAE:
    """Latent i reads and writes input dimension i (so activations are the inputs)."""
    sae = TopKSAE(SAEConfig(d_in=d, d_sae=d, k=d, hookpoint=hookpoint))
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(d))
        sae.W_dec.copy_(torch.eye(d))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def test_saeuron_score_normalises_by_total_activation():
    with_concept = torch.tensor([2.0, 2.0, 4.0, 0.0])  # total 8
    without = torch.tensor([4.0, 4.0, 0.0, 8.0])  # total 16: twice as active overall
    scores = saeuron_scores(with_concept, without)
    torch.testing.assert_close(scores, torch.tensor([0.0, 0.0, 0.5, -0.5]))
    assert pick(scores, count=2).tolist() == [2]  # only positive scores are selected
    assert pick(torch.arange(10.0), percentile=80).tolist() == [9, 8]


def test_select_concept_finds_the_planted_latent_per_step():
    torch.manual_seed(0)
    sae = identity_sae()
    base = torch.rand(400, 8)  # every latent fires a little everywhere
    concept = base.clone()
    step = torch.arange(400) % 2
    concept[step == 0, 3] += 3.0  # the concept is latent 3 at step 0 ...
    concept[step == 1, 5] += 3.0  # ... and latent 5 at step 1
    meta = dict(sample=torch.arange(400), position=torch.zeros(400, dtype=torch.long))
    rows = Rows(concept, **meta, step=step.to(torch.int16), timestep=step.float() * 500)
    other = Rows(base, **meta, step=step.to(torch.int16), timestep=step.float() * 500)
    selection = select_concept("thing", {"h": sae}, {"h": rows}, {"h": other}, count=1)
    by_step = {e.step: e.features for e in selection.entries}
    assert by_step == {0: [3], 1: [5]}
    typical = {e.step: e.typical[0] for e in selection.entries}
    assert typical[0] == pytest.approx(3.5, abs=0.1)  # mean where it fires: 3 + E[U(0,1)]
    pooled = select_concept("thing", {"h": sae}, {"h": concept}, {"h": base}, count=2)
    assert sorted(pooled.entries[0].features) == [3, 5] and pooled.entries[0].step is None


def test_specificity_tells_a_concept_latent_from_a_shared_one():
    sae = identity_sae()
    n = 200
    with_concept = torch.zeros(n, 8)
    with_concept[:, 0] = 1.0  # fires everywhere (the background)
    with_concept[:, 3] = 2.0  # only with the concept
    with_concept[:, 6] = 2.0  # with the concept, and (less) without it: a shared latent
    without = torch.zeros(n, 8)
    without[:, 0] = 1.5
    without[:, 6] = 0.5
    # normalised means: with (0.2, 0.4, 0.4) and without (0.75, 0, 0.25) for latents 0, 3, 6
    spec = specificities(latent_stats(sae, with_concept).mean, latent_stats(sae, without).mean)
    torch.testing.assert_close(spec[[0, 3, 6, 7]], torch.tensor([0.2 / 0.95, 1.0, 0.4 / 0.65, 0]))
    selection = select_concept("thing", {"h": sae}, {"h": with_concept}, {"h": without}, count=2)
    (entry,) = selection.entries
    assert entry.features == [3, 6]  # both score (0.4 and 0.15): the score cannot tell them apart
    assert entry.specificity == pytest.approx([1.0, 0.6154], abs=1e-4)
    assert entry.detectors(0.95) == [3]
    assert entry.detectors(0.5) == [3, 6]
    old = SelectionEntry("h", [3, 6], [1, 1], [1, 1])  # no specificity
    assert old.detectors(0.95) == [3, 6]


def test_latent_stats_mean_and_firing_mean():
    sae = identity_sae(4)
    x = torch.tensor([[1.0, 0, 0, 0], [3.0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    stats = latent_stats(sae, x, batch_size=3)
    assert stats.mean[0] == pytest.approx(1.0) and stats.firing_mean[0] == pytest.approx(2.0)
    assert stats.firing_mean[1] == 0


def test_selection_file_round_trip(tmp_path):
    selection = Selection(
        "circle",
        [
            SelectionEntry("mid_block", [4, 9], [0.2, 0.1], [1.5, 0.5], step=0, timestep=999.0),
            SelectionEntry("mid_block", [9], [0.3], [0.7], 1, 500.0, specificity=[0.97]),
        ],
        meta={"percentile": 99.0},
    )
    path = selection.save(tmp_path / "sel" / "circle.json")
    again = Selection.load(path)
    assert again == selection
    typical = again.typical_tensor("mid_block", 12)
    assert typical is not None and typical[4] == 1.5 and typical[9] == pytest.approx(0.6)
    assert again.features("mid_block", step=1) == [9]
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a selection file"):
        Selection.load(tmp_path / "bad.json")


def test_unlearn_merges_concepts_and_scopes_steps():
    a = Selection("circle", [SelectionEntry("m", [1, 2], [1, 1], [1, 1], step=0)])
    b = Selection("red", [SelectionEntry("m", [2, 3], [1, 1], [1, 1], step=0)])
    c = Selection("blue", [SelectionEntry("m", [7], [1], [1])])
    interventions = unlearn_interventions([a, b, c], multiplier=-2.0)
    assert [(i.features, i.scope.steps) for i in interventions] == [
        ((1, 2, 3), (0, 1)),
        ((7,), None),
    ]
    assert all(i.kind == "scale" and i.strength == -2.0 for i in interventions)


def test_unlearn_on_a_pipeline_flips_selected_latents_where_they_fire():
    with one_thread():
        pipe = tiny_testbed_pipeline()
        sae = tiny_sae(32, "mid_block")
        from saekit.adapters.diffusion import DiffusionAdapter

        adapter = DiffusionAdapter(pipe, num_inference_steps=2, guidance_scale=3.0)
        rows = collect_rows(adapter, ["mid_block"], ["a red circle", "a blue square"])
        assert rows["mid_block"].step is not None
        assert set(rows["mid_block"].step.tolist()) == {0, 1}  # two steps recorded
        # concept "red" = the first prompt's rows, against the second's
        first = rows["mid_block"].sample == 0
        selection = select_concept(
            "red", {"mid_block": sae}, {"mid_block": rows["mid_block"].select(first)},
            {"mid_block": rows["mid_block"].select(~first)}, count=3,
        )  # fmt: skip
        assert {e.step for e in selection.entries} == {0, 1}
        clean = generate(pipe, ["a red circle"], steps=2)
        with (
            # every selected latent wherever it fires (SAeUron as published)
            unlearn(pipe, {"mid_block": sae}, selection, multiplier=-1.0, min_specificity=None),
            before_and_after(pipe.unet.mid_block) as (raw, steered),
        ):
            out = generate(pipe, ["a red circle"], steps=2)
        assert not torch.equal(out, clean)
        x = raw[0].permute(0, 2, 3, 1).reshape(-1, 32)
        features = torch.tensor(selection.features("mid_block", step=0))
        before = sae.encode_dense(x)[:, features]  # (N, F)
        delta = steered[0].permute(0, 2, 3, 1).reshape(-1, 32) - x
        torch.testing.assert_close(
            delta, (-2.0 * before) @ sae.W_dec[features].detach(), rtol=0, atol=1e-5
        )


def test_unlearn_with_an_anchor_adds_it_where_the_concept_fires():
    concept = Selection("circle", [SelectionEntry("m", [1, 2], [1, 1], [1, 1], step=0)])
    anchor = Selection("square", [SelectionEntry("m", [2, 5, 6], [1, 1, 1], [1, 1, 1], step=0)])
    scale, add = unlearn_interventions(concept, multiplier=0.0, anchor=anchor, anchor_strength=2)
    assert (scale.kind, scale.features, scale.strength) == ("scale", (1, 2), 0.0)
    # the anchor's latents that are not the concept's, added in proportion to the concept
    assert (add.kind, add.features, add.strength, add.relative) == ("add", (5, 6), 2, True)
    assert add.scope.weight_by == (1, 2) and add.scope.steps == (0, 1)


def test_shared_latents_are_edited_only_where_a_detector_fires():
    concept = Selection(
        "circle",
        [SelectionEntry("m", [1, 2, 3], [1, 1, 1], [1, 1, 1], 0, specificity=[1, 0.6, 0.99])],
    )
    anchor = Selection("square", [SelectionEntry("m", [5], [1], [1], step=0)])
    scale, add = unlearn_interventions(concept, multiplier=0.0, anchor=anchor)
    assert scale.features == (1, 2, 3) and scale.scope.where_active == (1, 3)
    assert add.scope.weight_by == (1, 3)  # presence read from the detectors alone
    for everywhere in (None, 0.0):  # SAeUron as published: each latent wherever it fires
        (scale,) = unlearn_interventions(concept, min_specificity=everywhere)
        assert scale.scope.where_active is None
    pure = Selection("red", [SelectionEntry("m", [1, 3], [1, 1], [1, 1], specificity=[1, 1])])
    assert unlearn_interventions(pure)[0].scope.where_active is None  # all detectors: no gate
    shared = Selection("blue", [SelectionEntry("m", [4], [1], [1], 0, specificity=[0.6])])
    assert unlearn_interventions(shared)[0].scope.where_active is None  # no detector: all are
    (both,) = unlearn_interventions([concept, shared])  # each concept's own detectors
    assert both.features == (1, 2, 3, 4) and both.scope.where_active == (1, 3, 4)
    with pytest.raises(ValueError, match=r"min_specificity must be in \[0, 1\]"):
        unlearn_interventions(concept, min_specificity=1.5)


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.h = torch.nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.h(x)


def test_anchor_replaces_the_concept_in_proportion_to_its_presence():
    sae = identity_sae()  # latent i is input dimension i: the codes are the inputs
    concept = Selection("circle", [SelectionEntry("h", [1, 2], [1, 1], [2.0, 4.0])])
    anchor = Selection("square", [SelectionEntry("h", [5], [1], [3.0])])
    x = torch.zeros(4, 8)
    x[0, 1] = 2.0  # the concept as strong as typical: presence (2) / (2) = 1
    x[1, 1], x[1, 2] = 1.0, 2.0  # half as strong: (1 + 2) / (2 + 4) = 0.5
    x[2, 3] = 5.0  # no concept latent fires: left alone
    x[3, 2] = 8.0  # twice as strong through the other latent: 8 / 4 = 2
    net = _Net()
    with unlearn(net, sae, concept, multiplier=0.0, anchor=anchor, anchor_strength=1.0):
        out = net(x)
    expected = x.clone()
    expected[:, 1:3] = 0  # the concept's latents removed
    expected[:, 5] = torch.tensor([1.0, 0.5, 0.0, 2.0]) * 3.0  # the anchor, typical 3
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    assert torch.equal(net(x), x)  # hooks removed


def test_a_shared_latent_is_left_alone_on_rows_without_the_concept():
    sae = identity_sae()
    # latent 1: the concept's detector; latent 2: selected too, but it also fires on another
    # word (row 1), as a shared latent of a token-embedding dictionary does
    concept = Selection(
        "circle", [SelectionEntry("h", [1, 2], [1, 1], [2.0, 1.0], specificity=[1, 0.6])]
    )
    x = torch.zeros(3, 8)
    x[0, 1], x[0, 2] = 2.0, 1.0  # the concept's token
    x[1, 2], x[1, 4] = 1.0, 3.0  # another word that shares latent 2
    x[2, 1], x[2, 2] = 1.0, 1.0  # the concept at half strength
    net = _Net()
    with unlearn(net, sae, concept, multiplier=-1.0):
        out = net(x)
    expected = x.clone()
    expected[[0, 2], 1:3] *= -1  # flipped where the detector fires ...
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)  # ... and row 1 untouched
    with unlearn(net, sae, concept, multiplier=-1.0, min_specificity=None):
        out = net(x)
    assert out[1, 2] == -1.0  # SAeUron as published: the shared latent flipped there too
    anchor = Selection("square", [SelectionEntry("h", [5], [1], [4.0])])
    with unlearn(net, sae, concept, multiplier=0.0, anchor=anchor, anchor_strength=1.0):
        out = net(x)
    # the anchor in proportion to the detector's presence: 2 / 2 and 1 / 2 of its typical 4
    torch.testing.assert_close(out[:, 5], torch.tensor([4.0, 0.0, 2.0]), rtol=0, atol=1e-6)
    assert torch.equal(out[1], x[1])


def test_weight_by_needs_the_typical_activation_of_its_latents():
    from saekit.steering import Intervention, Scope

    sae = identity_sae()
    edit = Intervention([5], strength=1.0, scope=Scope(weight_by=(1,)))
    with pytest.raises(ValueError, match=r"weight_by .* needs the typical activation"):
        saekit_steer(_Net(), sae, edit)
    typical = torch.zeros(8)
    typical[1] = 2.0
    with saekit_steer(_Net(), sae, edit, typical=typical):
        pass
    with pytest.raises(ValueError, match="weight_by needs at least one"):
        Scope(weight_by=())
    assert Scope.from_dict(Scope(weight_by=(3, 4)).to_dict()) == Scope(weight_by=(3, 4))
