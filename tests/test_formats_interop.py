"""Interop with the real libraries from PyPI: dictionaries saved by sae-lens and by eai-sparsify
load in saekit with the same encode and decode outputs on random inputs, and dictionaries that
saekit exports load in sae-lens with the same outputs."""

from __future__ import annotations

import os

os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # sparsify's Triton decoder needs a GPU

import pytest
import torch
from sae_lens import SAE, JumpReLUSAEConfig, StandardSAEConfig, TopKSAEConfig
from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
from sparsify import SparseCoder, SparseCoderConfig

import saekit
from saekit.cli import main
from saekit.dictionaries import SAEConfig, build_dictionary, save_dictionary, write_index

D, M = 16, 48
TOL = {"rtol": 1e-5, "atol": 2e-5}


def _randomise(module: torch.nn.Module, seed: int) -> None:
    """Non-trivial values in every parameter, so that each bias and fold is exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(module.named_parameters()):
            param.copy_(torch.randn(param.shape, generator=g, dtype=torch.float64).to(param.dtype))


def _inputs(seed: int = 0, n: int = 256) -> torch.Tensor:
    return 2 * torch.randn(n, D, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "config",
    [
        StandardSAEConfig(d_in=D, d_sae=M, apply_b_dec_to_input=False),
        TopKSAEConfig(
            d_in=D, d_sae=M, k=6, rescale_acts_by_decoder_norm=True, apply_b_dec_to_input=False
        ),
        TopKSAEConfig(d_in=D, d_sae=M, k=6),
        JumpReLUSAEConfig(d_in=D, d_sae=M),
        JumpReLUSAEConfig(d_in=D, d_sae=M, dtype="float64", apply_b_dec_to_input=False),
    ],
    ids=["standard-no-bdec", "topk-rescaled-no-bdec", "topk", "jumprelu", "jumprelu-f64-no-bdec"],
)
def test_saelens_dictionaries_load_with_their_outputs(tmp_path, config):
    theirs = SAE.from_dict(config.to_dict())
    _randomise(theirs, seed=1)
    if config.architecture() == "jumprelu":  # some negative thresholds, the rest inside the range
        with torch.no_grad():
            theirs.threshold.uniform_(-1.0, 2.0)
    theirs.save_model(tmp_path)
    ours = saekit.load(tmp_path)
    x = _inputs().to(theirs.dtype)
    with torch.no_grad():
        z_theirs = theirs.encode(x)
        z_ours = ours.encode_dense(x)
        torch.testing.assert_close(z_ours, z_theirs.to(z_ours.dtype), **TOL)
        assert (z_ours > 0).sum() > 0.05 * z_ours.numel()  # the comparison is not of zeros
        torch.testing.assert_close(
            ours.decode_dense(z_ours), theirs.decode(z_theirs).float(), **TOL
        )
        torch.testing.assert_close(ours(x.float()), theirs(x).float(), **TOL)


def test_saelens_batchtopk_saved_for_inference_loads_as_its_jumprelu(tmp_path):
    theirs = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=D, d_sae=M, k=6))
    _randomise(theirs, seed=2)
    theirs.topk_threshold = torch.tensor(0.8, dtype=torch.double)
    theirs.save_inference_model(tmp_path)
    reference = SAE.load_from_disk(tmp_path)  # how SAELens itself reads it back
    ours = saekit.load(tmp_path)
    assert ours.cfg.architecture == "jumprelu"
    x = _inputs(seed=3)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_dense(x), reference.encode(x), **TOL)
        torch.testing.assert_close(ours(x), reference(x), **TOL)


def test_sparsify_dictionaries_load_with_their_outputs(tmp_path):
    coders = {}
    for i, hookpoint in enumerate(("layers.1", "layers.2")):
        coder = SparseCoder(D, SparseCoderConfig(k=6, num_latents=M))
        _randomise(coder, seed=10 + i)
        coder.save_to_disk(tmp_path / hookpoint)
        coders[hookpoint] = coder
    ours = saekit.load(tmp_path, "layers.2")
    assert ours.cfg.hookpoint == "layers.2" and ours.cfg.k == 6
    theirs = coders["layers.2"]
    x = _inputs(seed=4)
    with torch.no_grad():
        top_acts, top_indices, _ = theirs.encode(x)
        z_theirs = torch.zeros(len(x), M).scatter(1, top_indices, top_acts)
        torch.testing.assert_close(ours.encode_dense(x), z_theirs, **TOL)
        torch.testing.assert_close(ours(x), theirs.decode(top_acts, top_indices), **TOL)
        torch.testing.assert_close(ours(x), theirs(x).sae_out, **TOL)


def _saekit_dictionaries(root, d=D, m=M):
    saes = {}
    for name, arch in (("enc.topk", "topk"), ("enc.relu", "relu"), ("enc.jump", "jumprelu")):
        sae = build_dictionary(
            SAEConfig(architecture=arch, d_sae=m, k=5, hookpoint=name, model="tiny/model").resolved(
                d
            )
        )
        _randomise(sae, seed=len(saes) + 20)
        if arch == "jumprelu":
            with torch.no_grad():
                sae.threshold.uniform_(0.0, 2.0)
        save_dictionary(sae, root / name)
        saes[name] = sae
    write_index(root, {name: sae.cfg for name, sae in saes.items()})
    return saes


def test_saekit_export_loads_in_saelens_with_the_same_outputs(tmp_path, capsys):
    saes = _saekit_dictionaries(tmp_path / "run")
    code = main(
        [
            "export",
            str(tmp_path / "run"),
            "--format",
            "saelens",
            "--output_dir",
            str(tmp_path / "out"),
        ]
    )
    assert code == 0, capsys.readouterr().err
    x = _inputs(seed=5)
    for name, ours in saes.items():
        theirs = SAE.load_from_disk(tmp_path / "out" / name)
        assert (
            theirs.cfg.metadata.hook_name == name and theirs.cfg.metadata.model_name == "tiny/model"
        )
        with torch.no_grad():
            torch.testing.assert_close(theirs.encode(x), ours.encode_dense(x), **TOL)
            torch.testing.assert_close(theirs(x), ours(x), **TOL)
        # and back: the exported files load in saekit as the same dictionary
        torch.testing.assert_close(saekit.load(tmp_path / "out" / name)(x), ours(x), **TOL)
    # exporting again does not overwrite without --overwrite
    again = [
        "export",
        str(tmp_path / "run"),
        "--format",
        "saelens",
        "--output_dir",
        str(tmp_path / "out"),
    ]
    assert main(again) == 2
    assert "--overwrite" in capsys.readouterr().err
