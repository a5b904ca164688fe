"""The testbed's three models: their configurations, tokenizer, and loaders of the shipped weights.

Every model is a stock library class with a tiny configuration, saved with the library's own
``save_pretrained`` and loaded with its own ``from_pretrained`` from a directory inside this
package (no network, no pickle: safetensors and JSON only):

- ``pretrained/clip``: transformers ``CLIPModel`` (ViT image tower on 4x4 patches, causal text
  tower), with a word-level tokenizer over the caption vocabulary (``AutoTokenizer`` loads it) and
  a ``CLIPImageProcessor``;
- ``pretrained/pipeline``: `TestbedPipeline`, a pixel-space diffusers pipeline whose
  ``UNet2DConditionModel`` cross-attends to the CLIP text tower's last hidden states;
- ``pretrained/vlm``: transformers ``LlavaForConditionalGeneration`` (the CLIP image tower, a
  small Llama), with a ``LlavaProcessor``.

The training recipes are ``scripts/train_testbed_{oracle,clip,diffusion,vlm}.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .._optional import require
from . import world

if TYPE_CHECKING:
    from transformers import (
        CLIPConfig,
        CLIPModel,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerBase,
    )

    from .pipeline import TestbedPipeline

PRETRAINED = Path(__file__).parent / "pretrained"
CLIP_DIR = PRETRAINED / "clip"
PIPELINE_DIR = PRETRAINED / "pipeline"
VLM_DIR = PRETRAINED / "vlm"

PAD, UNK, BOS, EOS, IMAGE = "<pad>", "<unk>", "<bos>", "<eos>", "<image>"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS, IMAGE)
MAX_TEXT_TOKENS = 32
"""Text positions of the CLIP text tower; the longest caption is 25 tokens with BOS/EOS."""

IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)
PATCH_SIZE = 4
NUM_IMAGE_TOKENS = (world.IMAGE_SIZE // PATCH_SIZE) ** 2
"""Patch tokens per image (the LLaVA projector sees these, without the CLS token)."""


# --------------------------------------------------------------------------------------------
# tokenizer and processors


def build_tokenizer(*, add_eos: bool) -> PreTrainedTokenizerBase:
    """A word-level fast tokenizer over `world.vocabulary` (every caption word is one token).

    ``add_eos=True`` (CLIP text tower): ``<bos> words <eos>``, and the tower pools at ``<eos>``.
    ``add_eos=False`` (the VLM's language model): ``<bos> words``, generation writes the ``<eos>``.
    Saved with ``save_pretrained``, it loads with ``AutoTokenizer.from_pretrained(directory)``.
    """
    tokenizers = require("tokenizers", "the testbed tokenizer")
    transformers = require("transformers", "the testbed models")
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *world.vocabulary()])}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token=UNK))
    tok.normalizer = tokenizers.normalizers.Lowercase()
    # "red," and "red ," both give ["red", ","]
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Sequence(
        [
            tokenizers.pre_tokenizers.WhitespaceSplit(),
            tokenizers.pre_tokenizers.Punctuation(behavior="isolated"),
        ]
    )
    template = f"{BOS} $A {EOS}" if add_eos else f"{BOS} $A"
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single=template,
        special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])],
    )
    tok.decoder = tokenizers.decoders.WordPiece(prefix="##")  # joins words with spaces
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        extra_special_tokens={"image_token": IMAGE} if not add_eos else None,
        model_max_length=MAX_TEXT_TOKENS if add_eos else 128,
        padding_side="right",
    )


def build_image_processor() -> Any:
    """A ``CLIPImageProcessor`` for the world's 32x32 images: rescale and normalise, no resize."""
    transformers = require("transformers", "the testbed models")
    return transformers.CLIPImageProcessor(
        do_resize=False,
        do_center_crop=False,
        do_rescale=True,
        do_normalize=True,
        image_mean=list(IMAGE_MEAN),
        image_std=list(IMAGE_STD),
        do_convert_rgb=True,
    )


def pixel_values(images: torch.Tensor) -> torch.Tensor:
    """World images ``(N, 3, H, W)`` in [0, 1] -> the image tower's input (what the processor does)."""
    mean = torch.tensor(IMAGE_MEAN, dtype=images.dtype, device=images.device)[:, None, None]
    std = torch.tensor(IMAGE_STD, dtype=images.dtype, device=images.device)[:, None, None]
    return (images - mean) / std


# --------------------------------------------------------------------------------------------
# configurations


def clip_config(vocab_size: int, *, hidden: int = 128, layers: int = 4) -> CLIPConfig:
    """A tiny ``CLIPConfig``: ViT on 4x4 patches of 32x32 images, a causal text tower."""
    transformers = require("transformers", "the testbed models")
    ids = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    text = transformers.CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        projection_dim=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=MAX_TEXT_TOKENS,
        hidden_act="gelu",
        pad_token_id=ids[PAD],
        bos_token_id=ids[BOS],
        eos_token_id=ids[EOS],  # the text tower pools at the first <eos>
    )
    vision = transformers.CLIPVisionConfig(
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        projection_dim=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        image_size=world.IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        hidden_act="gelu",
    )
    return transformers.CLIPConfig(
        text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=hidden
    )


