"""ReLU sparse autoencoder with an L1 penalty weighted by decoder norms: the classic baseline
(Bricken et al. 2023, "Towards Monosemanticity"; the norm-weighted penalty from Anthropic's
April 2024 update), which removes the incentive to shrink codes by growing decoder rows.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..kernels import SparseCodes
from .base import SparseAutoencoder, StepContext, TrainOutput, reconstruction_loss


def dense_to_codes(z: Tensor) -> SparseCodes:
    """CSR codes of the nonzero entries of a dense (N, m) activation matrix."""
    rows, cols = z.nonzero(as_tuple=True)
    offsets = torch.zeros(z.shape[0] + 1, dtype=torch.long, device=z.device)
    torch.cumsum((z != 0).sum(1), 0, out=offsets[1:])
    return SparseCodes(z[rows, cols], cols, offsets, z.shape[1], None)


class ReLUSAE(SparseAutoencoder):
    architecture = "relu"
    normalize_decoder = False  # the penalty weights each latent by its decoder norm instead

    def _pre(self, x_c: Tensor) -> Tensor:
        return torch.addmm(self.b_enc, x_c, self.W_enc.t())  # (N, m)

    def _encode(self, x_c: Tensor) -> SparseCodes:
        return dense_to_codes(self._pre(x_c).relu_())

    def training_forward(self, x: Tensor, ctx: StepContext) -> TrainOutput:
        z = self._pre(x - self.b_dec).relu()  # (N, m), dense: every positive latent has gradient
        recon = torch.addmm(self.b_dec, z, self.W_dec)
        loss, terms = reconstruction_loss(x, recon, ctx.reduce)
        l1 = (z * self.W_dec.norm(dim=1)).sum() / ctx.batch_rows(x)  # this process's share
        terms["l1"] = ctx.reduce.sum(l1.detach().clone())
        return TrainOutput(
            loss + ctx.sparsity_coefficient * l1, recon, dense_to_codes(z.detach()), terms
        )
