"""Tiny random models of the real library classes, built in code (no download), for the
adapter tests: transformers CLIP / SigLIP / LLaVA / Llama, open_clip, and diffusers pipelines
(Stable Diffusion, SD3, Flux, PixArt) with tokenizers built from in-memory vocabularies."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from saekit.adapters import ForwardContext

WORDS = [
    "a",
    "red",
    "blue",
    "green",
    "cat",
    "dog",
    "circle",
    "square",
    "on",
    "the",
    "left",
    "right",
    "top",
    "bottom",
    "of",
    "large",
    "small",
]


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one thread. The models here are tiny: a second OpenMP thread only adds
    synchronisation, which costs ~25 ms per convolution on a loaded 2-core machine (measured)
    against 0.1 ms on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- tokenizers


def _byte_alphabet() -> list[str]:
    """GPT-2's byte-to-unicode alphabet (what CLIP's byte-level BPE runs on)."""
    bs = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


CLIP_VOCAB: dict[str, int] = {}
for _c in _byte_alphabet():
    CLIP_VOCAB[_c] = len(CLIP_VOCAB)
for _c in _byte_alphabet():
    CLIP_VOCAB[_c + "</w>"] = len(CLIP_VOCAB)
CLIP_VOCAB["<|startoftext|>"] = len(CLIP_VOCAB)
CLIP_VOCAB["<|endoftext|>"] = len(CLIP_VOCAB)
BOS_ID, EOS_ID = CLIP_VOCAB["<|startoftext|>"], CLIP_VOCAB["<|endoftext|>"]


def clip_tokenizer(max_length: int = 16) -> Any:
    """A real ``CLIPTokenizer`` over single bytes (no merges): every character is a token."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer(vocab=dict(CLIP_VOCAB), merges=[], model_max_length=max_length)


T5_VOCAB = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [
    (c, -1.0) for c in "abcdefghijklmnopqrstuvwxyz▁"
]


def t5_tokenizer() -> Any:
    from transformers import T5Tokenizer

    return T5Tokenizer(vocab=list(T5_VOCAB), extra_ids=0)


def word_tokenizer(extra: tuple[str, ...] = (), *, add_eos: bool = False) -> Any:
    """A word-level fast tokenizer (``<pad> <unk> <bos> <eos> <image>`` + WORDS)."""
    import tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<bos>", "<eos>", "<image>", *extra]
    vocab = {t: i for i, t in enumerate([*specials, *WORDS, ":", ","])}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    template = "<bos> $A <eos>" if add_eos else "<bos> $A"
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single=template, special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])]
    )
    tok.decoder = tokenizers.decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="right",
    )


# ----------------------------------------------------------------------------- images


def images(n: int, size: int = 16, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)
    ]


def prompts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(1, 5)))) for _ in range(n)]


# ----------------------------------------------------------------------------- contrastive


def tiny_clip_config(**text: Any) -> Any:
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config=dict(
            vocab_size=len(CLIP_VOCAB),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=16,
            projection_dim=24,
            bos_token_id=BOS_ID,
            eos_token_id=EOS_ID,
            pad_token_id=EOS_ID,
            **text,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=16,
            patch_size=4,
            projection_dim=24,
        ),
        projection_dim=24,
    )


def tiny_clip(seed: int = 0) -> Any:
    from transformers import CLIPModel

    torch.manual_seed(seed)
    return CLIPModel(tiny_clip_config()).eval()


def tiny_siglip(seed: int = 0) -> Any:
    from transformers import SiglipConfig, SiglipModel

    torch.manual_seed(seed)
    config = SiglipConfig(
        text_config=dict(
            vocab_size=len(CLIP_VOCAB),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=16,
            pad_token_id=EOS_ID,
            eos_token_id=EOS_ID,
            bos_token_id=BOS_ID,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=16,
            patch_size=4,
        ),
    )
    return SiglipModel(config).eval()


OPEN_CLIP_NAME = "saekit-tiny-test"
OPEN_CLIP_CONFIG = dict(
    embed_dim=24,
    vision_cfg=dict(image_size=16, layers=2, width=32, patch_size=4, head_width=16),
    text_cfg=dict(context_length=16, vocab_size=49408, width=32, heads=2, layers=2),
)


