"""Talking to the testbed VLM: its prompt formats, captioning and question answering.

The VLM reads ``<image> describe :`` and writes the world's canonical caption; it reads
``<image> question : <question> answer :`` and writes the answer (a factor value, or ``one`` /
``two`` for the count). `LlavaProcessor` expands ``<image>`` into one token per image patch.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

import torch

from . import world
from .models import EOS, IMAGE, NUM_IMAGE_TOKENS

if TYPE_CHECKING:
    from transformers import LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerBase

CAPTION_PROMPT = f"{IMAGE} describe :"


def question_prompt(question: str) -> str:
    return f"{IMAGE} question : {question} answer :"


def encode_example(
    tokenizer: PreTrainedTokenizerBase, prompt: str, target: str
) -> tuple[list[int], list[int]]:
    """Token ids and labels (``-100`` on the prompt) of one training example.

    The ids equal what ``LlavaProcessor`` produces for ``prompt + " " + target`` (``<image>``
    expanded to one token per patch), followed by ``<eos>``.
    """
    image_id = tokenizer.convert_tokens_to_ids(IMAGE)
    prompt_ids = tokenizer(prompt.replace(IMAGE, ""))["input_ids"]  # [<bos>, words...]
    prompt_ids = prompt_ids[:1] + [image_id] * NUM_IMAGE_TOKENS + prompt_ids[1:]
    target_ids = tokenizer(target, add_special_tokens=False)["input_ids"]
    target_ids = [*target_ids, tokenizer.convert_tokens_to_ids(EOS)]
    return prompt_ids + target_ids, [-100] * len(prompt_ids) + target_ids


@torch.no_grad()
def generate(
    model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    images: torch.Tensor,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 64,
) -> list[str]:
    """Greedy completions of ``prompts[i]`` about ``images[i]`` (``(N, 3, H, W)`` in [0, 1]).

    Prompts are batched by token length, so no batch needs padding.
    """
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    pil = world.to_pil(images)
    groups: dict[int, list[int]] = defaultdict(list)
    for i, prompt in enumerate(prompts):
        groups[len(prompt.split())].append(i)
    eos = processor.tokenizer.convert_tokens_to_ids(EOS)
    out: list[str] = [""] * len(prompts)
    for indices in groups.values():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            inputs = processor(
                images=[pil[i] for i in chunk],
                text=[prompts[i] for i in chunk],
                return_tensors="pt",
            )
            generated = cast(Any, model).generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=processor.tokenizer.pad_token_id,
            )
            new = generated[:, inputs["input_ids"].shape[1] :]
            texts = processor.tokenizer.batch_decode(new, skip_special_tokens=True)
            for i, text in zip(chunk, texts, strict=True):
                out[i] = text.strip()
    return out


def caption(
    model: LlavaForConditionalGeneration, processor: LlavaProcessor, images: torch.Tensor
) -> list[str]:
    """The VLM's caption of each image."""
    return generate(model, processor, images, [CAPTION_PROMPT] * len(images))


def answer(
    model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    images: torch.Tensor,
    questions: Sequence[str],
) -> list[str]:
    """The VLM's answer to ``questions[i]`` about ``images[i]``."""
    return generate(
        model, processor, images, [question_prompt(q) for q in questions], max_new_tokens=4
    )
