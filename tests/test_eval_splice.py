"""Splicing a dictionary into real transformers and diffusers models: with the error term the
clean outputs come back bit for bit; without it the hookpoint carries the reconstruction in the
right layout; edits reach the model; hooks go away on exit, even after an error."""

from __future__ import annotations

import pytest
import torch
from test_eval_support import (
    identity_dictionary,
    one_thread_module,  # noqa: F401 (a fixture)
    random_dictionary,
    tiny_clip,
    tiny_llama,
    tiny_unet,
)
from torch import nn

from saekit.adapters import CustomAdapter, rows_from_channels_first
from saekit.evaluation import ablate, splice
from saekit.evaluation.splice import resolve_layout
from saekit.kernels import SparseCodes

pytestmark = pytest.mark.usefixtures("one_thread_module")


def _clip_inputs():
    g = torch.Generator().manual_seed(1)
    return {
        "input_ids": torch.randint(4, 30, (3, 7), generator=g),
        "pixel_values": torch.randn(3, 3, 16, 16, generator=g),
    }


def _unet_inputs():
    g = torch.Generator().manual_seed(2)
    return (
        torch.randn(2, 3, 8, 8, generator=g),
        torch.tensor(10),
        torch.randn(2, 4, 16, generator=g),
    )


def _no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize(
    "hookpoint, capture",
    [
        ("vision_model.encoder.layers.0", "output"),
        ("vision_model.encoder.layers.1", "update"),
        ("text_model.encoder.layers.0.mlp", "input"),
    ],
)
def test_error_term_reproduces_clip_exactly(hookpoint, capture):
    model, inputs = tiny_clip(30), _clip_inputs()
    sae = random_dictionary(32, 64, 4, hookpoint=hookpoint, capture=capture)
    with torch.no_grad():
        clean = model(**inputs)
        with splice(model, sae, error_term=True) as handle:
            kept = model(**inputs)
        with splice(model, sae) as spliced_handle:
            spliced = model(**inputs)
    assert handle.calls == 1 and spliced_handle.calls == 1
    assert torch.equal(kept.logits_per_image, clean.logits_per_image)
    assert torch.equal(kept.image_embeds, clean.image_embeds)
    assert torch.equal(kept.text_embeds, clean.text_embeds)
    # without the error term the lossy dictionary changes the outputs
    assert not torch.allclose(spliced.logits_per_image, clean.logits_per_image)
    assert _no_hooks(model)


def test_error_term_reproduces_llama_exactly_and_generation_too():
    model = tiny_llama()
    ids = torch.randint(3, 40, (2, 9), generator=torch.Generator().manual_seed(0))
    sae = random_dictionary(32, 64, 4, hookpoint="model.layers.0", capture="update")
    with torch.no_grad():
        clean = model(ids).logits
        clean_gen = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
        with splice(model, sae, error_term=True):
            kept = model(ids).logits
            kept_gen = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(kept, clean)
    assert torch.equal(kept_gen, clean_gen)


def test_error_term_reproduces_unet_exactly():
    unet = tiny_unet()
    sample, t, context = _unet_inputs()
    sae = random_dictionary(32, 64, 4, hookpoint="mid_block")
    with torch.no_grad():
        clean = unet(sample, t, encoder_hidden_states=context).sample
        with splice(unet, sae, error_term=True):
            kept = unet(sample, t, encoder_hidden_states=context).sample
    assert torch.equal(kept, clean)


def test_spliced_feature_map_is_the_reconstruction_channels_last():
    """A (B, C, H, W) map is read per spatial position (C = d) and written back in place."""
    unet = tiny_unet()
    sample, t, context = _unet_inputs()
    sae = random_dictionary(32, 64, 4, hookpoint="mid_block")
    seen: dict[str, torch.Tensor] = {}

    def record(name):
        def hook(module, args, output):
            seen[name] = output.detach().clone()

        return hook

    with torch.no_grad():
        handle = unet.mid_block.register_forward_hook(record("clean"))
        unet(sample, t, encoder_hidden_states=context)
        handle.remove()
        with splice(unet, sae):
            # a hook registered after the splice's sees the spliced output
            handle = unet.mid_block.register_forward_hook(record("spliced"))
            unet(sample, t, encoder_hidden_states=context)
            handle.remove()
    fmap = seen["clean"]  # (B, C, H, W)
    b, c, h, w = fmap.shape
    rows = fmap.permute(0, 2, 3, 1).reshape(-1, c)  # (B·H·W, C)
    expected = sae(rows).reshape(b, h, w, c).permute(0, 3, 1, 2)
    torch.testing.assert_close(seen["spliced"], expected)


