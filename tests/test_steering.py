"""Steering primitives and scopes on tiny real models: a testbed pipeline (diffusers UNet),
a LLaVA and a CLIP built in code (no download)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from adapters_support import images, installed_hooks, one_thread, tiny_clip, tiny_llava
from steering_support import before_and_after, generate, tiny_sae, tiny_testbed_pipeline

import saekit
from saekit.steering import Intervention, Scope, resize_mask


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def pipe():
    return tiny_testbed_pipeline()


@pytest.fixture(scope="module")
def mid_sae():
    return tiny_sae(32, "mid_block")


PROMPTS = ["a red circle", "a blue square"]


def test_add_is_alpha_times_the_decoder_row_in_the_step_window_only(pipe, mid_sae):
    alpha, feature = 2.5, 7
    scope = Scope(steps=(1, 2))
    with (
        saekit.steer(pipe, mid_sae, features=[feature], strength=alpha, scope=scope) as handle,
        before_and_after(pipe.unet.mid_block) as (raw, steered),
    ):
        generate(pipe, PROMPTS)
    assert len(raw) == 3  # one guided call per step
    expected = (alpha * mid_sae.W_dec[feature]).detach()  # (d,)
    for step, (x, y) in enumerate(zip(raw, steered, strict=True)):
        delta = y - x  # (2B, C, H, W)
        if step == 1:
            torch.testing.assert_close(
                delta, expected[None, :, None, None].expand_as(delta), rtol=0, atol=1e-6
            )
        else:
            assert torch.equal(x, y)
    report = handle.report()
    assert report[0]["applied_calls"] == 1
    assert report[0]["applied_rows"] == 2 * len(PROMPTS) * 8 * 8


def test_guidance_halves_and_cond_minus_uncond(pipe, mid_sae):
    w = mid_sae.W_dec[3].detach()
    for branch, signs in [("cond", (0, 1)), ("uncond", (1, 0)), ("cond_minus_uncond", (-1, 1))]:
        with (
            saekit.steer(pipe, mid_sae, features=3, strength=1.5, scope=Scope(branch=branch)),
            before_and_after(pipe.unet.mid_block) as (raw, steered),
        ):
            generate(pipe, PROMPTS, steps=1)
        delta = steered[0] - raw[0]  # (2B, C, H, W): [uncond; cond]
        uncond, cond = delta.chunk(2)
        for half, sign in [(uncond, signs[0]), (cond, signs[1])]:
            target = (sign * 1.5 * w)[None, :, None, None].expand_as(half)
            torch.testing.assert_close(half, target, rtol=0, atol=1e-6)


def test_unguided_call_is_all_conditional(pipe, mid_sae):
    with (
        saekit.steer(pipe, mid_sae, features=3, strength=1.0, scope=Scope(branch="uncond")),
        before_and_after(pipe.unet.mid_block) as (raw, steered),
    ):
        generate(pipe, PROMPTS, steps=1, guidance=1.0)
    assert raw[0].shape[0] == len(PROMPTS)
    assert torch.equal(raw[0], steered[0])


def test_spatial_mask_is_resized_to_each_block_grid(pipe):
    mask = torch.zeros(32, 32)
    mask[:16, :16] = 1.0  # the top-left quadrant of the image
    mask[0, 16] = 1.0  # one stray pixel: an area-averaged cell gets a fraction
    saes = {"mid_block": tiny_sae(32, "mid_block"), "up_blocks.1": tiny_sae(16, "up_blocks.1")}
    interventions = [
        Intervention([5], strength=2.0, hookpoint=name, scope=Scope(mask=mask)) for name in saes
    ]
    with (
        saekit.steer(pipe, saes, interventions),
        before_and_after(pipe.unet.mid_block) as (mid_raw, mid_out),
        before_and_after(pipe.unet.up_blocks[1]) as (up_raw, up_out),
    ):
        generate(pipe, PROMPTS, steps=1)
    for raw, out, sae in [
        (mid_raw, mid_out, saes["mid_block"]),
        (up_raw, up_out, saes["up_blocks.1"]),
    ]:
        delta = out[0] - raw[0]  # (2B, C, h, w)
        h, w = delta.shape[2:]
        weights = resize_mask(mask, h, w)
        assert weights[: h // 2, : w // 2].eq(1).all() and weights[h // 2 :].eq(0).all()
        expected = 2.0 * weights[None, None] * sae.W_dec[5].detach()[None, :, None, None]
        torch.testing.assert_close(delta, expected.expand_as(delta), rtol=0, atol=1e-6)
    assert mid_raw[0].shape[2] != up_raw[0].shape[2]  # two different grids were masked


def test_resize_mask_averages_area():
    mask = torch.zeros(4, 4)
    mask[0, 0] = 1.0
    assert resize_mask(mask, 2, 2).tolist() == [[0.25, 0.0], [0.0, 0.0]]
    assert resize_mask(mask, 8, 8)[:2, :2].eq(1).all()


def test_edits_that_change_nothing_are_bitwise_clean(pipe, mid_sae):
    clean = generate(pipe, PROMPTS)
    never = _never_firing_latent(pipe, mid_sae)
    unchanged = [
        Intervention([1, 2, 9], kind="scale", strength=1.0),
        Intervention([1, 2, 9], kind="clamp", low=0.0),
        Intervention([never], kind="set", strength=0.0),
        Intervention([never], kind="ablate"),
        Intervention([4], strength=3.0, scope=Scope(steps=(10, 20))),  # outside the window
    ]
    for intervention in unchanged:
        with saekit.steer(pipe, mid_sae, intervention) as handle:
            out = generate(pipe, PROMPTS)
        assert torch.equal(out, clean), intervention
        assert handle.calls["mid_block"] == 3
    with saekit.steer(pipe, mid_sae, []):
        assert torch.equal(generate(pipe, PROMPTS), clean)
    # A real edit does change the images.
    with saekit.steer(pipe, mid_sae, features=[1, 2, 9], kind="scale", strength=-3.0):
        assert not torch.equal(generate(pipe, PROMPTS), clean)


def _never_firing_latent(pipe, sae) -> int:
    seen = torch.zeros(sae.d_sae, dtype=torch.bool)
    with before_and_after(pipe.unet.mid_block) as (raw, _):
        generate(pipe, PROMPTS)
    for x in raw:
        codes = sae.encode(x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]))
        seen[codes.indices[codes.values > 0]] = True
    return int((~seen).nonzero()[0])


def test_set_reaches_the_value_and_keeps_the_error(pipe, mid_sae):
    with (
        saekit.steer(
            pipe, mid_sae, features=[11], kind="set", strength=4.0, scope=Scope(steps=(0, 1))
        ),
        before_and_after(pipe.unet.mid_block) as (raw, steered),
    ):
        generate(pipe, PROMPTS, steps=1)
    x, y = raw[0], steered[0]
    rows = lambda t: t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])  # noqa: E731
    before = mid_sae.encode_dense(rows(x))[:, 11]
    delta = rows(y) - rows(x)
    expected = (4.0 - before)[:, None] * mid_sae.W_dec[11].detach()[None]
    torch.testing.assert_close(delta, expected, rtol=0, atol=1e-5)


def test_relative_strength_uses_the_typical_activation(pipe, mid_sae):
    typical = torch.zeros(mid_sae.d_sae)
    typical[6] = 0.5
    with (
        saekit.steer(pipe, mid_sae, features=6, strength=4.0, relative=True, typical=typical),
        before_and_after(pipe.unet.mid_block) as (raw, steered),
    ):
        generate(pipe, PROMPTS, steps=1)
    delta = (steered[0] - raw[0])[0, :, 0, 0]
    torch.testing.assert_close(delta, 2.0 * mid_sae.W_dec[6].detach(), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="typical activation"):
        saekit.steer(pipe, mid_sae, features=6, relative=True)


def test_hooks_are_removed_on_exit_even_on_error(pipe, mid_sae):
    before = installed_hooks(pipe.unet) | installed_hooks(pipe.text_encoder)
    with (
        pytest.raises(RuntimeError, match="boom"),
        saekit.steer(pipe, mid_sae, features=1, scope=Scope(steps=(0, 1))) as handle,
    ):
        assert handle.active
        assert installed_hooks(pipe.unet) != before
        raise RuntimeError("boom")
    assert not handle.active
    assert installed_hooks(pipe.unet) | installed_hooks(pipe.text_encoder) == before


def test_text_encoder_hookpoint_and_token_scope(pipe):
    sae = tiny_sae(32, "text_encoder.encoder.layers.0")
    with (
        saekit.steer(
            pipe, sae, features=2, strength=1.0, scope=Scope(tokens="text", positions=(1, 2))
        ),
        before_and_after(pipe.text_encoder.encoder.layers[0]) as (raw, steered),
    ):
        generate(pipe, PROMPTS, steps=1)
    assert len(raw) == 2  # the prompts, then the empty negative prompts
    delta = steered[0] - raw[0]  # (B, T, d)
    assert delta[:, [0, 3, 4]].abs().max() == 0
    torch.testing.assert_close(
        delta[:, 1:3], sae.W_dec[2].detach().expand_as(delta[:, 1:3]), rtol=0, atol=1e-6
    )
    with (
        saekit.steer(pipe, sae, features=2, scope=Scope(tokens="image")),
        before_and_after(pipe.text_encoder.encoder.layers[0]) as (raw, steered),
    ):
        generate(pipe, PROMPTS, steps=1)
    assert torch.equal(raw[0], steered[0])


# ----------------------------------------------------------------------------- VLM


@pytest.fixture(scope="module")
def llava():
    return tiny_llava()


def test_vlm_prefill_decode_and_image_tokens(llava):
    model, processor = llava
    from saekit.adapters.vlm import VLMAdapter

    adapter = VLMAdapter(model, processor)
    layer = model.model.language_model.layers[0]
    sae = tiny_sae(48, "model.language_model.layers.0")
    w = sae.W_dec[9].detach()

    def run(scope: Scope):
        with (
            saekit.steer(adapter, sae, features=9, strength=2.0, scope=scope),
            before_and_after(layer) as (raw, steered),
        ):
            adapter.generate(images(2), ["a red", "the"], max_new_tokens=3, min_new_tokens=3)
        return [y - x for x, y in zip(raw, steered, strict=True)]

    deltas = run(Scope(phase="decode"))
    assert len(deltas) == 3 and deltas[0].shape[1] > 1  # prefill, then one token per call
    assert deltas[0].abs().max() == 0
    for d in deltas[1:]:
        torch.testing.assert_close(d, (2.0 * w).expand_as(d), rtol=0, atol=1e-6)
    deltas = run(Scope(decode_steps=(1, 2)))
    assert [bool(d.abs().max() > 0) for d in deltas] == [False, False, True]
    deltas = run(Scope(phase="prefill", tokens="image"))
    assert all(d.abs().max() == 0 for d in deltas[1:])
    inputs = adapter.processor_inputs(images(2), ["a red", "the"], padding_side="left")
    is_image = inputs["input_ids"] == adapter.image_token_id  # (B, T)
    assert is_image.any() and (~is_image).any()
    assert deltas[0][~is_image].abs().max() == 0
    torch.testing.assert_close(
        deltas[0][is_image], (2.0 * w).expand_as(deltas[0][is_image]), rtol=0, atol=1e-6
    )


def test_cached_tokens_reads_the_cache_by_what_it_is_not_by_its_keyword():
    """The KV cache's length under any keyword (transformers 5.24 renamed ``past_key_values=``
    to ``cache=``), else the attention mask's width less the new tokens'."""
    from transformers import DynamicCache, LlamaConfig

    from saekit.steering.context import cached_tokens

    config = LlamaConfig(
        hidden_size=8, num_attention_heads=2, num_key_value_heads=2, num_hidden_layers=1
    )
    cache = DynamicCache(config=config)
    ids = torch.ones(2, 1, dtype=torch.long)
    assert cached_tokens((), {"input_ids": ids, "kv_whatever": cache}) == 0  # empty: a prefill
    cache.update(torch.zeros(2, 2, 5, 4), torch.zeros(2, 2, 5, 4), layer_idx=0)
    for keyword in ("past_key_values", "cache", "a_future_name"):
        assert cached_tokens((), {"input_ids": ids, keyword: cache}) == 5
    assert cached_tokens((ids, cache), {}) == 5
    assert cached_tokens((), {"input_ids": ids, "cache_position": torch.tensor([7])}) == 7
    mask = torch.ones(2, 9, dtype=torch.long)
    assert cached_tokens((), {"input_ids": ids, "attention_mask": mask}) == 8
    assert cached_tokens((), {"inputs_embeds": torch.zeros(2, 1, 4), "attention_mask": mask}) == 8
    assert cached_tokens((), {"input_ids": torch.ones(2, 9), "attention_mask": mask}) == 0


# ----------------------------------------------------------------------------- CLIP


def test_clip_image_embedding_add_and_image_scope():
    model = tiny_clip()
    from saekit.adapters.clip import CLIPAdapter

    adapter = CLIPAdapter(model)
    sae = tiny_sae(24, "visual_projection")
    pixels = torch.randn(3, 3, 16, 16)
    clean = model.get_image_features(pixel_values=pixels)
    clean = getattr(clean, "pooler_output", clean)
    with saekit.steer(adapter, sae, features=4, strength=3.0, scope=Scope(tokens="image")):
        out = model.get_image_features(pixel_values=pixels)
        out = getattr(out, "pooler_output", out)
    torch.testing.assert_close(
        out - clean, (3.0 * sae.W_dec[4].detach()).expand_as(out), rtol=0, atol=1e-5
    )
    after = model.get_image_features(pixel_values=pixels)
    assert torch.equal(getattr(after, "pooler_output", after), clean)


def test_update_capture_edits_the_blocks_write(pipe):
    """A dictionary of a block's update (output - input) is steered there: the output moves by
    the same decoder row, and a no-op returns the block's own output."""
    sae = tiny_sae(32, "mid_block")
    sae.cfg.capture = "update"
    with (
        saekit.steer(pipe, sae, features=2, strength=1.5) as handle,
        before_and_after(pipe.unet.mid_block) as (raw, steered),
    ):
        generate(pipe, PROMPTS, steps=1)
    assert list(handle.transforms) == ["mid_block@update"]
    delta = steered[0] - raw[0]
    expected = (1.5 * sae.W_dec[2].detach())[None, :, None, None].expand_as(delta)
    torch.testing.assert_close(delta, expected, rtol=0, atol=1e-5)


