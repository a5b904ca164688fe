"""Where an SAE training step's time goes: FLOPs and bytes per phase, and the floor they set.

For a batch of N tokens of width d, m latents and k active per token (TopK), bf16 copies of the
float32 master weights for every read (autocast), float32 accumulation and gradients:

=====================  ==============  ==============================================
phase                  FLOPs           bytes moved, at least
=====================  ==============  ==============================================
encoder product        2 N d m         2 N d + 2 m d  (+ 2 N m unfused: the pre-
                                       activations written in bf16)
top-k, unfused         N m             2 N m: ``torch.topk`` reads them back
decoder (gather)       2 N k d         2 N k d + 4 N d
decoder backward       4 N k d         2 N k d + 4 N d  (activation gradients: dots)
                                       + 4 N k d + 4 N d  (W_dec: fp32 scatter-add)
encoder backward       4 N k d         4 N k d + 2 N d  (W_enc, b_enc: scatter-add)
                                       + 2 N k d + 4 N d  (input gradient: gather)
AuxK (n_dead, k_aux)   2 N d n_dead    the encoder product on the dead rows, then the
                       + 10 N k_aux d  three sparse phases above with k_aux for k
optimizer and upkeep   ~ 20 m d        ~ 124 m d: Adam reads p, g, m, v and writes p, m,
                                       v (28 B per parameter); bf16 copies (6 B); fresh
                                       gradients (4 B); clipping (12 B); the decoder
                                       rows' projection and renormalisation (24 B per
                                       decoder element)
=====================  ==============  ==============================================

Only the encoder's forward is a dense product: the k active latents of a token are the only
ones with a gradient, so the backward is gathers and scatter-adds (Gao et al. 2024, "Scaling
and evaluating sparse autoencoders", appendix D), where an ``nn.Linear`` SAE would spend two
more dense products. Each phase takes at least ``max(FLOPs / peak FLOP/s, bytes / peak B/s)``
and the phases run one after another, so the step's floor is the sum.

Worked out for an H100 SXM (989 TFLOP/s dense bf16, 3.35 TB/s HBM3 nominal; the benchmark
measures both ceilings instead) at N = 16384, without AuxK:

* d = 768, m = 24576, k = 32: the product is 38 ns per token; the sparse phases move 358 kB per
  token (107 ns); the optimizer's 2.3 GB per step is 43 ns per token. Floor 188 ns per token,
  **5.3M tokens/s**: memory traffic dominates. Unfused, reading the pre-activations back adds at
  least 15 ns (+8 %), before ``torch.topk``'s own passes over them.
* d = 4096, m = 131072, k = 64: the product is 1.09 us per token, the sparse phases 1.12 us
  (3.7 MB), the optimizer 1.21 us (67 GB per step: at this width as much as the product, unless
  the batch grows). Floor 3.4 us per token, **0.29M tokens/s**; unfused +2 %.
* AuxK with the default ``k_aux = d / 2`` runs the sparse phases with 384 entries per token
  instead of 32: at d = 768 with 10 % of the latents dead the floor falls to 0.70M tokens/s.
  While latents are dead, AuxK is the most expensive part of a step.

The issue's rough figures (12M and 0.7M tokens/s) leave out the optimizer and count fewer
sparse passes; these are the figures the benchmark reports against.
"""

from __future__ import annotations

from dataclasses import dataclass

BF16 = 2
FP32 = 4

ADAM_BYTES = 28  # read p, g, m, v; write p, m, v (fp32)
CAST_BYTES = 6  # read fp32 master, write its bf16 copy
GRAD_BYTES = 4  # each weight gradient is written once
CLIP_BYTES = 12  # gradient norm (read), then scale (read + write)
DECODER_BYTES = 24  # parallel-gradient removal (12) and row renormalisation (12)


@dataclass(frozen=True)
class Phase:
    """One phase of a step: its arithmetic and its minimum memory traffic."""

    name: str
    flops: float
    bytes: float

    def floor_seconds(self, flops_per_s: float, bytes_per_s: float) -> float:
        """The least time this phase can take on a machine with these ceilings."""
        return max(self.flops / flops_per_s, self.bytes / bytes_per_s)


def encoder_product(n: int, d: int, m: int, *, fused: bool = True) -> Phase:
    written = 0 if fused else BF16 * n * m  # unfused: the pre-activations go to memory
    return Phase("encoder product", 2 * n * d * m, BF16 * (n * d + m * d) + written)


def unfused_topk(n: int, m: int) -> Phase:
    """``torch.topk`` reading the pre-activations back (at least once)."""
    return Phase("top-k over pre-activations", n * m, BF16 * n * m)


def sparse_decode(n: int, d: int, k: float) -> Phase:
    return Phase("decode", 2 * n * k * d, BF16 * n * k * d + FP32 * n * d)


def sparse_decode_backward(n: int, d: int, k: float) -> Phase:
    dots = BF16 * n * k * d + FP32 * n * d
    scatter = FP32 * n * k * d + FP32 * n * d
    return Phase("decode backward", 4 * n * k * d, dots + scatter)


def sparse_encode_backward(n: int, d: int, k: float) -> Phase:
    scatter = FP32 * n * k * d + BF16 * n * d
    input_grad = BF16 * n * k * d + FP32 * n * d
    return Phase("encoder backward", 4 * n * k * d, scatter + input_grad)


def optimizer_step(d: int, m: int) -> Phase:
    params = 2 * m * d
    per_param = ADAM_BYTES + CAST_BYTES + GRAD_BYTES + CLIP_BYTES
    return Phase("optimizer", 10 * params, per_param * params + DECODER_BYTES * m * d)


def topk_step(
    n: int, d: int, m: int, k: float, *, fused: bool = True, n_dead: int = 0, k_aux: int = 0
) -> list[Phase]:
    """The phases of one TopK (or BatchTopK, with k its mean) step, AuxK included if asked."""
    phases = [
        encoder_product(n, d, m, fused=fused),
        *([] if fused else [unfused_topk(n, m)]),
        sparse_decode(n, d, k),
        sparse_decode_backward(n, d, k),
        sparse_encode_backward(n, d, k),
        optimizer_step(d, m),
    ]
    if n_dead and k_aux:
        aux = [
            encoder_product(n, d, n_dead, fused=fused),
            *([] if fused else [unfused_topk(n, n_dead)]),
            sparse_decode(n, d, k_aux),
            sparse_decode_backward(n, d, k_aux),
            sparse_encode_backward(n, d, k_aux),
        ]
        phases += [Phase(f"AuxK {p.name}", p.flops, p.bytes) for p in aux]
    return phases


def jumprelu_step(n: int, d: int, m: int, l0: float, tracked: float | None = None) -> list[Phase]:
    """The phases of one JumpReLU step with ``l0`` active latents per token on average and
    ``tracked`` entries per token (active or within the threshold's band; default ``l0``)."""
    tracked = l0 if tracked is None else tracked
    product = encoder_product(n, d, m)
    compacted = Phase(
        "encoder product", product.flops, product.bytes + (FP32 + 4) * n * tracked
    )  # tracked pre-activations and their latents
    return [
        compacted,
        sparse_decode(n, d, l0),
        sparse_decode_backward(n, d, l0),
        sparse_encode_backward(n, d, l0),
        optimizer_step(d, m),
    ]


def floor_seconds(phases: list[Phase], flops_per_s: float, bytes_per_s: float) -> float:
    """The step's floor: its phases run one after another."""
    return sum(p.floor_seconds(flops_per_s, bytes_per_s) for p in phases)
