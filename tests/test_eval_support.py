"""Tiny real models and dictionaries for the evaluation and dashboard tests (no tests here)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from saekit.dictionaries import SAEConfig, SparseAutoencoder, build_dictionary


def identity_dictionary(
    d: int, *, hookpoint: str | None = None, capture: str = "output", architecture: str = "relu"
) -> SparseAutoencoder:
    """A dictionary that reconstructs every input exactly: latents ``relu(x)`` and ``relu(-x)``
    with decoder rows ``+e_i`` and ``-e_i`` (TopK with k = d picks the same |x_i|)."""
    k = d if architecture == "topk" else 32
    cfg = SAEConfig(
        architecture=architecture,  # type: ignore[arg-type]
        d_in=d,
        d_sae=2 * d,
        k=min(k, 2 * d),
        hookpoint=hookpoint,
        capture=capture,  # type: ignore[arg-type]
    )
    sae = build_dictionary(cfg)
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye]))
        sae.W_dec.copy_(torch.cat([eye, -eye]))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae.eval()


def random_dictionary(
    d: int, m: int, k: int, *, hookpoint: str | None = None, capture: str = "output", seed: int = 0
) -> SparseAutoencoder:
    """A TopK dictionary with random unit decoder rows (a poor, lossy reconstruction)."""
    cfg = SAEConfig(
        architecture="topk",
        d_in=d,
        d_sae=m,
        k=k,
        seed=seed,
        hookpoint=hookpoint,
        capture=capture,  # type: ignore[arg-type]
    )
    return build_dictionary(cfg).eval()


def word_tokenizer(words: list[str], *, max_length: int = 16):
    """A word-level ``PreTrainedTokenizerFast`` (real transformers class) over ``words``."""
    import tokenizers
    import transformers

    specials = ["<pad>", "<unk>", "<bos>", "<eos>"]
    vocab = {w: i for i, w in enumerate(specials + words)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", 2), ("<eos>", 3)]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=max_length,
    )


def tiny_clip(vocab_size: int, *, hidden: int = 32, image_size: int = 16, seed: int = 0):
    """A randomly initialised transformers ``CLIPModel`` with 2 layers per tower."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    cfg = CLIPConfig(
        text_config=dict(
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=16,
            projection_dim=16,
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=3,
        ),
        vision_config=dict(
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=image_size,
            patch_size=4,
            projection_dim=16,
        ),
        projection_dim=16,
    )
    return CLIPModel(cfg).eval()


def tiny_llama(vocab_size: int = 40, *, hidden: int = 32, seed: int = 0):
    """A randomly initialised transformers ``LlamaForCausalLM`` with 2 layers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_unet(*, channels: int = 3, cross_dim: int = 16, seed: int = 0):
    """A randomly initialised diffusers ``UNet2DConditionModel`` on 8x8 samples."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=channels,
        out_channels=channels,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_dim,
        attention_head_dim=4,
        norm_num_groups=8,
    ).eval()


class TinyTextToImage:
    """Prompts -> images with a real UNet2DConditionModel and DDIMScheduler: a learned embedding
    per prompt word stands in for a text encoder (seeded noise, 4 steps, no guidance)."""

    def __init__(self, words: list[str], seed: int = 0) -> None:
        from diffusers import DDIMScheduler

        self.unet = tiny_unet(seed=seed)
        torch.manual_seed(seed + 1)
        self.words = {w: i for i, w in enumerate(words)}
        self.embed = nn.Embedding(len(words) + 1, 16)
        self.scheduler = DDIMScheduler(num_train_timesteps=100)

    def context(self, prompts: list[str]) -> Tensor:
        ids = torch.tensor(
            [
                [self.words.get(w, len(self.words)) for w in (p.split() + ["?"] * 4)[:4]]
                for p in prompts
            ]
        )
        return self.embed(ids)  # (B, 4, 16)

    @torch.no_grad()
    def __call__(self, prompts, seeds) -> Tensor:
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        sample = torch.stack([torch.randn(3, 8, 8, generator=g) for g in generators])
        context = self.context(list(prompts))
        self.scheduler.set_timesteps(4)
        for t in self.scheduler.timesteps:
            noise = self.unet(sample, t, encoder_hidden_states=context).sample
            sample = self.scheduler.step(noise, t, sample).prev_sample
        return (sample / 2 + 0.5).clamp(0, 1)


class OneHotTokens(nn.Module):
    """Token ids ``(B, T)`` -> one-hot rows ``(B, T, V)`` at ``embed`` -> a linear readout."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, vocab)
        self.head = nn.Linear(vocab, vocab)
        with torch.no_grad():
            self.embed.weight.copy_(torch.eye(vocab))

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(self.embed(ids))


def one_hot_tokens(vocab: int = 8) -> OneHotTokens:
    """The factory ``saekit eval --model test_eval_support:one_hot_tokens`` loads."""
    torch.manual_seed(0)
    return OneHotTokens(vocab).eval()


@pytest.fixture
def one_thread():
    """Run a test's small models on one thread: on a shared 2-core machine, two OpenMP threads
    that wait for each other make a tiny UNet ~50x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def one_thread_module():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