def test_without_the_error_the_activation_is_the_edited_reconstruction(pipe, mid_sae):
    edit = Intervention([5], kind="scale", strength=1.0, keep_error=False)
    with (
        saekit.steer(pipe, mid_sae, edit),
        before_and_after(pipe.unet.mid_block) as (raw, steered),
    ):
        generate(pipe, PROMPTS, steps=1)
    x = raw[0].permute(0, 2, 3, 1).reshape(-1, 32)  # (N, d)
    y = steered[0].permute(0, 2, 3, 1).reshape(-1, 32)
    torch.testing.assert_close(y, mid_sae(x).detach(), rtol=0, atol=1e-5)
    assert not torch.allclose(x, y)  # the SAE error was dropped


def test_where_active_gates_rows_by_the_dictionarys_own_latents(pipe, mid_sae):
    with before_and_after(pipe.unet.mid_block) as (raw, _):
        generate(pipe, PROMPTS, steps=1)
    x = raw[0].permute(0, 2, 3, 1).reshape(-1, 32)  # (N, d)
    dense = mid_sae.encode_dense(x)  # (N, d_sae)
    rate = (dense > 0).float().mean(0)
    gate = int(((rate > 0.1) & (rate < 0.9)).nonzero()[0])  # fires on some rows, not all
    scope = Scope(where_active=(gate,))
    with (
        saekit.steer(pipe, mid_sae, features=3, strength=2.0, scope=scope),
        before_and_after(pipe.unet.mid_block) as (raw2, steered),
    ):
        generate(pipe, PROMPTS, steps=1)
    delta = (steered[0] - raw2[0]).permute(0, 2, 3, 1).reshape(-1, 32)
    fires = dense[:, gate] > 0
    torch.testing.assert_close(
        delta[fires], (2.0 * mid_sae.W_dec[3].detach()).expand_as(delta[fires]), rtol=0, atol=1e-6
    )
    assert delta[~fires].abs().max() == 0
