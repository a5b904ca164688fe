"""BatchTopK sparse autoencoder (Bussmann, Leask & Nanda 2024, "BatchTopK Sparse Autoencoders").

While training, the batch as a whole keeps its ``k * N`` largest activations, so easy tokens use
fewer latents and hard ones more, at the same mean L0 as TopK. A batch-dependent selection is
no good at inference, so a global threshold is learned as the running mean (EMA) of the smallest
activation kept in each batch, and the saved dictionary is a JumpReLU with that threshold.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from ..kernels import SparseCodes, batch_topk_encode, jumprelu_encode, sparse_decode
from .base import SparseAutoencoder, StepContext, TrainOutput, reconstruction_loss
from .config import SAEConfig
from .jumprelu import JumpReLUSAE


class BatchTopKSAE(SparseAutoencoder):
    architecture = "batchtopk"
    threshold_momentum = 0.9
    """EMA momentum of the threshold: about the last 10 batches count, so the saved threshold
    matches the final weights rather than the early, larger activations."""

    def __init__(self, cfg: SAEConfig, device: torch.device | str | None = None) -> None:
        super().__init__(cfg, device)
        # Negative until the first training batch sets it.
        self.threshold: Tensor
        self.register_buffer("threshold", torch.tensor(-1.0, device=device))

    def _encode(self, x_c: Tensor) -> SparseCodes:
        if self.threshold < 0:
            raise RuntimeError(
                "this BatchTopK dictionary has not been trained: its threshold is unset"
            )
        codes, _ = jumprelu_encode(x_c, self.W_enc, self.b_enc, self.threshold.expand(self.d_sae))
        return codes

    def training_forward(self, x: Tensor, ctx: StepContext) -> TrainOutput:
        x_c = x - self.b_dec
        codes, aux = batch_topk_encode(
            x_c, self.W_enc, self.b_enc, self.cfg.k, ctx.dead_latents, ctx.k_aux
        )
        recon = sparse_decode(codes, self.W_dec) + self.b_dec
        loss, terms = reconstruction_loss(x, recon, ctx.reduce)
        auxk = self._auxk_loss(x - recon, aux, ctx)  # per-token AuxK, as in TopK
        if auxk is not None:
            loss = loss + ctx.auxk_alpha * auxk
            terms["auxk"] = auxk.detach()
        self._update_threshold(codes, ctx)
        return TrainOutput(loss, recon, codes, terms)

    @torch.no_grad()
    def _update_threshold(self, codes: SparseCodes, ctx: StepContext) -> None:
        """EMA of the smallest kept activation, on the device: no value is read back to the host
        (a batch that kept nothing leaves the threshold as it was)."""
        kept = codes.values.detach()
        # The smallest positive activation (kept zeros, from a batch short of positive ones,
        # would pull the threshold to zero).
        positive = torch.where(kept > 0, kept, float("inf"))
        smallest = positive.min() if kept.numel() else kept.new_full((), float("inf"))
        smallest = ctx.reduce.min(smallest.to(self.threshold.dtype).clone())  # same on every rank
        updated = torch.where(
            self.threshold < 0,  # unset: the first batch sets it
            smallest,
            torch.lerp(self.threshold, smallest, 1 - self.threshold_momentum),
        )
        self.threshold.copy_(torch.where(torch.isfinite(smallest), updated, self.threshold))

    def for_inference(self) -> JumpReLUSAE:
        """The equivalent JumpReLU: same weights, every latent thresholded at the learned value."""
        if self.threshold < 0:
            raise RuntimeError(
                "cannot convert an untrained BatchTopK dictionary: its threshold is unset"
            )
        cfg = dataclasses.replace(self.cfg, architecture="jumprelu", trained_as="batchtopk")
        jump = JumpReLUSAE(cfg, device=self.device).to(self.dtype)
        jump.load_state_dict(
            {k: v for k, v in self.state_dict().items() if k != "threshold"}, strict=False
        )
        jump.set_threshold(self.threshold.clamp_min(torch.finfo(self.dtype).tiny))
        return jump

    def extra_tensors(self) -> dict[str, Tensor]:
        return {"threshold": self.threshold.detach().reshape(1)}
