"""Reconstruction metrics against hand-computed values; a perfect dictionary scores FVU 0 on a
real cache; a mean-only dictionary scores FVU 1; batching does not change the result."""

from __future__ import annotations

import math

import pytest
import torch
from test_eval_support import (
    identity_dictionary,
    one_hot_tokens,
    one_thread_module,  # noqa: F401 (a fixture)
    random_dictionary,
)

from saekit.adapters import CustomAdapter
from saekit.cache import CacheConfig, cache_activations
from saekit.evaluation import (
    ReconstructionAccumulator,
    density_histogram,
    evaluate_on_cache,
    evaluate_reconstruction,
)
from saekit.kernels import SparseCodes

# Three rows of width 2, their reconstructions, and codes over 4 latents (worked out by hand).
X = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]])
RECON = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])
CODES = SparseCodes(
    values=torch.tensor([1.0, 0.5, 0.0, 2.0, 1.0]),  # row 1's latent 2 is an exact zero
    indices=torch.tensor([0, 1, 2, 0, 1]),
    offsets=torch.tensor([0, 1, 3, 5]),
    d_sae=4,
)


pytestmark = pytest.mark.usefixtures("one_thread_module")


def test_metrics_match_hand_computed_values():
    acc = ReconstructionAccumulator(d_sae=4, dense_threshold=0.5)
    acc.update(X, RECON, CODES)
    m = acc.metrics()
    # mean (4/3, 2/3); squared deviations 5/9 + 32/9 + 29/9 = 22/3; errors 0 + 1 + (1 + 4) = 6
    assert m.rows == 3
    assert m.fvu == pytest.approx(6 / (22 / 3))
    assert m.explained_variance == pytest.approx(1 - 9 / 11)
    assert m.mse == pytest.approx(6 / 6)
    # cosines 1, 1 and (3*2) / (3 * sqrt(8)); norm ratios 1, 1/2, sqrt(8)/3
    assert m.cosine == pytest.approx((2 + 1 / math.sqrt(2)) / 3)
    assert m.shrinkage == pytest.approx((1 + 0.5 + math.sqrt(8) / 3) / 3)
    # gamma = sum |x_hat|^2 / sum <x_hat, x> = (1 + 1 + 8) / (1 + 2 + 6)
    assert m.relative_reconstruction_bias == pytest.approx(10 / 9)
    assert m.l0 == pytest.approx(4 / 3)  # the exact zero is not active
    assert m.dead_fraction == 0.5  # latents 2 and 3
    assert m.dense_fraction == 0.5  # latents 0 and 1 fire on 2/3 > 0.5 of the rows
    stats = acc.latent_stats()
    assert stats.fires.tolist() == [2, 2, 0, 0]
    assert stats.max.tolist() == [2.0, 1.0, 0.0, 0.0]
    assert stats.mean_when_active.tolist() == pytest.approx([1.5, 0.75, 0.0, 0.0])
    # 3 rows resolve densities down to 10^-0.48: bins [-0.5, -0.25) and [-0.25, 0]
    hist = m.density_histogram
    assert hist.log10_edges == [-0.5, -0.25, 0.0]
    assert hist.counts == [0, 2]  # log10(2/3) = -0.18
    assert hist.dead == 2


def test_density_histogram_bins():
    fires = torch.tensor([0, 1, 10, 100, 1000, 0])
    hist = density_histogram(fires, 1000, bin_width=1.0)
    assert hist.log10_edges == [-3.0, -2.0, -1.0, 0.0]
    assert hist.counts == [1, 1, 2]  # 1e-3; 1e-2; 1e-1 and 1 (the top edge is in the last bin)
    assert hist.dead == 2


def test_batching_does_not_change_the_metrics():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 8, generator=g) * 3 + 5
    sae = random_dictionary(8, 32, 4)
    whole, _ = evaluate_reconstruction(sae, [x])
    split, _ = evaluate_reconstruction(sae, x.split(37))
    for field in ("fvu", "mse", "cosine", "l0", "shrinkage", "relative_reconstruction_bias"):
        assert getattr(split, field) == pytest.approx(getattr(whole, field), rel=1e-9), field
    assert split.density_histogram == whole.density_histogram


def test_max_rows_cuts_the_last_batch():
    x = torch.randn(100, 4)
    metrics, stats = evaluate_reconstruction(random_dictionary(4, 8, 2), x.split(30), max_rows=45)
    assert metrics.rows == 45 and stats.rows == 45


def test_mean_only_dictionary_scores_fvu_one():
    x = torch.randn(400, 6) + torch.arange(6.0)
    sae = identity_dictionary(6)
    with torch.no_grad():  # every latent off; the decoder bias is the data's mean
        sae.b_enc.fill_(-1e6)
        sae.b_dec.copy_(x.mean(0))
    metrics, _ = evaluate_reconstruction(sae, [x])
    assert metrics.fvu == pytest.approx(1.0, rel=1e-6)
    assert metrics.dead_fraction == 1.0 and metrics.l0 == 0.0


def _one_hot_cache(tmp_path, n=64, seq=6, vocab=8):
    ids = torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(3))
    cfg = CacheConfig(
        hookpoints=["embed"],
        output_dir=str(tmp_path / "cache"),
        batch_size=16,
        rows_per_shard=128,
        shuffle_buffer_rows=256,
        dtype="float32",
        progress=False,
    )
    cache_activations(CustomAdapter(one_hot_tokens(vocab), name="onehot"), ids, cfg)
    return tmp_path / "cache", ids


@pytest.mark.parametrize("architecture", ["relu", "topk"])
def test_perfect_dictionary_scores_fvu_zero_on_a_cache(tmp_path, architecture):
    cache, ids = _one_hot_cache(tmp_path)
    sae = identity_dictionary(8, hookpoint="embed", architecture=architecture)
    result = evaluate_on_cache(sae, cache, batch_size=50)
    m = result.reconstruction
    assert m.rows == ids.numel()
    assert m.fvu == 0.0 and m.mse == 0.0 and m.explained_variance == 1.0
    assert m.cosine == pytest.approx(1.0) and m.shrinkage == pytest.approx(1.0)
    assert m.l0 == 1.0  # one-hot rows: one positive coordinate each
    # latents 0-7 fire where their token occurs; 8-15 (negative parts) never fire
    counts = torch.bincount(ids.flatten(), minlength=8)
    assert result.latents.fires.tolist() == counts.tolist() + [0] * 8
    assert m.dead_fraction == 0.5
    assert result.data["rows"] == ids.numel() and result.data["hookpoint"] == "embed"


def test_a_lossy_dictionary_scores_between(tmp_path):
    cache, _ = _one_hot_cache(tmp_path)
    m = evaluate_on_cache(random_dictionary(8, 16, 2, hookpoint="embed"), cache).reconstruction
    assert 0.0 < m.fvu < 10.0 and m.l0 <= 2.0


def test_wrong_width_is_refused(tmp_path):
    cache, _ = _one_hot_cache(tmp_path)
    with pytest.raises(ValueError, match="width 8 but the dictionary reads d_in=5"):
        evaluate_on_cache(identity_dictionary(5), cache)


def test_empty_source_is_refused():
    with pytest.raises(ValueError, match="no rows were evaluated"):
        evaluate_reconstruction(identity_dictionary(3), [])
