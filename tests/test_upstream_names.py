"""The names saekit reads inside transformers, diffusers and open_clip that are no documented
API: a forward keyword a hook picks out of ``kwargs``, a module path or block class name, an
attribute read with ``getattr``. Each is asserted here against the installed release, on a tiny
model built in code, so an upstream rename fails this file by name (transformers 5.24's rename
of ``past_key_values=`` to ``cache=`` silently disabled ``--phase decode`` instead).

Where saekit no longer needs a name (the KV cache is found by its type), the test checks what it
relies on instead."""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from adapters_support import (
    images,
    register_open_clip_config,
    tiny_clip,
    tiny_llava,
    tiny_sd3_pipeline,
)


def _parameters(cls: type) -> set[str]:
    return set(inspect.signature(cls.forward).parameters)  # type: ignore[attr-defined]


# ----------------------------------------------------------------------------- transformers


def test_llava_generation_passes_a_cache_object_and_the_mask_of_every_token():
    """``saekit.steering.context.cached_tokens`` finds the KV cache by its type (any keyword):
    the model's forward must receive a ``transformers.Cache`` (public, with ``get_seq_length``)
    or, failing that, the attention mask of every token so far with only the new ids."""
    from transformers import Cache

    from saekit.adapters.vlm import VLMAdapter
    from saekit.steering.context import cached_tokens

    model, processor = tiny_llava()
    calls: list[tuple[int, int, int | None]] = []

    def record(module, args, kwargs):
        caches = [v for v in (*args, *kwargs.values()) if isinstance(v, Cache)]
        assert len(caches) == 1, f"LLaVA's forward got {len(caches)} Cache objects"
        mask, ids = kwargs.get("attention_mask"), kwargs.get("input_ids")
        by_mask = mask.shape[1] - ids.shape[1] if mask is not None else None
        calls.append((cached_tokens(args, kwargs), caches[0].get_seq_length(), by_mask))

    handle = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        VLMAdapter(model, processor).generate(
            images(2), ["a red", "the"], max_new_tokens=3, min_new_tokens=3
        )
    finally:
        handle.remove()
    assert calls[0][:2] == (0, 0) and len(calls) == 3
    prompt = calls[1][1]
    assert [c[:2] for c in calls[1:]] == [(prompt, prompt), (prompt + 1, prompt + 1)]
    assert all(by_mask in (None, past) for past, _, by_mask in calls)  # the fallback agrees


def test_llava_module_paths_config_and_forward_keywords():
    from transformers import LlavaForConditionalGeneration

    from saekit.adapters.vlm import PARTS, VLMAdapter

    model, processor = tiny_llava()
    names = dict(model.named_modules())
    for part in PARTS:
        assert f"model.{part}" in names, f"LLaVA has no model.{part} (VLMAdapter.PARTS)"
    assert "model.language_model.layers.1" in names  # configs/ and the README's hookpoints
    assert "model.vision_tower.encoder.layers.0" in names
    config = model.config
    assert getattr(config, "image_token_id", None) is not None or hasattr(
        config, "image_token_index"
    )
    assert VLMAdapter(model, processor).image_token_id == processor.tokenizer.convert_tokens_to_ids(
        "<image>"
    )
    # CallTracker reads input_ids and attention_mask of the root call (token kinds)
    assert {"input_ids", "attention_mask", "pixel_values"} <= _parameters(
        LlavaForConditionalGeneration
    )


def test_clip_names():
    """CLIPAdapter's module paths, its logit scale, and the pooled outputs it reads."""
    from transformers import CLIPModel, CLIPTextModel

    model = tiny_clip()
    names = dict(model.named_modules())
    for path in (
        "vision_model.encoder.layers.0",
        "text_model.encoder.layers.0",
        "visual_projection",
        "text_projection",
    ):
        assert path in names, f"CLIPModel has no {path}"
    assert isinstance(model.logit_scale, torch.nn.Parameter)
    out = model.get_image_features(pixel_values=torch.randn(1, 3, 16, 16))
    assert isinstance(out, torch.Tensor) or isinstance(out.pooler_output, torch.Tensor)
    assert "input_ids" in _parameters(CLIPTextModel)  # CallTracker's text-encoder pre-hook
    assert {"input_ids", "pixel_values", "attention_mask"} <= _parameters(CLIPModel)


