"""JumpReLU sparse autoencoder (Rajamanoharan et al. 2024, "Jumping Ahead: Improving
Reconstruction Fidelity with JumpReLU Sparse Autoencoders").

``z_i = pre_i * H(pre_i - theta_i)`` with a learned per-latent threshold. The step function has
no useful gradient, so the threshold is trained with a straight-through estimator whose
rectangle kernel has width ``bandwidth``; sparsity comes from an L0 penalty warmed up over the
first steps. The threshold is a plain parameter (clamped positive after each step): in log
space Adam's roughly constant relative steps need thousands of steps to move it from its small
initial value to the scale of the activations.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..kernels import SparseCodes, jumprelu_encode, sparse_decode
from .base import SparseAutoencoder, StepContext, TrainOutput, reconstruction_loss
from .config import SAEConfig


class JumpReLUSAE(SparseAutoencoder):
    architecture = "jumprelu"
    normalize_decoder = False  # the L0 penalty does not depend on decoder norms

    def __init__(self, cfg: SAEConfig, device: torch.device | str | None = None) -> None:
        super().__init__(cfg, device)
        self.threshold = nn.Parameter(torch.full((cfg.d_sae,), cfg.init_threshold, device=device))

    def _encode(self, x_c: Tensor) -> SparseCodes:
        codes, _ = jumprelu_encode(x_c, self.W_enc, self.b_enc, self.threshold.detach())
        return codes

    def training_forward(self, x: Tensor, ctx: StepContext) -> TrainOutput:
        x_c = x - self.b_dec
        codes, l0_total = jumprelu_encode(
            x_c, self.W_enc, self.b_enc, self.threshold, ctx.jumprelu_bandwidth
        )
        recon = sparse_decode(codes, self.W_dec) + self.b_dec
        loss, terms = reconstruction_loss(x, recon, ctx.reduce)
        rows = ctx.batch_rows(x)
        l0 = l0_total / rows  # this process's share of the mean active latents per token
        terms["l0_penalty"] = ctx.reduce.sum(l0.detach().clone())
        return TrainOutput(loss + ctx.sparsity_coefficient * l0, recon, codes, terms)

    def extra_tensors(self) -> dict[str, Tensor]:
        return {"threshold": self.threshold.detach()}

    @torch.no_grad()
    def load_extra_tensors(self, tensors: dict[str, Tensor]) -> None:
        tensors = dict(tensors)
        threshold = tensors.pop("threshold")
        if (threshold < 0).any():
            raise ValueError(
                "JumpReLU thresholds must not be negative; this file holds negative ones"
            )
        self.threshold.copy_(threshold)
        super().load_extra_tensors(tensors)

    @torch.no_grad()
    def set_threshold(self, threshold: Tensor | float) -> None:
        self.threshold.copy_(torch.as_tensor(threshold, dtype=self.dtype).expand_as(self.threshold))

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        self.threshold.clamp_(min=0.0)