def llava_config(
    clip: CLIPConfig, vocab_size: int, *, hidden: int = 192, layers: int = 4
) -> LlavaConfig:
    """A tiny ``LlavaConfig``: the CLIP image tower and a small Llama language model."""
    transformers = require("transformers", "the testbed models")
    ids = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    text = transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=3 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        pad_token_id=ids[PAD],
        bos_token_id=ids[BOS],
        eos_token_id=ids[EOS],
        tie_word_embeddings=True,
    )
    return transformers.LlavaConfig(
        vision_config=clip.vision_config.to_dict(),  # type: ignore[union-attr]
        text_config=text.to_dict(),
        image_token_index=ids[IMAGE],
        image_seq_length=NUM_IMAGE_TOKENS,
        vision_feature_select_strategy="default",  # drop CLS: one token per patch
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
    )


# --------------------------------------------------------------------------------------------
# loaders of the shipped models


def require_model_dir(directory: str | Path, script: str) -> Path:
    """``directory`` if it holds a saved model, else an error naming the script that makes one."""
    directory = Path(directory)
    if not (directory / "config.json").exists() and not (directory / "model_index.json").exists():
        raise FileNotFoundError(
            f"no testbed model at {directory}; it ships with saekit (reinstall the package) or "
            f"can be retrained with `python scripts/{script}`"
        )
    return directory


def load_clip(directory: str | Path = CLIP_DIR) -> tuple[CLIPModel, PreTrainedTokenizerBase]:
    """The shipped contrastive model and its tokenizer, in eval mode, from a local directory."""
    transformers = require("transformers", "the testbed models")
    directory = require_model_dir(Path(directory), "train_testbed_clip.py")
    model = transformers.CLIPModel.from_pretrained(directory, local_files_only=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)
    return model.eval(), tokenizer


def load_pipeline(directory: str | Path = PIPELINE_DIR) -> TestbedPipeline:
    """The shipped text-to-image pipeline (UNet, scheduler, CLIP text tower, tokenizer)."""
    from .pipeline import TestbedPipeline

    directory = require_model_dir(Path(directory), "train_testbed_diffusion.py")
    pipe = TestbedPipeline.from_pretrained(directory, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_vlm(
    directory: str | Path = VLM_DIR,
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """The shipped LLaVA-style VLM and its processor (tokenizer + image processor)."""
    transformers = require("transformers", "the testbed models")
    directory = require_model_dir(Path(directory), "train_testbed_vlm.py")
    model = transformers.LlavaForConditionalGeneration.from_pretrained(
        directory, local_files_only=True
    )
    processor = transformers.LlavaProcessor.from_pretrained(directory, local_files_only=True)
    return model.eval(), processor
