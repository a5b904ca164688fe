"""Reading other libraries' dictionary files: sdxl-unbox and Prisma layouts written here from their
documented layouts, saekit's own format, and every refusal (pickles, truncation, wrong shapes,
unknown architectures, names that leave the folder, oversized files).

The interop tests against the real sae-lens and sparsify packages are in test_formats_interop.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import saekit
from saekit.dictionaries import SAEConfig, build_dictionary, save_dictionary, write_index
from saekit.hub import FormatError, UnsafeInputError, load_pretrained
from saekit.hub.safety import SIZE_SLACK_BYTES

D, M, K = 12, 40, 5


# ----------------------------------------------------------------------------- sdxl-unbox


def _write_unbox(
    folder: Path, d=D, m=M, k=K, seed=0, stats=True, extra: dict | None = None
) -> dict:
    """An sdxl-unbox checkpoint as its SAE.save_to_disk writes one (config.json + a torch.save of
    {"state_dict": ...}), plus the per-latent mean.pt / std.pt of the released checkpoints."""
    g = torch.Generator().manual_seed(seed)
    state = {
        "encoder.weight": torch.randn(m, d, generator=g),
        # nn.Linear(n_dirs, d_model).weight is (d_model, n_dirs); they store it column-major.
        "decoder.weight": torch.randn(m, d, generator=g).T,
        "pre_bias": torch.randn(d, generator=g),
        "latent_bias": 0.5 * torch.randn(m, generator=g),
        "stats_last_nonzero": torch.randint(0, 100, (m,), generator=g),
        **(extra or {}),
    }
    folder.mkdir(parents=True, exist_ok=True)
    config = {"n_dirs_local": m, "d_model": d, "k": k, "auxk": 8, "dead_steps_threshold": 100}
    (folder / "config.json").write_text(json.dumps(config))
    torch.save({"state_dict": state}, folder / "state_dict.pth")
    if stats:
        torch.save(torch.rand(m, generator=g) * 20, folder / "mean.pt")
        torch.save(torch.rand(m, generator=g) * 5, folder / "std.pt")
    return state


def _unbox_reference(state, k, x):
    """sdxl-unbox's documented math: relu of the top-k of (x - pre_bias) E^T + latent_bias, and the
    decoder Linear plus pre_bias."""
    pre = (x - state["pre_bias"]) @ state["encoder.weight"].T + state["latent_bias"]
    vals, inds = torch.topk(pre, k, dim=-1)
    z = torch.zeros_like(pre).scatter(-1, inds, vals.relu())
    return z, z @ state["decoder.weight"].T + state["pre_bias"]


def test_sdxl_unbox_checkpoint_loads_with_opt_in_and_reproduces_its_outputs(tmp_path):
    state = _write_unbox(tmp_path / "unet.down_blocks.2.attentions.1_k5" / "final")
    loaded = load_pretrained(
        tmp_path, "unet.down_blocks.2.attentions.1_k5/final", allow_pickle=True
    )
    x = torch.randn(64, D) * 3
    z_ref, recon_ref = _unbox_reference(state, K, x)
    torch.testing.assert_close(loaded.sae.encode_dense(x), z_ref)
    torch.testing.assert_close(loaded.sae(x), recon_ref, rtol=1e-5, atol=1e-5)
    assert loaded.origin.format == "sdxl-unbox"
    assert loaded.sae.cfg.capture == "update" and loaded.sae.cfg.k == K
    # mean.pt / std.pt are per-latent statistics, kept beside the dictionary, not folded into it
    assert set(loaded.latent_stats) == {"mean", "std"}
    assert loaded.latent_stats["mean"].shape == (M,)
    torch.testing.assert_close(
        loaded.latent_stats["mean"],
        torch.load(tmp_path / "unet.down_blocks.2.attentions.1_k5/final/mean.pt"),
    )


def test_pickles_are_refused_without_opt_in_before_anything_is_unpickled(tmp_path, monkeypatch):
    _write_unbox(tmp_path / "unbox")
    _write_prisma(tmp_path / "prisma")

    def forbidden(*args, **kwargs):
        raise AssertionError("torch.load was called without the opt-in")

    monkeypatch.setattr(torch, "load", forbidden)
    for folder in ("unbox", "prisma"):
        with pytest.raises(UnsafeInputError, match="allow_pickle=True"):
            saekit.load(tmp_path / folder)


class _RunsCode:
    """A pickled object whose unpickling would create a file (a stand-in for arbitrary code)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickle_holding_objects_is_refused_even_with_opt_in(tmp_path):
    marker = tmp_path / "pwned"
    _write_unbox(tmp_path / "evil", extra={"payload": _RunsCode(str(marker))})
    with pytest.raises(UnsafeInputError, match="weights_only"):
        saekit.load(tmp_path / "evil", allow_pickle=True)
    assert not marker.exists()