# ----------------------------------------------------------------------------- diffusers


@pytest.mark.parametrize(
    ("cls_name", "latents"),
    [
        ("UNet2DConditionModel", "sample"),
        ("SD3Transformer2DModel", "hidden_states"),
        ("FluxTransformer2DModel", "hidden_states"),
        ("PixArtTransformer2DModel", "hidden_states"),
    ],
)
def test_denoiser_forward_keywords(cls_name, latents):
    """``saekit.adapters.dit.denoiser_call`` reads the latents, the timestep and the prompt
    embeddings of every denoiser call by these names (keyword or position)."""
    import diffusers

    from saekit.adapters.dit import DENOISER_ARGUMENTS

    parameters = _parameters(getattr(diffusers, cls_name))
    assert {latents, "timestep", "encoder_hidden_states"} <= parameters
    assert latents in DENOISER_ARGUMENTS["latents"]
    assert DENOISER_ARGUMENTS["timestep"] == ("timestep",)
    assert DENOISER_ARGUMENTS["text"] == ("encoder_hidden_states",)


def test_a_denoiser_whose_keywords_were_renamed_is_refused():
    from torch import nn

    from saekit.adapters.dit import check_denoiser

    class Renamed(nn.Module):
        def forward(self, latents, t, prompt_embeds):
            return latents

    with pytest.raises(ValueError, match=r"takes none of \['sample', 'hidden_states'\]"):
        check_denoiser(Renamed())


def test_joint_block_classes_keywords_and_the_last_sd3_block():
    """The DiT blocks that carry a text and an image stream (``dit.JOINT_BLOCKS``) exist under
    these names, take ``hidden_states`` / ``encoder_hidden_states``, and SD3's last block says
    by ``context_pre_only`` that it returns no text."""
    import diffusers.models.transformers.transformer_flux as flux
    import diffusers.models.transformers.transformer_sd3 as sd3  # noqa: F401
    from diffusers.models.attention import JointTransformerBlock

    from saekit.adapters.dit import _UNIT_TIME_DENOISERS, JOINT_BLOCKS, joint_output

    classes = {
        "JointTransformerBlock": JointTransformerBlock,
        "FluxTransformerBlock": flux.FluxTransformerBlock,
        "FluxSingleTransformerBlock": flux.FluxSingleTransformerBlock,
    }
    assert set(classes) == JOINT_BLOCKS
    for name, cls in classes.items():
        assert {"hidden_states", "encoder_hidden_states"} <= _parameters(cls), name
    import diffusers

    for name in _UNIT_TIME_DENOISERS:
        assert hasattr(diffusers, name), name
    pipe = tiny_sd3_pipeline()
    blocks = pipe.transformer.transformer_blocks
    assert [b.context_pre_only for b in blocks] == [False] * (len(blocks) - 1) + [True]
    d = blocks[-1].norm1.linear.in_features  # the model's width
    hidden, text, temb = torch.randn(1, 4, d), torch.randn(1, 3, d), torch.randn(1, d)
    out = blocks[-1](hidden_states=hidden, encoder_hidden_states=text, temb=temb)
    assert joint_output(blocks[-1], out)[1] == 0  # no text comes back from the last block


def test_pipeline_components_and_progress_bar():
    pipe = tiny_sd3_pipeline()
    assert "transformer" in pipe.components and "text_encoder" in pipe.components
    assert callable(pipe.set_progress_bar_config)


# ----------------------------------------------------------------------------- open_clip


def test_open_clip_attributes(tmp_path):
    """OpenCLIPAdapter's reads: the towers' widths, the ViT's CLS embedding, the text pooling
    and its end-of-text id, the logit scale (and bias for SigLIP)."""
    import open_clip

    model = open_clip.create_model(register_open_clip_config(str(tmp_path)), pretrained=None)
    assert model.visual.class_embedding is not None
    assert isinstance(model.visual.output_dim, int)
    assert isinstance(model.transformer.width, int)
    assert model.text_pool_type in ("argmax", "last", "first", "none")
    assert isinstance(model.text_eos_id, int)
    assert hasattr(model, "logit_scale") and hasattr(model, "logit_bias")
    names = dict(model.named_modules())
    assert "visual.transformer.resblocks.0" in names and "transformer.resblocks.0" in names
