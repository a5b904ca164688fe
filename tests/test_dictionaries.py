"""Dictionaries: training forward/backward against plain references, save/load, conversion."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from saekit.dictionaries import (
    BatchTopKSAE,
    SAEConfig,
    StepContext,
    build_dictionary,
    load_dictionary,
    save_dictionary,
)
from saekit.kernels import batch_topk_encode
from saekit.sources import ArraySource
from saekit.training import TrainConfig, Trainer


def _sae(arch: str, d=12, m=40, k=4, seed=0, dtype=torch.float64):
    sae = build_dictionary(SAEConfig(architecture=arch, k=k, d_sae=m, seed=seed).resolved(d)).to(
        dtype
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # non-trivial biases so that every term of the math is exercised
        sae.b_enc.copy_(0.1 * torch.randn(m, generator=g))
        sae.b_dec.copy_(0.3 * torch.randn(d, generator=g))
    return sae


def _dense_reference_loss(sae, x, arch, ctx):
    """The same loss written densely with plain autograd (no custom kernels)."""
    pre = (x - sae.b_dec) @ sae.W_enc.T + sae.b_enc
    if arch == "topk":
        vals, idx = pre.relu().topk(sae.cfg.k, dim=1)
        z = torch.zeros_like(pre).scatter(1, idx, vals)
    elif arch == "relu":
        z = pre.relu()
    else:
        raise AssertionError(arch)
    recon = z @ sae.W_dec + sae.b_dec
    loss = (x - recon).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    if arch == "relu":
        loss = loss + ctx.sparsity_coefficient * (z * sae.W_dec.norm(dim=1)).sum(1).mean()
    return loss


@pytest.mark.parametrize("arch", ["topk", "relu"])
def test_training_gradients_match_dense_autograd(arch):
    x = torch.randn(33, 12, dtype=torch.float64)
    ctx = StepContext(sparsity_coefficient=0.05)
    ours = _sae(arch)
    ref = _sae(arch)
    ours.training_forward(x, ctx).loss.backward()
    _dense_reference_loss(ref, x, arch, ctx).backward()
    for (name, a), (_, b) in zip(ours.named_parameters(), ref.named_parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, msg=f"gradient of {name}")


def test_topk_auxk_loss_gradient_matches_dense_autograd():
    x = torch.randn(40, 12, dtype=torch.float64)
    dead = torch.tensor([1, 5, 9, 13, 17, 21, 30])
    ctx = StepContext(dead_latents=dead, k_aux=3, auxk_alpha=0.5)
    ours, ref = _sae("topk"), _sae("topk")
    ours.training_forward(x, ctx).loss.backward()

    pre = ((x - ref.b_dec) @ ref.W_enc.T + ref.b_enc).relu()
    vals, idx = pre.topk(4, dim=1)
    z = torch.zeros_like(pre).scatter(1, idx, vals)
    recon = z @ ref.W_dec + ref.b_dec
    main = (x - recon).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    masked = torch.full_like(pre, -torch.inf)
    masked[:, dead] = pre[:, dead]
    av, ai = masked.topk(3, dim=1)
    z_aux = torch.zeros_like(pre).scatter(1, ai, av)
    residual = (x - recon).detach()
    aux = (residual - z_aux @ ref.W_dec).pow(2).sum() / (residual - residual.mean(0)).pow(2).sum()
    scale = min(dead.numel() / 3, 1.0)
    (main + 0.5 * scale * aux).backward()
    for (name, a), (_, b) in zip(ours.named_parameters(), ref.named_parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, msg=f"gradient of {name}")
    # The dead latents' encoder rows learn only through AuxK: they must have moved.
    assert ours.W_enc.grad[dead].abs().sum() > 0


def test_jumprelu_forward_matches_definition():
    sae = _sae("jumprelu")
    sae.set_threshold(torch.rand(40, dtype=torch.float64) * 0.3)
    x = torch.randn(20, 12, dtype=torch.float64)
    pre = (x - sae.b_dec) @ sae.W_enc.T + sae.b_enc
    z = torch.where(pre > sae.threshold, pre, 0)
    torch.testing.assert_close(sae.encode_dense(x), z.detach())
    torch.testing.assert_close(sae(x), (z @ sae.W_dec + sae.b_dec).detach())


@pytest.mark.parametrize("arch", ["topk", "jumprelu", "relu"])
def test_save_load_round_trip(tmp_path, arch):
    sae = _sae(arch, dtype=torch.float32)
    if arch == "jumprelu":
        sae.set_threshold(0.2)
    save_dictionary(sae, tmp_path / "d")
    loaded = load_dictionary(tmp_path / "d")
    assert type(loaded) is type(sae) and loaded.cfg == sae.cfg
    x = torch.randn(16, 12)
    assert torch.equal(loaded(x), sae(x))
    assert torch.equal(loaded.encode_dense(x), sae.encode_dense(x))
    cfg = json.loads((tmp_path / "d" / "cfg.json").read_text())
    assert cfg["format"] == "saekit" and cfg["format_version"] == 1 and cfg["d_in"] == 12


def test_bfloat16_storage(tmp_path):
    sae = _sae("topk", dtype=torch.float32)
    sae.cfg.dtype = "bfloat16"
    save_dictionary(sae, tmp_path / "d")
    loaded = load_dictionary(tmp_path / "d")
    assert loaded.dtype == torch.bfloat16
    torch.testing.assert_close(loaded.W_dec.float(), sae.W_dec.detach(), atol=1e-2, rtol=1e-2)


def test_folded_normalisation_gives_same_function_on_raw_inputs():
    sae = _sae("topk", dtype=torch.float64)
    x = torch.randn(25, 12, dtype=torch.float64) * 7.0
    scale = 0.37
    expected = sae(x * scale) / scale
    expected_latents = sae.encode_dense(x * scale)
    sae.fold_input_scale(scale)
    torch.testing.assert_close(sae(x), expected)
    torch.testing.assert_close(sae.encode_dense(x), expected_latents)
    assert sae.cfg.input_scale == pytest.approx(scale)


def test_batchtopk_converts_to_jumprelu_with_same_outputs_on_training_data(sparse_data):
    data = sparse_data.activations
    train = TrainConfig(
        batch_size=512, epochs=2, lr_warmup_steps=10, progress=False, checkpoint_every=0
    )
    cfg = SAEConfig(architecture="batchtopk", k=3, d_sae=48)
    (result,) = Trainer([cfg], train, ArraySource(data, 512, epochs=2)).fit()
    jump = result.sae
    assert jump.architecture == "jumprelu" and jump.cfg.trained_as == "batchtopk"

    # The same weights with the batch-level selection, on batches of the training distribution.
    trained = result.sae
    batch_sae = BatchTopKSAE(SAEConfig(architecture="batchtopk", k=3, d_sae=48).resolved(24))
    batch_sae.load_state_dict(
        {k: v for k, v in trained.state_dict().items() if k != "threshold"}, strict=False
    )
    x = data[:2048]
    with torch.no_grad():
        codes, _ = batch_topk_encode(x - batch_sae.b_dec, batch_sae.W_enc, batch_sae.b_enc, 3)
        batch_recon = batch_sae.decode(codes)
        jump_recon = jump(x)
        jump_l0 = jump.encode(x).l0().float().mean().item()
    assert abs(jump_l0 - 3) < 0.6, (
        f"the global threshold should give about k=3 latents per row, got {jump_l0}"
    )
    fvu_batch = ((x - batch_recon).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()
    fvu_jump = ((x - jump_recon).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()
    assert abs(fvu_jump - fvu_batch) < 0.05
    agree = F.cosine_similarity(jump_recon, batch_recon, dim=1).mean().item()
    assert agree > 0.97


def test_saving_an_unconverted_batchtopk_is_refused(tmp_path):
    sae = _sae("batchtopk", dtype=torch.float32)
    with pytest.raises(ValueError, match="for_inference"):
        save_dictionary(sae, tmp_path / "d")
    with pytest.raises(RuntimeError, match="not been trained"):
        sae(torch.randn(2, 12))


# ----------------------------------------------------------------------------- bad files


@pytest.fixture
def saved(tmp_path):
    sae = _sae("topk", dtype=torch.float32)
    return save_dictionary(sae, tmp_path / "d")


def _edit_cfg(path, **changes):
    cfg = json.loads((path / "cfg.json").read_text())
    cfg.update(changes)
    (path / "cfg.json").write_text(json.dumps(cfg))


def test_truncated_weights_are_refused(saved):
    file = saved / "sae.safetensors"
    file.write_bytes(file.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_dictionary(saved)


def test_config_with_wrong_d_in_is_refused(saved):
    _edit_cfg(saved, d_in=13)
    with pytest.raises(
        ValueError, match=r"W_enc has shape \(40, 12\), but the config implies \(40, 13\)"
    ):
        load_dictionary(saved)


def test_unknown_architecture_is_refused(saved):
    _edit_cfg(saved, architecture="gated")
    with pytest.raises(
        ValueError, match="architecture must be one of 'topk', 'batchtopk', 'jumprelu', 'relu'"
    ):
        load_dictionary(saved)


def test_newer_format_and_foreign_configs_are_refused(saved):
    _edit_cfg(saved, format_version=99)
    with pytest.raises(ValueError, match="Upgrade saekit"):
        load_dictionary(saved)
    _edit_cfg(saved, format="sparsify", format_version=1)
    with pytest.raises(ValueError, match="not a saekit dictionary config"):
        load_dictionary(saved)


def test_unknown_config_field_is_refused(saved):
    _edit_cfg(saved, wibble=3)
    with pytest.raises(ValueError, match="unknown field"):
        load_dictionary(saved)


def test_missing_and_extra_tensors_are_refused(saved):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(saved / "sae.safetensors"))
    tensors["surprise"] = torch.zeros(3)
    save_file(tensors, str(saved / "sae.safetensors"))
    with pytest.raises(ValueError, match=r"unexpected tensors \['surprise'\]"):
        load_dictionary(saved)


def test_non_finite_weights_are_refused(saved):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(saved / "sae.safetensors"))
    tensors["b_dec"][0] = float("nan")
    save_file(tensors, str(saved / "sae.safetensors"))
    with pytest.raises(ValueError, match="NaN"):
        load_dictionary(saved)


def test_missing_folder_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no dictionary folder"):
        load_dictionary(tmp_path / "nope")


def test_config_contradictions_are_refused():
    from saekit.configuration import ConfigError

    with pytest.raises(ConfigError, match="larger than d_sae"):
        SAEConfig(k=50, d_sae=40)
    with pytest.raises(ConfigError, match="d_in=16 but the activations have width 12"):
        SAEConfig(d_in=16).resolved(12)