@functools.cache
def register_open_clip_config(directory: str) -> str:
    """Register the tiny open_clip architecture (a JSON config, open_clip's own mechanism)."""
    import json
    from pathlib import Path

    import open_clip

    path = Path(directory) / f"{OPEN_CLIP_NAME}.json"
    path.write_text(json.dumps(OPEN_CLIP_CONFIG))
    open_clip.add_model_config(path)
    return OPEN_CLIP_NAME


# ----------------------------------------------------------------------------- diffusion


def _clip_text_encoder(cls_name: str = "CLIPTextModel", hidden: int = 32) -> Any:
    import transformers

    config = transformers.CLIPTextConfig(
        vocab_size=len(CLIP_VOCAB),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=16,
        projection_dim=hidden,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=EOS_ID,
    )
    return getattr(transformers, cls_name)(config).eval()


def _t5_encoder() -> Any:
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(vocab_size=len(T5_VOCAB), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
    ).eval()


def _vae(**kwargs: Any) -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
        **kwargs,
    ).eval()


def tiny_sd_pipeline(seed: int = 0) -> Any:
    """A real ``StableDiffusionPipeline``: a tiny UNet with cross-attention down/mid/up blocks,
    VAE, CLIP text encoder and tokenizer; 16x16 images, 8x8 latents."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
    ).eval()
    pipe = StableDiffusionPipeline(
        vae=_vae(),
        text_encoder=_clip_text_encoder(),
        tokenizer=clip_tokenizer(),
        unet=unet,
        scheduler=DDIMScheduler(steps_offset=1, clip_sample=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl_pipeline(seed: int = 0) -> Any:
    """A real ``StableDiffusionXLPipeline`` (two text encoders, the text-time embedding), with
    SDXL-Turbo's scheduler: cross-attention blocks at ``down_blocks.1``, ``mid_block`` and
    ``up_blocks.0`` like SDXL's ``down_blocks.2`` / ``mid_block`` / ``up_blocks.0``."""
    from diffusers import (
        EulerAncestralDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4),
        cross_attention_dim=64,  # the two text encoders' hidden states, concatenated
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=8 * 6 + 32,
        norm_num_groups=8,
    ).eval()
    pipe = StableDiffusionXLPipeline(
        vae=_vae(),
        text_encoder=_clip_text_encoder(),
        text_encoder_2=_clip_text_encoder("CLIPTextModelWithProjection"),
        tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(),
        unet=unet,
        scheduler=EulerAncestralDiscreteScheduler(timestep_spacing="trailing"),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sd3_pipeline(seed: int = 0) -> Any:
    """A real ``StableDiffusion3Pipeline``: two joint blocks (the last context_pre_only), two
    CLIP text encoders with projection and a T5 encoder."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        caption_projection_dim=16,
        pooled_projection_dim=64,
        out_channels=4,
        pos_embed_max_size=16,
    ).eval()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_vae(shift_factor=0.0, scaling_factor=1.0),
        text_encoder=_clip_text_encoder("CLIPTextModelWithProjection"),
        tokenizer=clip_tokenizer(),
        text_encoder_2=_clip_text_encoder("CLIPTextModelWithProjection"),
        tokenizer_2=clip_tokenizer(),
        text_encoder_3=_t5_encoder(),
        tokenizer_3=t5_tokenizer(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_flux_pipeline(seed: int = 0) -> Any:
    """A real ``FluxPipeline``: one double-stream and two single-stream blocks."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=(2, 2, 4),
    ).eval()
    pipe = FluxPipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_vae(shift_factor=0.0, scaling_factor=1.0),
        text_encoder=_clip_text_encoder(),
        tokenizer=clip_tokenizer(),
        text_encoder_2=_t5_encoder(),
        tokenizer_2=t5_tokenizer(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_pixart_pipeline(seed: int = 0) -> Any:
    """A real ``PixArtAlphaPipeline``: two image-token blocks cross-attending to T5."""
    from diffusers import DDIMScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel

    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(
        sample_size=8,
        num_layers=2,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=2,
        caption_channels=32,
        in_channels=4,
        cross_attention_dim=16,
        out_channels=8,
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
    ).eval()
    pipe = PixArtAlphaPipeline(
        tokenizer=t5_tokenizer(),
        text_encoder=_t5_encoder(),
        vae=_vae(),
        transformer=transformer,
        scheduler=DDIMScheduler(steps_offset=1, clip_sample=False),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ----------------------------------------------------------------------------- VLM and LM


def tiny_llava(seed: int = 0) -> tuple[Any, Any]:
    """A real ``LlavaForConditionalGeneration`` (CLIP vision tower, tiny Llama) and a
    ``LlavaProcessor`` (word-level tokenizer, CLIP image processor)."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = word_tokenizer()
    vocab = len(tokenizer)
    ids = tokenizer.convert_tokens_to_ids
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=16,
        patch_size=4,
    )
    text = LlamaConfig(
        vocab_size=vocab,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=ids("<pad>"),
        bos_token_id=ids("<bos>"),
        eos_token_id=ids("<eos>"),
    )
    config = LlavaConfig(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        image_token_index=ids("<image>"),
        image_seq_length=16,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(
            do_resize=False, do_center_crop=False, image_mean=[0.5] * 3, image_std=[0.5] * 3
        ),
        tokenizer=tokenizer,
        patch_size=4,
        vision_feature_select_strategy="default",
        image_token="<image>",
        num_additional_image_tokens=1,
    )
    return model, processor


def tiny_llava_next(seed: int = 0) -> tuple[Any, Any]:
    """A real ``LlavaNextForConditionalGeneration`` whose images are split into crops of 16 px
    (a 16x16 image gives 3 crops, a 32x32 one 5), and its ``LlavaNextProcessor``."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    tokenizer = word_tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    grid = [[16, 32], [32, 16], [32, 32]]
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=16,
        patch_size=4,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=ids("<pad>"),
    )
    config = LlavaNextConfig(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        image_token_index=ids("<image>"),
        image_grid_pinpoints=grid,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config).eval()
    processor = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessor(
            size={"shortest_edge": 16},
            crop_size={"height": 16, "width": 16},
            image_grid_pinpoints=grid,
            image_mean=[0.5] * 3,
            image_std=[0.5] * 3,
        ),
        tokenizer=tokenizer,
        patch_size=4,
        vision_feature_select_strategy="default",
        image_token="<image>",
        num_additional_image_tokens=1,
    )
    return model, processor