def test_sdxl_unbox_stats_of_the_wrong_shape_are_refused(tmp_path):
    _write_unbox(tmp_path / "u")
    torch.save(torch.zeros(D), tmp_path / "u" / "mean.pt")  # (d_model,) instead of (n_dirs,)
    with pytest.raises(
        FormatError, match=r"mean has shape \(12,\), but the config implies \(40,\)"
    ):
        saekit.load(tmp_path / "u", allow_pickle=True)


# ----------------------------------------------------------------------------- Prisma


def _write_prisma(
    folder: Path,
    d=D,
    expansion=3,
    activation="relu",
    k=None,
    normalize="none",
    name="n_images_2600058.pt",
    nested=False,
    seed=1,
) -> dict:
    """A Prisma SAE repository: config.json (VisionModelSAERunnerConfig as JSON) + a .pt state dict
    with W_enc (d_in, d_sae), W_dec (d_sae, d_in), b_enc, b_dec."""
    g = torch.Generator().manual_seed(seed)
    m = d * expansion
    state = {
        "W_enc": torch.randn(d, m, generator=g),
        "W_dec": torch.randn(m, d, generator=g),
        "b_enc": 0.3 * torch.randn(m, generator=g),
        "b_dec": torch.randn(d, generator=g),
    }
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "model_class_name": "HookedViT",
        "model_name": "open-clip:laion/CLIP-ViT-B-32-DataComp.XL-s13B-b90K",
        "hook_point_layer": 9,
        "layer_subtype": "hook_resid_post",
        "architecture": "standard",
        "expansion_factor": expansion,
        "is_transcoder": False,
        "d_in": d,
        "activation_fn_str": activation,
        "activation_fn_kwargs": {"k": k} if k else {},
        "cls_token_only": False,
        "normalize_activations": normalize,
        "_dtype": "float32",
        "_device": "cuda",
    }
    (folder / "config.json").write_text(json.dumps(config))
    torch.save({"state_dict": state} if nested else state, folder / name)
    return state


def _prisma_reference(state, x, k=None):
    """Prisma's documented math: act((x - b_dec) @ W_enc + b_enc), act = ReLU or TopK then ReLU."""
    pre = (x - state["b_dec"]) @ state["W_enc"] + state["b_enc"]
    if k is None:
        z = pre.relu()
    else:
        vals, inds = torch.topk(pre, k, dim=-1)
        z = torch.zeros_like(pre).scatter(-1, inds, vals.relu())
    return z, z @ state["W_dec"] + state["b_dec"]


