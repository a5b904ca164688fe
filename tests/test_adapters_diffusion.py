"""The diffusion adapter on real diffusers pipelines with tiny random components built in code
(Stable Diffusion's UNet, SD3's joint blocks, Flux's double- and single-stream blocks, PixArt):
every listed hookpoint reaches the cache as the plain hooks see it, with the denoising step,
timestep, CFG half and stream of each row; generation with no-op hooks is unchanged; hooks
are removed after errors; ``saekit cache`` loads a pipeline folder from a YAML config."""

from __future__ import annotations

import pytest
import torch
from adapters_support import (
    installed_hooks,
    one_thread,
    prompts,
    recording,
    tiny_flux_pipeline,
    tiny_pixart_pipeline,
    tiny_sd3_pipeline,
    tiny_sd_pipeline,
    tiny_sdxl_pipeline,
)
from test_cache_support import read_all

from saekit.adapters import COND, NO_BRANCH, UNCOND, ContextTracker, detect_adapter
from saekit.adapters.diffusion import IMAGE, TEXT, DiffusionAdapter
from saekit.cache import CacheConfig, cache_activations, load_manifest
from saekit.cli import main

N, BATCH, STEPS = 4, 2, 2


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


def _cfg(tmp_path, hookpoints, name="cache", **overrides) -> CacheConfig:
    base = dict(
        hookpoints=hookpoints,
        output_dir=str(tmp_path / name),
        batch_size=BATCH,
        rows_per_shard=256,
        shuffle_buffer_rows=1024,
        dtype="float32",
        progress=False,
    )
    return CacheConfig(**{**base, **overrides})


def _generators(ids, seed=0):
    return [torch.Generator().manual_seed(seed + i) for i in ids]


def _reference_calls(pipe, root, hooks, texts, pick=None, **call):
    """Every hook's outputs, call by call, running the pipeline the way its users do, batch by
    batch, with plain forward hooks (and the denoiser's timestep arguments)."""
    denoiser = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    timesteps = []
    handle = denoiser.register_forward_pre_hook(
        lambda m, a, k: timesteps.append(
            float((k["timestep"] if "timestep" in k else a[1]).reshape(-1)[0])
        ),
        with_kwargs=True,
    )
    calls = {h: [] for h in hooks}
    try:
        for start in range(0, len(texts), BATCH):
            ids = list(range(start, min(start + BATCH, len(texts))))
            with recording(root, hooks, pick) as seen:
                pipe([texts[i] for i in ids], generator=_generators(ids), **call)
            for h in hooks:
                calls[h].append(seen[h])
    finally:
        handle.remove()
    return calls, timesteps