def tiny_llama(seed: int = 0) -> tuple[Any, Any]:
    """A real ``LlamaForCausalLM`` and a word-level tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = word_tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    torch.manual_seed(seed)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=64,
            pad_token_id=ids("<pad>"),
            bos_token_id=ids("<bos>"),
            eos_token_id=ids("<eos>"),
        )
    ).eval()
    return model, tokenizer


# ----------------------------------------------------------------------------- hooks


@contextlib.contextmanager
def recording(
    root: nn.Module, paths: list[str], pick: Callable[[Any], Tensor] | None = None
) -> Iterator[dict[str, list[Tensor]]]:
    """Record the outputs of modules with plain forward hooks (no saekit), removed on exit."""
    seen: dict[str, list[Tensor]] = {p: [] for p in paths}
    handles = []

    def first(output: Any) -> Tensor:
        if isinstance(output, Tensor):
            return output
        if isinstance(output, (tuple, list)):
            return first(output[0])
        return next(v for v in output.values() if isinstance(v, Tensor))

    for path in paths:
        handles.append(
            root.get_submodule(path).register_forward_hook(
                lambda m, a, out, path=path: seen[path].append(
                    (pick or first)(out).detach().clone()
                )
            )
        )
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


class NullScope:
    """A ForwardScope that records every announced context."""

    def __init__(self) -> None:
        self.contexts: list[ForwardContext] = []

    @contextlib.contextmanager
    def forward(self, context: ForwardContext, *, stoppable: bool = True) -> Iterator[None]:
        self.contexts.append(context)
        yield

    def set_context(self, context: ForwardContext) -> None:
        self.contexts.append(context)


def installed_hooks(root: nn.Module) -> set[tuple[str, str, int]]:
    """Every forward hook and pre-hook under ``root``, as (module path, kind, hook id).

    transformers installs hooks of its own (to record hidden states) the first time a model is
    asked for them, so tests compare these sets before and after, rather than counting."""
    found = set()
    for name, module in root.named_modules():
        found |= {(name, "hook", i) for i in module._forward_hooks}
        found |= {(name, "pre_hook", i) for i in module._forward_pre_hooks}
    return found