@pytest.mark.parametrize(("activation", "k", "nested"), [("relu", None, False), ("topk", 4, True)])
def test_prisma_dictionary_reproduces_its_outputs(tmp_path, activation, k, nested):
    state = _write_prisma(tmp_path, activation=activation, k=k, nested=nested)
    loaded = load_pretrained(tmp_path, allow_pickle=True)
    x = torch.randn(50, D) * 2
    z_ref, recon_ref = _prisma_reference(state, x, k)
    torch.testing.assert_close(loaded.sae.encode_dense(x), z_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loaded.sae(x), recon_ref, rtol=1e-5, atol=1e-4)
    cfg = loaded.sae.cfg
    assert cfg.architecture == activation and cfg.d_sae == 3 * D
    assert cfg.hookpoint == "blocks.9.hook_resid_post"
    assert cfg.model == "open-clip:laion/CLIP-ViT-B-32-DataComp.XL-s13B-b90K"


def test_prisma_weights_file_must_be_named_when_there_are_several(tmp_path):
    _write_prisma(tmp_path, name="n_images_1000.pt")
    state = _write_prisma(tmp_path, name="n_images_2600058.pt", seed=7)
    with pytest.raises(
        FormatError, match=r"n_images_1000\.pt, n_images_2600058\.pt.*--weights_file"
    ):
        saekit.load(tmp_path, allow_pickle=True)
    sae = saekit.load(tmp_path, allow_pickle=True, weights_file="n_images_2600058.pt")
    torch.testing.assert_close(sae.W_dec, state["W_dec"])


def test_prisma_layer_norm_dictionary_is_refused_with_the_reason(tmp_path):
    _write_prisma(tmp_path, normalize="layer_norm")
    with pytest.raises(FormatError, match=r"layer_norm.*cannot reproduce"):
        saekit.load(tmp_path, allow_pickle=True)


# ----------------------------------------------------------------------------- saekit's own format


def _saekit_run(root: Path, arch: str = "topk", d=D, m=M, seed=0) -> dict:
    saes = {}
    for name, a in (("vision.layers.1", arch), ("vision.layers.2", "relu")):
        sae = build_dictionary(
            SAEConfig(architecture=a, d_sae=m, k=K, seed=seed, hookpoint=name).resolved(d)
        )
        with torch.no_grad():
            sae.b_enc.normal_()
            sae.b_dec.normal_()
        save_dictionary(sae, root / name, metrics={"fvu": 0.25})
        saes[name] = sae
    write_index(root, {name: sae.cfg for name, sae in saes.items()})
    return saes


def test_saekit_folders_load_through_saekit_load_unchanged(tmp_path):
    saes = _saekit_run(tmp_path)
    x = torch.randn(20, D)
    loaded = load_pretrained(tmp_path, "vision.layers.1")
    assert loaded.origin.format == "saekit"
    assert loaded.records["metrics"] == {"fvu": 0.25}
    torch.testing.assert_close(loaded.sae(x), saes["vision.layers.1"](x))
    # several dictionaries and no hookpoint: the message lists them
    with pytest.raises(
        FormatError, match=r"pick one with hookpoint=.*vision\.layers\.1, vision\.layers\.2"
    ):
        saekit.load(tmp_path)


# ----------------------------------------------------------------------------- refusals


def test_truncated_safetensors_is_detected(tmp_path):
    _saekit_run(tmp_path)
    weights = tmp_path / "vision.layers.1" / "sae.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 100])
    with pytest.raises(FormatError, match="truncated"):
        saekit.load(tmp_path, "vision.layers.1")


def test_a_config_with_the_wrong_d_in_is_refused_before_the_weights_are_used(tmp_path):
    _saekit_run(tmp_path)
    cfg_file = tmp_path / "vision.layers.1" / "cfg.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["d_in"] = D + 4
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(
        FormatError, match=rf"W_enc has shape \({M}, {D}\), but the config implies \({M}, {D + 4}\)"
    ):
        saekit.load(tmp_path, "vision.layers.1")


