"""Factor scores: AUROC and best F1 by hand and against brute force; planted latents are found;
labels files round-trip; per-sample activations are the max over each input's rows."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_eval_metrics import _one_hot_cache
from test_eval_support import (
    identity_dictionary,
    one_thread_module,  # noqa: F401 (a fixture)
)

from saekit.evaluation import (
    FactorLabels,
    auroc,
    best_f1,
    evaluate_on_cache,
    read_labels,
    score_factors,
    write_labels,
)
from saekit.evaluation.factors import SampleMaxAccumulator
from saekit.kernels import SparseCodes

pytestmark = pytest.mark.usefixtures("one_thread_module")


def test_auroc_and_f1_by_hand():
    scores = torch.tensor([[0.9], [0.8], [0.0], [0.0], [0.5]])
    labels = torch.tensor([[1], [1], [0], [1], [0]], dtype=torch.bool)
    # positive/negative pairs: 0.9 and 0.8 beat both negatives (4), 0.0 ties 0.0 (1/2), loses to 0.5
    assert auroc(scores, labels).item() == pytest.approx(4.5 / 6)
    f1, threshold = best_f1(scores, labels)
    # t=0.9: 2*1/(1+3)=0.5; t=0.8: 2*2/(2+3)=0.8; t=0.5: 2*2/(3+3)=0.67
    assert f1.item() == pytest.approx(0.8) and threshold.item() == pytest.approx(0.8)


def test_auroc_and_f1_match_brute_force():
    g = torch.Generator().manual_seed(0)
    scores = torch.relu(torch.randn(120, 6, generator=g)).round(decimals=1)  # many ties
    labels = torch.rand(120, 4, generator=g) < 0.3
    area = auroc(scores, labels)
    f1, _ = best_f1(scores, labels, chunk=4)
    for i in range(6):
        for v in range(4):
            pos, neg = scores[labels[:, v], i], scores[~labels[:, v], i]
            wins = (pos[:, None] > neg[None, :]).double() + 0.5 * (
                pos[:, None] == neg[None, :]
            ).double()
            assert area[i, v].item() == pytest.approx(wins.mean().item(), abs=1e-6)
            best = 0.0
            for t in scores[:, i].unique():
                if t > 0:
                    predicted = scores[:, i] >= t
                    tp = (predicted & labels[:, v]).sum().item()
                    best = max(best, 2 * tp / (predicted.sum().item() + labels[:, v].sum().item()))
            assert f1[i, v].item() == pytest.approx(best, abs=1e-6)


def test_undefined_auroc_is_nan_and_dead_latents_score_nothing():
    scores = torch.tensor([[0.0, 1.0], [0.0, 2.0], [0.0, 0.0]])
    labels = torch.tensor([[1, 1], [1, 0], [1, 0]], dtype=torch.bool)  # value 0 everywhere
    area = auroc(scores, labels)
    assert torch.isnan(area[:, 0]).all()
    f1, threshold = best_f1(scores, labels)
    assert f1[0].tolist() == [0.0, 0.0] and threshold[0, 0] == float("inf")


def test_planted_latents_are_found():
    g = torch.Generator().manual_seed(1)
    n = 300
    presence = torch.rand(n, 3, generator=g) < 0.4  # values a, b, c
    noise = torch.rand(n, 2, generator=g) * (torch.rand(n, 2, generator=g) < 0.5)
    acts = torch.cat(
        [
            presence[:, :1].float() * (1 + torch.rand(n, 1, generator=g)),  # tracks a exactly
            presence[:, 1:2].float() * 0.5 + torch.rand(n, 1, generator=g),  # b, noisily
            noise,  # tracks nothing
            torch.zeros(n, 1),  # dead
        ],
        dim=1,
    )
    labels = FactorLabels(["f=a", "f=b", "g=c"], presence)
    scores = score_factors(acts, labels, coverage_auroc=0.95, track_auroc=0.8)
    report = scores.report
    assert report.per_value["f=a"].auroc_latent == 0 and report.per_value["f=a"].auroc == 1.0
    assert report.per_value["f=a"].f1 == 1.0
    assert report.per_value["f=b"].auroc_latent == 1
    assert report.values_covered == 1 and report.values_total == 3
    assert report.per_factor_covered == {"f": 0.5, "g": 0.0}
    assert report.live_latents == 4
    assert report.untracked_latents == 2  # the two noise latents
    names, best = scores.best_value()
    assert names[0] == "f=a" and names[4] is None and torch.isnan(best[4])


def test_labels_round_trip(tmp_path):
    labels = FactorLabels(["color=red", "shape=circle"], torch.tensor([[1, 0], [0, 1], [1, 1]]))
    back = read_labels(write_labels(tmp_path / "labels.json", labels))
    assert back.value_names == labels.value_names and torch.equal(back.presence, labels.presence)
    np.savez(
        tmp_path / "labels.npz",
        presence=labels.presence.numpy(),
        value_names=np.array(labels.value_names),
    )
    assert torch.equal(read_labels(tmp_path / "labels.npz").presence, labels.presence)
    (tmp_path / "bad.json").write_text(json.dumps({"presence": [[1]]}))
    with pytest.raises(ValueError, match="value_names"):
        read_labels(tmp_path / "bad.json")
    with pytest.raises(ValueError, match=r"presence must be \(n_samples, 2\)"):
        FactorLabels(["a=1", "b=2"], torch.zeros(3, 3))


def test_sample_max_is_the_max_over_each_inputs_rows():
    acc = SampleMaxAccumulator(n_samples=3, d_sae=4)
    codes = SparseCodes(
        torch.tensor([1.0, 3.0, 2.0, 5.0]),
        torch.tensor([0, 1, 0, 3]),
        torch.tensor([0, 2, 3, 4]),
        4,
    )
    acc.update(codes, torch.tensor([2, 2, 7]))  # the third row's sample is out of range
    assert acc.activations.tolist() == [[0] * 4, [0] * 4, [2.0, 3.0, 0, 0]]
    assert acc.seen.tolist() == [False, False, True]


def test_factor_scores_from_a_cache(tmp_path):
    cache, ids = _one_hot_cache(tmp_path, n=64, vocab=8)
    presence = torch.zeros(len(ids), 8, dtype=torch.bool)
    presence[torch.arange(len(ids))[:, None], ids] = True  # token=i occurs in sample
    labels = FactorLabels([f"token={i}" for i in range(8)], presence)
    result = evaluate_on_cache(identity_dictionary(8, hookpoint="embed"), cache, labels=labels)
    report = result.factors.report
    assert report.samples == len(ids)
    defined = [v for v in range(8) if 0 < presence[:, v].sum() < len(ids)]
    assert report.values_covered == report.values_total == len(defined)
    for v in defined:  # latent v fires exactly where token v occurs
        assert report.per_value[f"token={v}"].auroc_latent == v
        assert report.per_value[f"token={v}"].f1 == 1.0
    assert report.live_latents == 8 and report.untracked_latents == 0