def _expected(calls, meta, *, per_batch_steps, layout, text_calls=False):
    """The reference vector of each cached row, found from its metadata: its sample's batch,
    its step (or CFG half, for text-encoder calls), its half of the batch and its position."""
    out = []
    for sample, step, branch, position in zip(
        meta["sample"].tolist(),
        meta["step"].tolist(),
        meta["branch"].tolist(),
        meta["position"].tolist(),
        strict=True,
    ):
        batch, j = divmod(sample, BATCH)
        if text_calls:  # one call for the prompts, then one for the negative prompts
            tensor = calls[batch][0 if branch in (COND, NO_BRANCH) else 1]
            row = j
        else:
            tensor = calls[batch][step if per_batch_steps else 0]
            size = tensor.shape[0]
            row = j + (size // 2 if branch == COND else 0) if branch != NO_BRANCH else j
        if layout == "map":  # (B, C, H, W)
            width = tensor.shape[-1]
            out.append(tensor[row, :, position // width, position % width])
        else:
            out.append(tensor[row].reshape(-1, tensor.shape[-1])[position])
    return torch.stack(out)


# ----------------------------------------------------------------------------- UNet


def test_unet_pipeline_every_listed_hookpoint_with_steps_and_cfg_halves(tmp_path):
    pipe = tiny_sd_pipeline()
    adapter = DiffusionAdapter(pipe, num_inference_steps=STEPS, guidance_scale=5.0)
    listed = adapter.hookpoints()
    names = [h.name for h in listed]
    assert {
        "down_blocks.0.attentions.0",
        "mid_block.attentions.0",
        "up_blocks.1.attentions.0",
        "up_blocks.1.attentions.1",
        "text_encoder.encoder.layers.0",
        "text_encoder.encoder.layers.1",
    } == set(names)
    assert {h.name: h.d for h in listed}["mid_block.attentions.0"] == 32
    texts = prompts(N)
    result = cache_activations(adapter, texts, _cfg(tmp_path, names))
    # 8x8 latents at the first level, 4x4 in the mid block; two steps, two CFG halves.
    assert result.rows["down_blocks.0.attentions.0"] == N * STEPS * 2 * 64
    assert result.rows["mid_block.attentions.0"] == N * STEPS * 2 * 16
    assert result.rows["text_encoder.encoder.layers.1"] == N * 2 * 16  # prompt + negative

    calls, timesteps = _reference_calls(
        pipe,
        adapter.root(),
        names,
        texts,
        num_inference_steps=STEPS,
        guidance_scale=5.0,
        output_type="latent",
    )
    schedule = timesteps[:STEPS]
    for name in names:
        rows, meta = read_all(tmp_path / "cache", name)
        if name.startswith("text_encoder"):
            expected = _expected(
                calls[name], meta, per_batch_steps=False, layout="tokens", text_calls=True
            )
            assert set(meta["stream"].tolist()) == {TEXT}
            assert set(meta["step"].tolist()) == {-1}
        else:
            expected = _expected(calls[name], meta, per_batch_steps=True, layout="map")
            assert set(meta["stream"].tolist()) == {IMAGE}
            assert meta["timestep"][meta["step"] == 1].unique().tolist() == [schedule[1]]
            assert set(meta["step"].tolist()) == set(range(STEPS))
        assert set(meta["branch"].tolist()) == {UNCOND, COND}
        torch.testing.assert_close(rows, expected, rtol=0, atol=0)
    manifest = load_manifest(tmp_path / "cache")
    assert manifest.adapter == "diffusion" and manifest.streams == ["image", "text"]
    assert "(B, C, H, W)" in manifest.hookpoints["mid_block.attentions.0"].description


def test_no_guidance_means_no_cfg_halves(tmp_path):
    # SDXL-Turbo's setting: guidance_scale 0 turns classifier-free guidance off.
    adapter = DiffusionAdapter(tiny_sd_pipeline(), num_inference_steps=1, guidance_scale=0.0)
    result = cache_activations(
        adapter,
        prompts(N),
        _cfg(tmp_path, ["mid_block.attentions.0", "text_encoder.encoder.layers.1"]),
    )
    assert result.rows["mid_block.attentions.0"] == N * 16
    for name in result.rows:
        _, meta = read_all(tmp_path / "cache", name)
        assert set(meta["branch"].tolist()) == {NO_BRANCH}


def test_sdxl_turbo_recipe_caches_the_updates_of_four_blocks(tmp_path):
    # configs/cache-sdxl-turbo.yaml on a tiny SDXL: one step, no guidance, capture update.
    pipe = tiny_sdxl_pipeline()
    call = dict(height=16, width=16)
    adapter = DiffusionAdapter(
        pipe, num_inference_steps=1, guidance_scale=0.0, pipeline_kwargs=call
    )
    blocks = [
        "down_blocks.1.attentions.0",
        "mid_block.attentions.0",
        "up_blocks.0.attentions.0",
        "up_blocks.0.attentions.1",
    ]
    assert set(blocks) <= {h.name for h in adapter.hookpoints()}
    cache_activations(adapter, prompts(N), _cfg(tmp_path, blocks, capture="update"))
    inputs = {}
    handles = [
        adapter.root()
        .get_submodule(b)
        .register_forward_pre_hook(
            lambda m, a, k, b=b: inputs.setdefault(b, []).append(a[0].clone()), with_kwargs=True
        )
        for b in blocks
    ]
    try:
        calls, _ = _reference_calls(
            pipe,
            adapter.root(),
            blocks,
            prompts(N),
            num_inference_steps=1,
            guidance_scale=0.0,
            output_type="latent",
            **call,
        )
    finally:
        for handle in handles:
            handle.remove()
    for block in blocks:
        steps = iter(inputs[block])
        updates = [[out - next(steps) for out in batch] for batch in calls[block]]
        rows, meta = read_all(tmp_path / "cache", f"{block}@update")
        expected = _expected(updates, meta, per_batch_steps=True, layout="map")
        torch.testing.assert_close(rows, expected, rtol=0, atol=0)
        assert set(meta["branch"].tolist()) == {NO_BRANCH} and set(meta["step"].tolist()) == {0}
    assert load_manifest(tmp_path / "cache").hookpoints[f"{blocks[1]}@update"].capture == "update"


# ----------------------------------------------------------------------------- DiTs


def test_sd3_joint_blocks_hold_text_then_image_tokens(tmp_path):
    pipe = tiny_sd3_pipeline()
    call = dict(height=16, width=16, max_sequence_length=8)
    adapter = DiffusionAdapter(
        pipe, num_inference_steps=STEPS, guidance_scale=5.0, pipeline_kwargs=call
    )
    names = [h.name for h in adapter.hookpoints()]
    assert {
        "transformer_blocks.0",
        "transformer_blocks.1",
        "text_encoder_3.encoder.block.1",
    } <= set(names)
    hooks = [
        "transformer_blocks.0",
        "transformer_blocks.1",
        "transformer_blocks.0@update",
        "text_encoder_3.encoder.block.1",
    ]
    result = cache_activations(adapter, prompts(N), _cfg(tmp_path, hooks))
    text_tokens, image_tokens = 16 + 8, 16  # CLIP 16 + T5 8; 8x8 latents in 2x2 patches
    assert result.rows["transformer_blocks.0"] == N * STEPS * 2 * (text_tokens + image_tokens)
    assert result.rows["transformer_blocks.1"] == N * STEPS * 2 * image_tokens  # no text out

    calls, _ = _reference_calls(
        pipe,
        adapter.root(),
        ["transformer_blocks.0", "transformer_blocks.1"],
        prompts(N),
        pick=lambda out: torch.cat([t for t in out if t is not None], dim=1),  # text, image
        num_inference_steps=STEPS,
        guidance_scale=5.0,
        output_type="latent",
        **call,
    )
    for name in ("transformer_blocks.0", "transformer_blocks.1"):
        rows, meta = read_all(tmp_path / "cache", name)
        torch.testing.assert_close(
            rows,
            _expected(calls[name], meta, per_batch_steps=True, layout="tokens"),
            rtol=0,
            atol=0,
        )
        first = 0 if name.endswith("1") else text_tokens
        assert set(meta["stream"][meta["position"] >= first].tolist()) == {IMAGE}
        assert set(meta["stream"][meta["position"] < first].tolist()) <= {TEXT}
    # @update: the block's output minus its input, both streams concatenated the same way.
    block_in = {}
    block = pipe.transformer.transformer_blocks[0]
    handle = block.register_forward_pre_hook(
        lambda m, a, k: block_in.setdefault("x", []).append(
            torch.cat([k["encoder_hidden_states"], k["hidden_states"]], dim=1).clone()
        ),
        with_kwargs=True,
    )
    try:
        rerun, _ = _reference_calls(
            pipe,
            adapter.root(),
            ["transformer_blocks.0"],
            prompts(N),
            pick=lambda out: torch.cat(list(out), dim=1),
            num_inference_steps=STEPS,
            guidance_scale=5.0,
            output_type="latent",
            **call,
        )
    finally:
        handle.remove()
    inputs = iter(block_in["x"])
    updates = [[out - next(inputs) for out in batch] for batch in rerun["transformer_blocks.0"]]
    rows, meta = read_all(tmp_path / "cache", "transformer_blocks.0@update")
    torch.testing.assert_close(
        rows, _expected(updates, meta, per_batch_steps=True, layout="tokens"), rtol=1e-6, atol=1e-6
    )


def test_flux_double_and_single_stream_blocks(tmp_path):
    pipe = tiny_flux_pipeline()
    call = dict(height=16, width=16, max_sequence_length=8)
    adapter = DiffusionAdapter(pipe, num_inference_steps=STEPS, pipeline_kwargs=call)
    hooks = ["transformer_blocks.0", "single_transformer_blocks.1"]
    assert set(hooks) <= {h.name for h in adapter.hookpoints()}
    cache_activations(adapter, prompts(N), _cfg(tmp_path, hooks))
    calls, timesteps = _reference_calls(
        pipe,
        adapter.root(),
        hooks,
        prompts(N),
        pick=lambda out: torch.cat(list(out), dim=1),
        num_inference_steps=STEPS,
        output_type="latent",
        **call,
    )
    for name in hooks:
        rows, meta = read_all(tmp_path / "cache", name)
        torch.testing.assert_close(
            rows,
            _expected(calls[name], meta, per_batch_steps=True, layout="tokens"),
            rtol=0,
            atol=0,
        )
        assert set(meta["branch"].tolist()) == {NO_BRANCH}  # guidance-distilled: no CFG batch
        # single-stream blocks hold the 8 text tokens first, then the 16 image tokens
        assert set(meta["stream"][meta["position"] < 8].tolist()) == {TEXT}
        assert set(meta["stream"][meta["position"] >= 8].tolist()) == {IMAGE}
        # Flux is called with t / 1000; the cache records the scheduler's 0..1000 scale.
        recorded = sorted(set(meta["timestep"].tolist()))
        assert recorded == pytest.approx(sorted({1000 * t for t in timesteps}))


def test_pixart_blocks_are_image_tokens_and_t5_layers_are_text(tmp_path):
    pipe = tiny_pixart_pipeline()
    call = dict(
        height=16,
        width=16,
        max_sequence_length=8,
        use_resolution_binning=False,
        clean_caption=False,
    )
    adapter = DiffusionAdapter(
        pipe, num_inference_steps=STEPS, guidance_scale=4.5, pipeline_kwargs=call
    )
    hooks = ["transformer_blocks.1", "text_encoder.encoder.block.0"]
    assert set(hooks) <= {h.name for h in adapter.hookpoints()}
    cache_activations(adapter, prompts(N), _cfg(tmp_path, hooks))
    calls, _ = _reference_calls(
        pipe,
        adapter.root(),
        hooks,
        prompts(N),
        num_inference_steps=STEPS,
        guidance_scale=4.5,
        output_type="latent",
        **call,
    )
    rows, meta = read_all(tmp_path / "cache", "transformer_blocks.1")
    torch.testing.assert_close(
        rows,
        _expected(calls["transformer_blocks.1"], meta, per_batch_steps=True, layout="tokens"),
        rtol=0,
        atol=0,
    )
    assert set(meta["stream"].tolist()) == {IMAGE} and set(meta["branch"].tolist()) == {
        UNCOND,
        COND,
    }
    rows, meta = read_all(tmp_path / "cache", "text_encoder.encoder.block.0")
    expected = _expected(
        calls["text_encoder.encoder.block.0"],
        meta,
        per_batch_steps=False,
        layout="tokens",
        text_calls=True,
    )
    torch.testing.assert_close(rows, expected, rtol=0, atol=0)


# ----------------------------------------------------------------------------- generation


@pytest.mark.parametrize("build", [tiny_sd_pipeline, tiny_sd3_pipeline, tiny_flux_pipeline])
def test_generation_with_noop_hooks_is_unchanged(build):
    kwargs = {} if build is tiny_sd_pipeline else dict(height=16, width=16, max_sequence_length=8)
    adapter = DiffusionAdapter(
        build(), num_inference_steps=STEPS, guidance_scale=4.0, pipeline_kwargs=kwargs
    )
    texts = prompts(2)
    plain = adapter.generate(texts, output_type="pt").images
    before = installed_hooks(adapter.root())
    handles = [
        adapter.root().get_submodule(h.name).register_forward_hook(lambda m, a, out: out)
        for h in adapter.hookpoints()
    ]
    tracker = ContextTracker()
    steps = []
    handles.append(
        adapter.denoiser.register_forward_hook(lambda m, a, out: steps.append(tracker.context))
    )
    try:
        hooked = adapter.generate(texts, output_type="pt", scope=tracker).images
    finally:
        for handle in handles:
            handle.remove()
    assert plain.shape == (2, 3, 16, 16)
    torch.testing.assert_close(hooked, plain, rtol=0, atol=0)
    # The hooks could tell which denoising step (and CFG half) each call was.
    assert [c.step for c in steps] == list(range(STEPS))
    guided = build is not tiny_flux_pipeline
    assert all((c.branch is not None) == guided for c in steps)
    assert installed_hooks(adapter.root()) == before


def test_hooks_are_removed_after_an_error(tmp_path):
    pipe = tiny_sd_pipeline()
    adapter = DiffusionAdapter(pipe, num_inference_steps=STEPS, guidance_scale=5.0)
    calls = []

    def fail_at_the_second_step(module, args, output):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("the UNet failed")

    adapter.generate(prompts(1))  # libraries install their own hooks on a first call
    before = installed_hooks(adapter.root())
    user = pipe.unet.mid_block.register_forward_hook(fail_at_the_second_step)
    with pytest.raises(RuntimeError, match="the UNet failed"):
        cache_activations(
            adapter,
            prompts(N),
            _cfg(tmp_path, ["mid_block.attentions.0", "text_encoder.encoder.layers.0"]),
        )
    user.remove()
    assert installed_hooks(adapter.root()) == before  # capture hooks and step announcers
    calls.clear()
    user = pipe.unet.mid_block.register_forward_hook(fail_at_the_second_step)
    with pytest.raises(RuntimeError, match="the UNet failed"):
        adapter.generate(prompts(1), scope=ContextTracker())
    user.remove()
    assert installed_hooks(adapter.root()) == before


# ----------------------------------------------------------------------------- loading


def test_a_pipeline_folder_caches_from_a_yaml_config(tmp_path):
    pipe = tiny_sd_pipeline()
    folder = tmp_path / "tiny-sd"
    pipe.save_pretrained(folder)
    assert detect_adapter(str(folder)) == "diffusion"
    texts = prompts(N)
    (tmp_path / "prompts.txt").write_text("\n".join(texts) + "\n")
    hooks = ["mid_block.attentions.0", "text_encoder.encoder.layers.1"]
    config = tmp_path / "cache.yaml"
    config.write_text(
        f"model: {folder}\nhookpoints: [{', '.join(hooks)}]\n"
        f"data:\n  prompts: {tmp_path / 'prompts.txt'}\n"
        "model_options:\n  num_inference_steps: 2\n  guidance_scale: 5.0\n  seed: 3\n"
        f"output_dir: {tmp_path / 'cli'}\ndtype: float32\nbatch_size: 2\n"
        "rows_per_shard: 256\nshuffle_buffer_rows: 1024\nprogress: false\n"
    )
    assert main(["cache", "--config", str(config)]) == 0
    manifest = load_manifest(tmp_path / "cli")
    assert manifest.adapter == "diffusion"
    assert manifest.config["model_options"]["num_inference_steps"] == 2

    in_memory = DiffusionAdapter(pipe, num_inference_steps=2, guidance_scale=5.0, seed=3)
    cache_activations(in_memory, texts, _cfg(tmp_path, hooks, "memory"))
    for name in hooks:
        a, meta_a = read_all(tmp_path / "cli", name)
        b, meta_b = read_all(tmp_path / "memory", name)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        for column in ("step", "branch", "stream"):
            assert torch.equal(meta_a[column], meta_b[column])