def test_unknown_architectures_are_refused(tmp_path):
    _saekit_run(tmp_path)
    cfg_file = tmp_path / "vision.layers.1" / "cfg.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "architecture": "mystery"}))
    with pytest.raises(FormatError, match=r"architecture.*mystery"):
        saekit.load(tmp_path, "vision.layers.1")
    # a SAELens gated SAE: a separate magnitude path that saekit cannot reproduce
    gated = tmp_path / "gated"
    gated.mkdir()
    (gated / "cfg.json").write_text(json.dumps({"architecture": "gated", "d_in": D, "d_sae": M}))
    save_file({"W_enc": torch.zeros(D, M)}, gated / "sae_weights.safetensors")
    with pytest.raises(FormatError, match="unknown or unsupported architecture 'gated'"):
        saekit.load(gated)
    # a config of no known format
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "cfg.json").write_text(json.dumps({"hidden": 3}))
    with pytest.raises(FormatError, match="not a dictionary in a format saekit reads"):
        saekit.load(tmp_path / "other")


@pytest.mark.parametrize(
    "hookpoint",
    ["../secrets", "vision/../../etc", "/etc/passwd", "a\\..\\b", "C:/Windows", "./", "a//b"],
)
def test_hookpoints_that_leave_the_folder_are_refused(tmp_path, hookpoint):
    (tmp_path / "run").mkdir()
    (tmp_path / "secrets").mkdir()
    with pytest.raises(UnsafeInputError, match="refusing"):
        load_pretrained(tmp_path / "run", hookpoint)
    # the same check runs before anything is asked of the Hub
    from saekit.hub.remote import HubFolder

    with pytest.raises(UnsafeInputError, match="refusing"):
        HubFolder("owner/repo", hookpoint)


def test_a_file_far_larger_than_its_config_implies_is_refused(tmp_path):
    _saekit_run(tmp_path)
    weights = tmp_path / "vision.layers.1" / "sae.safetensors"
    with open(weights, "ab") as handle:  # pad past what d_in x d_sae can justify
        handle.truncate(weights.stat().st_size + SIZE_SLACK_BYTES + 8 * 2 * D * M + 1)
    with pytest.raises(UnsafeInputError, match="far more than its config implies"):
        saekit.load(tmp_path, "vision.layers.1")
    # the same for a pickle, which is checked before it is opened
    _write_unbox(tmp_path / "unbox")
    state = tmp_path / "unbox" / "state_dict.pth"
    with open(state, "ab") as handle:
        handle.truncate(state.stat().st_size + SIZE_SLACK_BYTES + 8 * 3 * D * M)
    with pytest.raises(UnsafeInputError, match="far more than its config implies"):
        saekit.load(tmp_path / "unbox", allow_pickle=True)


def test_an_oversized_config_is_not_parsed(tmp_path):
    (tmp_path / "cfg.json").write_text("{" + " " * (2**20 + 10) + "}")
    with pytest.raises(UnsafeInputError, match="small JSON object"):
        saekit.load(tmp_path)


def test_a_source_that_is_nothing_known_gets_a_clear_error(tmp_path):
    with pytest.raises(
        FileNotFoundError, match="not a local folder, a known release, or a Hub repository"
    ):
        saekit.load(str(tmp_path / "missing" / "deeper" / "x"))


def test_row_block_folds_equal_the_whole_matrix_computation(monkeypatch):
    from saekit.hub.formats import common

    monkeypatch.setattr(common, "ROW_BLOCK", 3)  # several blocks, the last one short
    W = torch.randn(10, 4, dtype=torch.bfloat16)
    v, s = torch.randn(4, dtype=torch.float64), torch.rand(10, dtype=torch.float64) + 0.5
    torch.testing.assert_close(common.row_dot(W, v), W.double() @ v)
    torch.testing.assert_close(common.row_norms(W), W.double().norm(dim=1))
    scaled = common.scale_rows(W.T.contiguous().T, s)  # a strided view, as a transposed W_enc is
    assert scaled.dtype == torch.bfloat16
    torch.testing.assert_close(scaled, (W.double() * s[:, None]).to(torch.bfloat16))
