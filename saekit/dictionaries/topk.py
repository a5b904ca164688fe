"""TopK sparse autoencoder (Gao et al. 2024, "Scaling and evaluating sparse autoencoders").

``z = TopK(ReLU(W_enc (x - b_dec) + b_enc))``: exactly k latents per token, so sparsity is set
directly rather than tuned through a penalty. Loss: normalised MSE plus AuxK on dead latents.
"""

from __future__ import annotations

from torch import Tensor

from ..kernels import SparseCodes, sparse_decode, topk_encode
from .base import SparseAutoencoder, StepContext, TrainOutput, reconstruction_loss


class TopKSAE(SparseAutoencoder):
    architecture = "topk"

    def _encode(self, x_c: Tensor) -> SparseCodes:
        codes, _ = topk_encode(x_c, self.W_enc, self.b_enc, self.cfg.k)
        return codes

    def training_forward(self, x: Tensor, ctx: StepContext) -> TrainOutput:
        x_c = x - self.b_dec  # (N, d)
        codes, aux = topk_encode(
            x_c, self.W_enc, self.b_enc, self.cfg.k, ctx.dead_latents, ctx.k_aux
        )
        recon = sparse_decode(codes, self.W_dec) + self.b_dec  # (N, d)
        loss, terms = reconstruction_loss(x, recon, ctx.reduce)
        auxk = self._auxk_loss(x - recon, aux, ctx)
        if auxk is not None:
            loss = loss + ctx.auxk_alpha * auxk
            terms["auxk"] = auxk.detach()
        return TrainOutput(loss, recon, codes, terms)