def test_identity_dictionary_splice_leaves_llama_unchanged():
    model = tiny_llama()
    ids = torch.randint(3, 40, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        clean = model(ids).logits
        with splice(model, identity_dictionary(32, hookpoint="model.layers.1")):
            spliced = model(ids).logits
    torch.testing.assert_close(spliced, clean, rtol=0, atol=1e-5)


def test_update_capture_writes_input_plus_reconstructed_update():
    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = nn.Linear(4, 4)

        def forward(self, x):
            return x + self.block(x)

    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.res = Residual()

        def forward(self, x):
            return self.res(x)

    model = Outer()
    x = torch.randn(5, 4)
    sae = random_dictionary(4, 8, 1, hookpoint="res", capture="update")
    with torch.no_grad(), splice(model, sae):
        out = model(x)
        expected = x + sae(model.res.block(x))
    torch.testing.assert_close(out, expected)


def test_edit_with_error_term_changes_exactly_what_was_edited():
    model = nn.Sequential(nn.Linear(6, 6), nn.Identity())
    x = torch.randn(10, 6)
    sae = random_dictionary(6, 12, 3, hookpoint="0")

    def drop_latent_zero(codes: SparseCodes) -> SparseCodes:
        return codes._replace(values=torch.where(codes.indices == 0, 0.0, codes.values))

    with torch.no_grad():
        clean = model(x)
        with splice(model, sae, error_term=True, edit=drop_latent_zero):
            edited = model(x)
        z0 = sae.encode_dense(clean)[:, 0]  # (N,)
    torch.testing.assert_close(edited, clean - z0[:, None] * sae.W_dec[0], rtol=1e-5, atol=1e-5)
    assert (z0 > 0).any()  # the edit did something


def test_hooks_are_removed_after_an_error():
    model = tiny_llama()
    ids = torch.randint(3, 40, (1, 5))
    sae = random_dictionary(32, 64, 4, hookpoint="model.layers.0")
    with pytest.raises(RuntimeError, match="boom"), splice(model, sae):
        model(ids)
        raise RuntimeError("boom")
    assert _no_hooks(model)
    handle = splice(model, sae)
    assert handle.active
    handle.remove()
    assert _no_hooks(model) and not handle.active


def test_zero_ablation_and_mean_ablation():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    x = torch.randn(4, 3)
    with torch.no_grad():
        with ablate(model, "0"):
            zero = model(x)
        mean = torch.tensor([1.0, 2.0, 3.0])
        with ablate(model, "0", mean=mean):
            meaned = model(x)
        bias = model[1].bias.expand(4, 2)
        torch.testing.assert_close(zero, bias)
        torch.testing.assert_close(meaned, model[1](mean.expand(4, 3)))


def test_layout_rules_and_their_errors():
    assert resolve_layout((2, 5, 8), 8) == "last"
    assert resolve_layout((2, 8, 4, 4), 8) == "channels_first"
    with pytest.raises(ValueError, match="both in dimension 1 and last"):
        resolve_layout((2, 8, 8), 8)
    with pytest.raises(ValueError, match="no dimension of the dictionary's width d_in=7"):
        resolve_layout((2, 5, 8), 7)
    # an adapter's flatten rule settles the ambiguous case
    adapter = CustomAdapter(nn.Identity(), flatten=lambda h, t, c: rows_from_channels_first(t, c))
    assert resolve_layout((2, 8, 8), 8, adapter=adapter) == "channels_first"
    assert resolve_layout((2, 8, 8), 8, adapter=CustomAdapter(nn.Identity())) == "last"


def test_unknown_hookpoint_and_wrong_width_are_clear():
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"has no module 'model\.layers\.9'"):
        splice(model, random_dictionary(32, 64, 4, hookpoint="model.layers.9"))
    with (
        pytest.raises(ValueError, match="no dimension of the dictionary's width"),
        splice(model, random_dictionary(16, 32, 4, hookpoint="model.layers.0")),
        torch.no_grad(),
    ):
        model(torch.randint(3, 40, (1, 5)))
    assert _no_hooks(model)
