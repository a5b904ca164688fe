"""The trainer: recovery of known features, resume == uninterrupted, bad input, bookkeeping."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from saekit.configuration import ConfigError
from saekit.dictionaries import SAEConfig, load_dictionary
from saekit.sources import ArraySource, DataError, open_array
from saekit.synthetic import mean_max_cosine
from saekit.training import NonFiniteError, TrainConfig, Trainer
from saekit.training.logging import read_metrics
from saekit.training.trainer import lr_factor


def _train_cfg(**overrides) -> TrainConfig:
    base = dict(batch_size=256, lr_warmup_steps=5, log_every=5, progress=False, checkpoint_every=0)
    return TrainConfig(**{**base, **overrides})


def _params(sae):
    return {k: v.detach().clone() for k, v in sae.state_dict().items()}


def test_topk_recovers_known_features(sparse_data):
    """The easy setting: 48 features in 24 dimensions, 3 per row, a 2x wider TopK dictionary."""
    source = ArraySource(sparse_data.activations, 256, epochs=10)
    (result,) = Trainer([SAEConfig(k=3, d_sae=96)], _train_cfg(epochs=10), source).fit()
    assert mean_max_cosine(result.sae.W_dec.detach(), sparse_data.features) > 0.95
    assert result.metrics["explained_variance"] > 0.7


def test_several_dictionaries_in_one_pass_equal_separate_runs(sparse_data):
    cfgs = [SAEConfig(k=3, d_sae=48, seed=0), SAEConfig(k=5, d_sae=32, seed=1)]
    data = sparse_data.activations[:3000]
    together = Trainer(cfgs, _train_cfg(), ArraySource(data, 256)).fit()
    for cfg, joint in zip(cfgs, together, strict=True):
        (alone,) = Trainer([cfg], _train_cfg(), ArraySource(data, 256)).fit()
        for name, value in _params(alone.sae).items():
            torch.testing.assert_close(_params(joint.sae)[name], value, rtol=0, atol=0)


class _Crash(Exception):
    pass


class _CrashingSource(ArraySource):
    """Raises after ``crash_after`` batches: a run killed in the middle of its work."""

    crash_after = 10**9

    def __iter__(self):
        for i, batch in enumerate(super().__iter__()):
            if i == self.crash_after:
                raise _Crash
            yield batch


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "jumprelu"])
def test_killed_run_resumes_to_the_same_dictionary(tmp_path, sparse_data, arch):
    data = sparse_data.activations[:6000]
    cfgs = [SAEConfig(architecture=arch, k=3, d_sae=48)]
    train = _train_cfg(checkpoint_every=4, epochs=2, dead_tokens=1000)

    (reference,) = Trainer(cfgs, train, ArraySource(data, 256, epochs=2), tmp_path / "a").fit()

    crashing = _CrashingSource(data, 256, epochs=2)
    crashing.crash_after = 30  # past the first epoch, between checkpoints 28 and 32
    with pytest.raises(_Crash):
        Trainer(cfgs, train, crashing, tmp_path / "b").fit()
    assert not (tmp_path / "b" / "index.json").exists()
    (resumed,) = Trainer(
        cfgs, train, ArraySource(data, 256, epochs=2), tmp_path / "b", resume=True
    ).fit()

    for name, value in _params(reference.sae).items():
        torch.testing.assert_close(_params(resumed.sae)[name], value, rtol=0, atol=0)
    # The metrics file reads as one uninterrupted run.
    steps_a = [r["step"] for r in read_metrics(tmp_path / "a" / "metrics.jsonl")]
    steps_b = [r["step"] for r in read_metrics(tmp_path / "b" / "metrics.jsonl")]
    assert steps_a == steps_b


def test_existing_run_is_not_overwritten_without_resume(tmp_path, sparse_data):
    data = sparse_data.activations[:1000]
    Trainer(
        [SAEConfig(k=3, d_sae=48)], _train_cfg(checkpoint_every=2), ArraySource(data, 256), tmp_path
    ).fit()
    with pytest.raises(FileExistsError, match="--resume"):
        Trainer([SAEConfig(k=3, d_sae=48)], _train_cfg(), ArraySource(data, 256), tmp_path).fit()


def test_resume_with_a_different_config_is_refused(tmp_path, sparse_data):
    data = sparse_data.activations[:1000]
    Trainer(
        [SAEConfig(k=3, d_sae=48)], _train_cfg(checkpoint_every=2), ArraySource(data, 256), tmp_path
    ).fit()
    with pytest.raises(RuntimeError, match=r"differs from the checkpoint's in saes\[0\]\.k"):
        Trainer(
            [SAEConfig(k=4, d_sae=48)],
            _train_cfg(checkpoint_every=2),
            ArraySource(data, 256),
            tmp_path,
            resume=True,
        ).fit()


def test_longer_run_resumes_from_the_end_of_a_shorter_one(tmp_path, sparse_data):
    data = sparse_data.activations[:4000]
    cfgs = [SAEConfig(k=3, d_sae=48)]
    source = lambda: ArraySource(data, 256, epochs=None)  # noqa: E731
    (full,) = Trainer(
        cfgs,
        _train_cfg(max_steps=20, checkpoint_every=7, lr_decay="none"),
        source(),
        tmp_path / "a",
    ).fit()
    Trainer(
        cfgs,
        _train_cfg(max_steps=12, checkpoint_every=7, lr_decay="none"),
        source(),
        tmp_path / "b",
    ).fit()
    (extended,) = Trainer(
        cfgs,
        _train_cfg(max_steps=20, checkpoint_every=7, lr_decay="none"),
        source(),
        tmp_path / "b",
        resume=True,
    ).fit()
    for name, value in _params(full.sae).items():
        torch.testing.assert_close(_params(extended.sae)[name], value, rtol=0, atol=0)


def test_outputs_metrics_and_index(tmp_path, sparse_data):
    data = sparse_data.activations[:3000]
    cfgs = [
        SAEConfig(k=3, d_sae=48, hookpoint="layers.3"),
        SAEConfig(k=6, d_sae=48, hookpoint="layers.3"),
    ]
    results = Trainer(cfgs, _train_cfg(), ArraySource(data, 256), tmp_path).fit()
    index = json.loads((tmp_path / "index.json").read_text())
    assert [e["path"] for e in index["dictionaries"]] == [r.name for r in results]
    assert [r.name for r in results] == ["layers.3.topk-k3-x2-s0", "layers.3.topk-k6-x2-s0"]
    for r in results:
        loaded = load_dictionary(r.path)
        assert loaded.cfg.hookpoint == "layers.3"
        assert torch.equal(loaded(data[:10]), r.sae(data[:10]))
    records = read_metrics(tmp_path / "metrics.jsonl")
    last = records[-1]
    for key in (
        "fvu",
        "explained_variance",
        "mse",
        "l0",
        "dead_fraction",
        "cosine",
        "density_histogram",
        "lr",
    ):
        assert key in last, key
    hist = last["density_histogram"]
    assert sum(hist["counts"]) + hist["never_fired"] == 48
    assert last["l0"] == pytest.approx(6.0, abs=0.01)
    assert (tmp_path / "run.json").exists()


def test_auxk_applies_once_latents_are_dead(sparse_data):
    """Latents that did not fire in step 1 count as dead in step 2 (dead_tokens=1): the AuxK term
    then enters the loss and changes the result; with auxk_alpha=0 it never does. (Random latents:
    started on data rows, every latent fires in step 1.)"""
    data = sparse_data.activations[:512]

    def run(auxk_alpha):
        cfg = _train_cfg(
            dead_tokens=1,
            auxk_alpha=auxk_alpha,
            lr_warmup_steps=0,
            max_steps=2,
            log_every=1,
            latent_init="random",
        )
        trainer = Trainer([SAEConfig(k=1, d_sae=48)], cfg, ArraySource(data, 256, shuffle=False))
        (result,) = trainer.fit()
        return trainer, result

    trainer, with_aux = run(1 / 32)
    _, without = run(0.0)
    assert "auxk" in with_aux.metrics and with_aux.metrics["auxk"] > 0
    assert "auxk" not in without.metrics
    assert not torch.equal(with_aux.sae.W_enc, without.sae.W_enc)
    # Dead-latent bookkeeping: a latent's counter is the tokens since it last fired.
    counter = trainer.slots[0].tokens_since_fired
    assert set(counter.unique().tolist()) <= {0, 256, 512}
    assert with_aux.metrics["dead_fraction"] == pytest.approx((counter >= 1).float().mean().item())


def test_nan_batches_are_skipped_and_counted(sparse_data):
    data = sparse_data.activations[:2048].clone()
    data[700, 3] = float("nan")
    source = ArraySource(data, 256, shuffle=False)
    (result,) = Trainer([SAEConfig(k=3, d_sae=48)], _train_cfg(log_every=100), source).fit()
    assert result.metrics["skipped_batches"] == 1
    assert all(torch.isfinite(p).all() for p in result.sae.parameters())


def test_nan_batches_stop_the_run_with_the_batch_index(sparse_data):
    data = sparse_data.activations[:2048].clone()
    data[700, 3] = float("inf")
    source = ArraySource(data, 256, shuffle=False)
    with pytest.raises(
        NonFiniteError, match=r"batch 2 holds NaN or infinite activations .* first at row 188"
    ):
        Trainer([SAEConfig(k=3, d_sae=48)], _train_cfg(nan_policy="stop"), source).fit()


def test_too_many_bad_batches_stop_the_run(sparse_data):
    data = sparse_data.activations[:2048].clone()
    data[::100] = float("nan")
    with pytest.raises(NonFiniteError, match="max_skipped_batches"):
        Trainer(
            [SAEConfig(k=3, d_sae=48)], _train_cfg(max_skipped_batches=2), ArraySource(data, 256)
        ).fit()


def test_d_in_mismatch(sparse_data):
    with pytest.raises(ConfigError, match="d_in=16 but the activations have width 24"):
        Trainer(
            [SAEConfig(d_in=16, k=3)], _train_cfg(), ArraySource(sparse_data.activations, 256)
        ).fit()


def test_batches_of_changing_width_are_refused():
    batches = [torch.randn(64, 8), torch.randn(64, 9)]
    with pytest.raises(DataError, match="batch 1 has width 9 but the run trains on d_in=8"):
        Trainer([SAEConfig(k=2, d_sae=16)], _train_cfg(), batches).fit()


def test_empty_inputs_are_refused(tmp_path):
    with pytest.raises(DataError, match="holds no activations"):
        ArraySource(torch.empty(0, 8), 16)
    with pytest.raises(DataError, match="yielded no batch"):
        Trainer([SAEConfig(k=2)], _train_cfg(), iter([])).fit()
    np.save(tmp_path / "empty.npy", np.zeros((0, 8), dtype=np.float32))
    with pytest.raises(DataError, match="holds no activations"):
        ArraySource(open_array(tmp_path / "empty.npy"), 16)


def test_truncated_files_are_detected(tmp_path):
    np.save(tmp_path / "a.npy", np.random.rand(100, 8).astype(np.float32))
    raw = (tmp_path / "a.npy").read_bytes()
    (tmp_path / "a.npy").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="truncated"):
        open_array(tmp_path / "a.npy")
    from safetensors.torch import save_file

    save_file({"acts": torch.randn(100, 8)}, str(tmp_path / "a.safetensors"))
    raw = (tmp_path / "a.safetensors").read_bytes()
    (tmp_path / "a.safetensors").write_bytes(raw[:-64])
    with pytest.raises(DataError, match="truncated"):
        open_array(tmp_path / "a.safetensors")


def test_unwritable_output_directory_fails_before_training(tmp_path, sparse_data):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(PermissionError, match="cannot write to output directory"):
        Trainer(
            [SAEConfig(k=3)],
            _train_cfg(),
            ArraySource(sparse_data.activations, 256),
            blocker / "out",
        ).fit()


def test_contradictory_train_configs_are_refused():
    with pytest.raises(ConfigError, match="batch_size must be at least 1"):
        TrainConfig(batch_size=0)
    with pytest.raises(ConfigError, match="lr must be in"):
        TrainConfig(lr=3.0)
    with pytest.raises(ConfigError, match="k=64 is larger than d_sae=32"):
        SAEConfig(k=64, d_sae=32)


def test_learning_rate_schedule():
    cfg = TrainConfig(
        lr_warmup_steps=10, lr_warmup_fraction=1.0, lr_decay="linear", lr_decay_start=0.5
    )
    assert lr_factor(0, cfg, 100) == pytest.approx(0.1)
    assert lr_factor(9, cfg, 100) == pytest.approx(1.0)
    assert lr_factor(50, cfg, 100) == pytest.approx(1.0)
    assert lr_factor(75, cfg, 100) == pytest.approx(0.5)
    cosine = TrainConfig(lr_warmup_steps=0, lr_decay="cosine", lr_decay_start=0.0)
    assert lr_factor(50, cosine, 100) == pytest.approx(0.5)
    assert lr_factor(10, TrainConfig(lr_warmup_steps=0, lr_decay="none"), None) == 1.0
    assert TrainConfig().learning_rate(2**14) == pytest.approx(2e-4)


def test_warmup_scales_with_the_run_and_a_short_run_warns(sparse_data, caplog):
    cfg = TrainConfig(lr_warmup_steps=1000, lr_warmup_fraction=0.01)
    assert cfg.warmup_steps(256) == 3  # 1% of a short run
    assert cfg.warmup_steps(10**6) == 1000  # the cap of a long one
    assert cfg.warmup_steps(None) == 1000  # length unknown
    assert lr_factor(2, cfg, 256) == 1.0
    # A source of unknown length that ends before the warm-up does says so.
    batches = [sparse_data.activations[i : i + 256] for i in range(0, 1280, 256)]
    train = TrainConfig(
        batch_size=256, lr_warmup_steps=200, progress=False, checkpoint_every=0, log_every=5
    )
    with caplog.at_level("WARNING", logger="saekit.train"):
        Trainer([SAEConfig(k=4, d_sae=64)], train, iter(batches)).fit()
    assert "before its 200-step learning-rate warm-up" in caplog.text
    assert TrainConfig().learning_rate(2**16) == pytest.approx(1e-4)
    assert math.isclose(TrainConfig(lr=0.01).learning_rate(10), 0.01)


def test_wandb_disabled_mode_still_writes_local_metrics(tmp_path, sparse_data, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    data = sparse_data.activations[:1024]
    Trainer(
        [SAEConfig(k=3, d_sae=48)],
        _train_cfg(),
        ArraySource(data, 256),
        tmp_path / "run",
        wandb_project="saekit-test",
    ).fit()
    assert read_metrics(tmp_path / "run" / "metrics.jsonl")
