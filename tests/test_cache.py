"""The activation cache's capture and writer: rows equal the hooked tensors exactly, several
hookpoints in one pass, early stop, the adapter seam (feature maps, diffusion steps, CFG halves,
streams), subsampling, refusal of another config's directory, kill-and-resume, bad inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_cache_support import (
    SEQ,
    WIDTH,
    ToyDiffusionAdapter,
    ToyVLMAdapter,
    read_all,
    reference_outputs,
    tiny_transformer,
    token_inputs,
)

from saekit.adapters import COND, UNCOND, CustomAdapter, ForwardContext, rows_from_last_dim
from saekit.cache import (
    CacheConfig,
    CacheError,
    ImageFolder,
    ImagePromptPairs,
    PromptFile,
    RowFilter,
    cache_activations,
    load_manifest,
    resolve_hookpoints,
)
from saekit.configuration import ConfigError


def _cfg(tmp_path, name="cache", **overrides) -> CacheConfig:
    base = dict(
        output_dir=str(tmp_path / name),
        batch_size=16,
        rows_per_shard=128,
        shuffle_buffer_rows=384,
        dtype="float32",
        progress=False,
    )
    return CacheConfig(**{**base, **overrides})


def _expected_rows(reference: torch.Tensor) -> torch.Tensor:
    """(N, T, d) reference activations in (sample, position) order, as (N·T, d) rows."""
    return reference.reshape(-1, reference.shape[-1])


def test_rows_equal_the_hooked_tensors_exactly(tmp_path):
    model, ids = tiny_transformer(), token_inputs(100)
    result = cache_activations(
        CustomAdapter(model, name="tiny"), ids, _cfg(tmp_path, hookpoints=["blocks.1"])
    )
    assert result.rows == {"blocks.1": 100 * SEQ}

    rows, meta = read_all(tmp_path / "cache")
    expected = reference_outputs(model, "blocks.1", ids)  # (100, T, d)
    torch.testing.assert_close(rows, _expected_rows(expected), rtol=0, atol=0)
    assert meta["sample"].tolist() == [i for i in range(100) for _ in range(SEQ)]
    assert meta["position"].tolist() == list(range(SEQ)) * 100
    assert (meta["step"] == -1).all() and (meta["branch"] == -1).all()

    # The rows were shuffled before they reached the shards: a shard is not a run of tokens.
    manifest = load_manifest(tmp_path / "cache")
    first = manifest.hookpoints["blocks.1"].shards[0]
    from safetensors.torch import load_file

    shard = load_file(tmp_path / "cache" / first.file)
    samples = shard["meta.sample"]
    assert samples.unique().numel() > 20  # drawn from many inputs of its group
    assert not bool((samples[1:] >= samples[:-1]).all())


def test_several_hookpoints_and_capture_targets_in_one_pass(tmp_path):
    model, ids = tiny_transformer(), token_inputs(48)
    calls = []
    model.register_forward_pre_hook(lambda m, a: calls.append(1))
    cfg = _cfg(
        tmp_path,
        hookpoints=["blocks.0", "blocks.1@input", "blocks.2@update", "blocks.*.mlp.0"],
        early_stop=False,
    )
    result = cache_activations(CustomAdapter(model), ids, cfg)
    assert len(calls) == 3  # 48 inputs in batches of 16: one forward pass each for all hookpoints
    assert set(result.rows) == {
        "blocks.0",
        "blocks.1@input",
        "blocks.2@update",
        "blocks.0.mlp.0",
        "blocks.1.mlp.0",
        "blocks.2.mlp.0",
    }
    out0 = reference_outputs(model, "blocks.0", ids)
    out1 = reference_outputs(model, "blocks.1", ids)
    out2 = reference_outputs(model, "blocks.2", ids)
    for name, expected in [
        ("blocks.0", out0),
        ("blocks.1@input", out0),  # the input of block 1 is block 0's output
        ("blocks.2@update", out2 - out1),  # what block 2 adds to the residual stream
        ("blocks.1.mlp.0", reference_outputs(model, "blocks.1.mlp.0", ids)),
    ]:
        rows, _ = read_all(tmp_path / "cache", name)
        torch.testing.assert_close(rows, _expected_rows(expected), rtol=0, atol=0)
    manifest = load_manifest(tmp_path / "cache")
    assert manifest.hookpoints["blocks.2@update"].capture == "update"
    assert manifest.hookpoints["blocks.1.mlp.0"].d == 2 * WIDTH


def test_early_stop_skips_later_work_and_changes_nothing(tmp_path):
    model, ids = tiny_transformer(), token_inputs(64)
    head_calls = []
    model.head.register_forward_hook(lambda m, a, o: head_calls.append(1))

    # Hooks never change what the model computes.
    with torch.no_grad():
        plain = model(ids)
    from saekit.cache import ActivationCapture

    adapter = CustomAdapter(model)
    hookpoints = resolve_hookpoints(model, ["blocks.1", "blocks.0@update"])
    outputs = []
    capture = ActivationCapture(adapter, hookpoints, lambda h, t, c: None, early_stop=False)
    with capture, torch.no_grad(), capture.forward(ForwardContext(torch.arange(64))):
        outputs.append(model(ids))
    torch.testing.assert_close(outputs[0], plain, rtol=0, atol=0)

    head_calls.clear()
    cache_activations(
        adapter, ids, _cfg(tmp_path, "full", hookpoints=["blocks.1"], early_stop=False)
    )
    assert len(head_calls) == 4  # every batch ran to the end
    head_calls.clear()
    cache_activations(adapter, ids, _cfg(tmp_path, "stopped", hookpoints=["blocks.1"]))
    assert len(head_calls) == 1  # only the first batch (which learns where to stop) ran to the end

    # The same rows either way: the shards are byte-identical.
    full = load_manifest(tmp_path / "full").hookpoints["blocks.1"].shards
    stopped = load_manifest(tmp_path / "stopped").hookpoints["blocks.1"].shards
    assert [s.header_xxh3 for s in full] == [s.header_xxh3 for s in stopped]
    for a, b in zip(full, stopped, strict=True):
        assert (tmp_path / "full" / a.file).read_bytes() == (
            tmp_path / "stopped" / b.file
        ).read_bytes()


def test_diffusion_steps_cfg_halves_and_feature_maps_reach_the_rows(tmp_path):
    adapter = ToyDiffusionAdapter(steps=3, size=4)
    cond = torch.randn(10, 8, generator=torch.Generator().manual_seed(3))
    cache_activations(adapter, cond, _cfg(tmp_path, hookpoints=["mid"], batch_size=5))

    rows, meta = read_all(tmp_path / "cache")
    # 10 samples x 3 steps x 2 CFG halves x 4x4 positions, each a (C=8) row
    assert rows.shape == (10 * 3 * 2 * 16, 8)
    assert sorted(set(meta["step"].tolist())) == [0, 1, 2]
    assert sorted(set(meta["timestep"].tolist())) == sorted(adapter.timesteps)
    assert sorted(set(meta["branch"].tolist())) == [UNCOND, COND]
    assert sorted(set(meta["position"].tolist())) == list(range(16))

    # Recompute one (sample, step, branch, position) by hand: the feature map's (h, w) entry.
    seen = []
    handle = adapter.model.mid.register_forward_hook(
        lambda m, a, o: seen.append(o.detach().clone())
    )
    adapter.run.__self__  # noqa: B018  (the same adapter, run again without the cache)
    from saekit.adapters import InputBatch, Sample

    class _Scope:
        def forward(self, context, stoppable=True):
            import contextlib

            return contextlib.nullcontext()

        def set_context(self, context):
            pass

    adapter.run(InputBatch([Sample(i, tensor=cond[i]) for i in range(5)]), _Scope())
    handle.remove()
    step, branch, sample, h, w = 1, COND, 3, 2, 1
    expected = seen[step][5 * branch + sample, :, h, w]  # batch is [uncond(5); cond(5)]
    pick = (
        (meta["sample"] == sample)
        & (meta["step"] == step)
        & (meta["branch"] == branch)
        & (meta["position"] == h * 4 + w)
    )
    assert int(pick.sum()) == 1
    torch.testing.assert_close(rows[pick][0], expected, rtol=0, atol=0)

    # Subsampling by step, CFG half and every k-th position.
    filtered = _cfg(
        tmp_path,
        "filtered",
        hookpoints=["mid"],
        batch_size=5,
        rows=RowFilter(steps=[1], branches=["cond"], every_k=4),
    )
    result = cache_activations(ToyDiffusionAdapter(steps=3, size=4), cond, filtered)
    assert result.rows == {"mid": 10 * 1 * 1 * 4}
    _, meta = read_all(tmp_path / "filtered")
    assert set(meta["step"].tolist()) == {1} and set(meta["branch"].tolist()) == {COND}
    assert set(meta["position"].tolist()) == {0, 4, 8, 12}


def test_streams_mark_image_and_text_tokens_and_filter_them(tmp_path):
    model, ids = tiny_transformer(), token_inputs(20)
    cfg = _cfg(tmp_path, hookpoints=["blocks.0"], rows=RowFilter(streams=["image"]))
    result = cache_activations(ToyVLMAdapter(model, image_tokens=3), ids, cfg)
    assert result.rows == {"blocks.0": 20 * 3}
    rows, meta = read_all(tmp_path / "cache")
    assert set(meta["position"].tolist()) == {0, 1, 2}
    assert set(meta["stream"].tolist()) == {1}
    assert load_manifest(tmp_path / "cache").streams == ["text", "image"]
    expected = reference_outputs(model, "blocks.0", ids)[:, :3]
    torch.testing.assert_close(rows, _expected_rows(expected), rtol=0, atol=0)

    with pytest.raises(ConfigError, match="unknown stream 'audio'"):
        cache_activations(
            ToyVLMAdapter(model),
            ids,
            _cfg(tmp_path, "x", hookpoints=["blocks.0"], rows=RowFilter(streams=["audio"])),
        )


def test_default_flatten_keeps_positions_and_a_cls_filter(tmp_path):
    model, ids = tiny_transformer(), token_inputs(30)
    cfg = _cfg(tmp_path, hookpoints=["blocks.2"], rows=RowFilter(positions=[0]))
    cache_activations(CustomAdapter(model), ids, cfg)
    rows, meta = read_all(tmp_path / "cache")
    assert meta["position"].unique().tolist() == [0]
    torch.testing.assert_close(
        rows, reference_outputs(model, "blocks.2", ids)[:, 0], rtol=0, atol=0
    )

    context = ForwardContext(torch.tensor([7, 9]))
    flat = rows_from_last_dim(torch.arange(2 * 3 * 2 * 4.0).reshape(2, 3, 2, 4), context)
    assert flat.values.shape == (12, 4)
    assert flat.sample.tolist() == [7] * 6 + [9] * 6
    assert flat.position.tolist() == list(range(6)) * 2


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_storage_dtypes(tmp_path, dtype):
    model, ids = tiny_transformer(), token_inputs(20)
    cache_activations(
        CustomAdapter(model), ids, _cfg(tmp_path, hookpoints=["blocks.0"], dtype=dtype)
    )
    rows, _ = read_all(tmp_path / "cache")
    assert rows.dtype == getattr(torch, dtype)
    expected = reference_outputs(model, "blocks.0", ids).to(getattr(torch, dtype))
    torch.testing.assert_close(rows, _expected_rows(expected), rtol=0, atol=0)


def test_unknown_hookpoint_and_bad_update_are_clear(tmp_path):
    model, ids = tiny_transformer(), token_inputs(8)
    with pytest.raises(ConfigError, match=r"'blocks\.9' matches no module.*close matches"):
        cache_activations(CustomAdapter(model), ids, _cfg(tmp_path, hookpoints=["blocks.9"]))
    with pytest.raises(ConfigError, match="same shape"):
        cache_activations(
            CustomAdapter(model), ids, _cfg(tmp_path, "u", hookpoints=["blocks.0.mlp.0@update"])
        )
    with pytest.raises(ConfigError, match="unknown capture"):
        resolve_hookpoints(model, ["blocks.0@middle"])
    # The root module (path "") is a hookpoint too; its cache name is "root", never a path.
    (root,) = resolve_hookpoints(model, [""])
    assert (root.name, root.module) == ("root", "")


def test_a_directory_of_another_config_is_refused(tmp_path):
    model, ids = tiny_transformer(), token_inputs(32)
    cfg = _cfg(tmp_path, hookpoints=["blocks.0"])
    cache_activations(CustomAdapter(model), ids, cfg)
    before = (tmp_path / "cache" / "manifest.json").read_bytes()

    with pytest.raises(CacheError, match=r"different configuration.*dtype"):
        cache_activations(
            CustomAdapter(model), ids, _cfg(tmp_path, hookpoints=["blocks.0"], dtype="bfloat16")
        )
    with pytest.raises(CacheError, match=r"different configuration.*model_identity"):
        cache_activations(CustomAdapter(tiny_transformer(seed=1)), ids, cfg)
    with pytest.raises(CacheError, match=r"different configuration.*inputs"):
        cache_activations(CustomAdapter(model), token_inputs(32, seed=2), cfg)
    assert (tmp_path / "cache" / "manifest.json").read_bytes() == before

    # The same config again: complete, nothing to do, nothing rewritten.
    result = cache_activations(CustomAdapter(model), ids, cfg)
    assert result.bytes_written == 0 and result.rows == {"blocks.0": 32 * SEQ}

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(CacheError, match="not empty"):
        cache_activations(
            CustomAdapter(model), ids, _cfg(tmp_path, "other", hookpoints=["blocks.0"])
        )


class _Crash(Exception):
    pass


def test_a_crashed_run_resumes_to_the_same_cache(tmp_path):
    model, ids = tiny_transformer(), token_inputs(150)
    hookpoints = ["blocks.0", "blocks.2@update"]
    cache_activations(CustomAdapter(model), ids, _cfg(tmp_path, "reference", hookpoints=hookpoints))

    batches = []

    def crashing_feed(m, batch):
        batches.append(1)
        if len(batches) == 7:  # after the first shuffle group (384 rows = 3 batches), mid-group
            raise _Crash
        return m(batch.stacked_tensors())

    with pytest.raises(_Crash):
        cache_activations(
            CustomAdapter(model, feed=crashing_feed),
            ids,
            _cfg(tmp_path, "resumed", hookpoints=hookpoints),
        )
    partial = load_manifest(tmp_path / "resumed")
    assert partial.groups and not partial.complete
    result = cache_activations(
        CustomAdapter(model), ids, _cfg(tmp_path, "resumed", hookpoints=hookpoints)
    )
    assert result.resumed_from_batch == partial.groups[-1].end_batch > 0

    reference = load_manifest(tmp_path / "reference")
    resumed = load_manifest(tmp_path / "resumed")
    assert resumed.complete
    for name in hookpoints:
        a = [(s.file, s.rows, s.header_xxh3) for s in reference.hookpoints[name].shards]
        b = sorted((s.file, s.rows, s.header_xxh3) for s in resumed.hookpoints[name].shards)
        assert sorted(a) == b
        for file, _, _ in a:
            assert (tmp_path / "reference" / file).read_bytes() == (
                tmp_path / "resumed" / file
            ).read_bytes()


def _write_png(path, color):
    from PIL import Image

    Image.new("RGB", (4, 4), color).save(path)


def _image_feed(model, batch):
    pixels = torch.stack(
        [
            torch.from_numpy(np.asarray(image, dtype=np.float32)).mean((0, 1))
            for image in batch.images
        ]
    )  # (B, 3)
    return model(pixels)


def test_bad_images_and_empty_prompts_are_skipped_and_counted(tmp_path):
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    for i in range(5):
        _write_png(folder / f"{i}.png", (40 * i, 0, 0))
    _write_png(folder / "sub" / "5.png", (0, 200, 0))
    (folder / "2.png").write_bytes((folder / "2.png").read_bytes()[:30])  # truncated
    (folder / "broken.jpg").write_bytes(b"not an image")
    model = torch.nn.Sequential(torch.nn.Linear(3, 4)).eval()

    source = ImageFolder(folder)
    assert len(source) == 7
    result = cache_activations(
        CustomAdapter(model, feed=_image_feed),
        source,
        _cfg(tmp_path, "img", hookpoints=["0"], batch_size=3),
    )
    assert result.skipped == {"unreadable_image": 2}
    assert result.rows == {"0": 5}
    _, meta = read_all(tmp_path / "img")
    bad = {i for i, p in enumerate(source.paths) if p.name in ("2.png", "broken.jpg")}
    assert set(meta["sample"].tolist()) == set(range(7)) - bad

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\n  \na blue square\n")

    def prompt_feed(m, batch):
        return m(torch.tensor([[float(len(p or ""))] * 3 for p in batch.prompts]))

    result = cache_activations(
        CustomAdapter(model, feed=prompt_feed),
        PromptFile(prompts),
        _cfg(tmp_path, "txt", hookpoints=["0"]),
    )
    assert result.skipped == {"empty_prompt": 2} and result.rows == {"0": 2}
    _, meta = read_all(tmp_path / "txt")
    assert sorted(meta["sample"].tolist()) == [0, 3]  # line numbers of the usable prompts

    pairs = folder / "pairs.jsonl"
    pairs.write_text(
        json.dumps({"image": "0.png", "prompt": "dark"})
        + "\n{broken\n"
        + json.dumps({"image": "sub/5.png", "prompt": ""})
        + "\n"
        + json.dumps({"image": "1.png", "prompt": "red"})
        + "\n"
    )
    result = cache_activations(
        CustomAdapter(model, feed=_image_feed),
        ImagePromptPairs(pairs),
        _cfg(tmp_path, "pairs", hookpoints=["0"]),
    )
    assert result.skipped == {"bad_record": 1, "empty_prompt": 1} and result.rows == {"0": 2}
    assert load_manifest(tmp_path / "pairs").groups[-1].skipped == result.skipped

    with pytest.raises(CacheError, match="every input was skipped"):
        only_bad = tmp_path / "bad.txt"
        only_bad.write_text("\n\n")
        cache_activations(
            CustomAdapter(model, feed=prompt_feed),
            PromptFile(only_bad),
            _cfg(tmp_path, "bad", hookpoints=["0"]),
        )


def test_datasets_and_prompt_lists_in_memory(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4)).eval()
    dataset = [(torch.randn(3), 0) for _ in range(9)]  # torchvision-style (input, label) items
    result = cache_activations(
        CustomAdapter(model), dataset, _cfg(tmp_path, "ds", hookpoints=["0"])
    )
    assert result.rows == {"0": 9}
    rows, _ = read_all(tmp_path / "ds")
    with torch.no_grad():
        expected = model(torch.stack([x for x, _ in dataset]))
    torch.testing.assert_close(rows, expected, rtol=0, atol=0)
