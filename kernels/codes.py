"""The sparse code representation shared by every dictionary and kernel."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class SparseCodes(NamedTuple):
    """Latent activations of ``n_rows`` inputs in CSR form.

    TopK codes have exactly ``k`` entries per row (``k`` is set and ``values.view(N, k)`` is
    valid); BatchTopK and JumpReLU codes have a variable count per row (``k`` is None).
    Entries may hold exact zeros (a TopK slot whose pre-activation was negative, or a JumpReLU
    latent that sits just under its threshold and is tracked only for the threshold's gradient).
    """

    values: Tensor
    """(nnz,) activation values."""
    indices: Tensor
    """(nnz,) int64 latent ids."""
    offsets: Tensor
    """(N + 1,) int64 row pointers: row n owns entries offsets[n]:offsets[n + 1]."""
    d_sae: int
    """Number of latents (columns of the dense form)."""
    k: int | None = None
    """Entries per row when it is the same for every row, else None."""

    @property
    def n_rows(self) -> int:
        return self.offsets.numel() - 1

    @staticmethod
    def from_topk(values: Tensor, indices: Tensor, d_sae: int) -> SparseCodes:
        """Wrap (N, k) top-k values and indices without copying."""
        n, k = values.shape
        offsets = torch.arange(0, n * k + 1, k, device=values.device, dtype=torch.long)
        return SparseCodes(values.reshape(-1), indices.reshape(-1), offsets, d_sae, k)

    def rows(self) -> Tensor:
        """(nnz,) the row of each entry."""
        counts = self.offsets.diff()
        return torch.repeat_interleave(
            torch.arange(self.n_rows, device=self.offsets.device),
            counts,
            output_size=self.values.numel(),
        )

    def to_dense(self) -> Tensor:
        """(N, d_sae) dense activations."""
        dense = self.values.new_zeros(self.n_rows, self.d_sae)
        dense[self.rows(), self.indices] = self.values
        return dense

    def l0(self) -> Tensor:
        """(N,) number of strictly positive activations per row."""
        positive = (self.values > 0).to(torch.int64)
        if self.k is not None:
            return positive.view(self.n_rows, self.k).sum(1)
        # Cumulative counts read at the row ends: no per-entry row ids, no host synchronisation.
        ends = positive.new_zeros(positive.numel() + 1)
        torch.cumsum(positive, 0, out=ends[1:])
        return ends[self.offsets[1:]] - ends[self.offsets[:-1]]

    def active_count(self) -> Tensor:
        """0-d int64: strictly positive activations in all rows (the batch's total L0)."""
        return torch.count_nonzero(self.values > 0)  # sum() would widen the mask to int64 first

    def firing_counts(self) -> Tensor:
        """(d_sae,) how many rows each latent fired (was strictly positive) on.

        A scatter-add rather than ``bincount`` of the positive entries' latents: selecting them
        and ``bincount`` both read a size back to the host on a GPU, which stalls the step.
        """
        counts = torch.zeros(self.d_sae, dtype=torch.int64, device=self.values.device)
        for start in range(0, self.values.numel(), _CHUNK):
            here = slice(start, start + _CHUNK)
            counts.index_add_(0, self.indices[here], (self.values[here] > 0).to(torch.int64))
        return counts


_CHUNK = 1 << 22
"""Entries per pass of :meth:`SparseCodes.firing_counts` (its temporaries stay at tens of MB)."""
