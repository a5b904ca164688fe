"""Eager torch twins of every saekit kernel: the CPU path, and the reference for the Triton ones.

Each function here is plain math on tensors, with no autograd; :mod:`saekit.kernels.functions`
wraps them in ``torch.autograd.Function`` s. A Triton backend exposes the same function names
with the same contracts.

Why these shapes of computation (N tokens, d inputs, m latents, k active per token):

* The encoder is one dense ``(N, d) @ (d, m)`` product. Its output, the pre-activations, is the
  only ``N x m`` object in a step; we produce it in row chunks of a reused buffer and reduce each
  chunk to its top-k at once, so the ``N x m`` tensor is never allocated whole (on CPU a fresh
  64 MB tensor costs more page faults than the product itself).
* Only the k selected latents of a token carry gradient, so the encoder's backward and the
  decoder's forward and backward are sparse: ``O(N k d)`` gathers and scatter-adds, not dense
  products (Gao et al. 2024, "Scaling and evaluating sparse autoencoders", section 4 / appendix D).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

# Bytes of pre-activations held at once by the chunked encoders. 16 MiB keeps a chunk below
# glibc's dynamic mmap threshold, so the buffer is recycled from the heap between calls.
CHUNK_BYTES = 16 * 2**20


def chunk_rows(n_latents: int, dtype: torch.dtype) -> int:
    """Rows of pre-activations per chunk for a buffer of about ``CHUNK_BYTES``."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return max(1, CHUNK_BYTES // (n_latents * itemsize))


def _row_chunks(n: int, step: int):
    for start in range(0, n, step):
        yield start, min(n, start + step)


def encode_topk(
    x_c: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    k: int,
    dead_latents: Tensor | None = None,
    k_aux: int = 0,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fused encoder and top-k: ``topk(ReLU(x_c @ W_enc.T + b_enc))`` per row.

    ReLU is monotone, so the top-k of the ReLU is the ReLU of the top-k: we select on the raw
    pre-activations and apply ReLU to the k survivors only.

    Args:
        x_c: (N, d) centred inputs (``x - b_dec``).
        W_enc: (m, d) encoder weights, one row per latent.
        b_enc: (m,) encoder bias.
        k: active latents per row.
        dead_latents: (n_dead,) int64 ids of dead latents for the AuxK loss, or None.
        k_aux: how many dead latents to select per row for AuxK (clipped to ``n_dead``).

    Returns:
        values (N, k), indices (N, k) int64, aux_values (N, k_aux'), aux_indices (N, k_aux').
        The aux tensors have zero columns when no dead latents were given.
    """
    n = x_c.shape[0]
    m = W_enc.shape[0]
    use_aux = dead_latents is not None and dead_latents.numel() > 0 and k_aux > 0
    k_aux = min(k_aux, dead_latents.numel()) if use_aux and dead_latents is not None else 0

    values = x_c.new_empty(n, k)
    indices = torch.empty(n, k, dtype=torch.long, device=x_c.device)
    aux_values = x_c.new_empty(n, k_aux)
    aux_indices = torch.empty(n, k_aux, dtype=torch.long, device=x_c.device)

    step = chunk_rows(m, x_c.dtype)
    buffer = x_c.new_empty(min(n, step), m)
    for start, stop in _row_chunks(n, step):
        pre = buffer[: stop - start]  # (rows, m)
        torch.addmm(b_enc, x_c[start:stop], W_enc.t(), out=pre)
        torch.topk(pre, k, dim=1, sorted=False, out=(values[start:stop], indices[start:stop]))
        if k_aux:
            assert dead_latents is not None
            pre_dead = pre.index_select(1, dead_latents)  # (rows, n_dead)
            top_dead, local = pre_dead.topk(k_aux, dim=1, sorted=False)
            aux_values[start:stop] = top_dead
            aux_indices[start:stop] = dead_latents[local]
    values.relu_()
    aux_values.relu_()
    return values, indices, aux_values, aux_indices


def encode_batch_topk(
    x_c: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    k: int,
    dead_latents: Tensor | None = None,
    k_aux: int = 0,
    candidates_per_row: int | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """BatchTopK selection (Bussmann et al. 2024): the ``k * N`` largest ReLU activations of the
    whole batch, so a row may keep more or fewer than k latents.

    Exact, without materialising the ``N x m`` pre-activations: every row first keeps its top
    ``c`` candidates (``c = 4k`` by default) and the batch's top ``k * N`` is taken among those.
    The result is exact unless some row's c-th candidate is itself above the batch threshold
    (that row might own more winners than it offered); such rows are re-offered with twice as
    many candidates until none is.

    Returns:
        values (nnz,), indices (nnz,) int64, offsets (N + 1,): CSR codes sorted by row, with
        ``nnz <= k * N`` strictly positive values; then the per-row AuxK selection over
        ``dead_latents`` as in :func:`encode_topk` (aux_values, aux_indices, each (N, k_aux')).
    """
    return batch_topk_from_rows(
        encode_topk, x_c, W_enc, b_enc, k, dead_latents, k_aux, candidates_per_row
    )


def batch_topk_from_rows(
    encode_topk_fn: Callable[..., tuple[Tensor, Tensor, Tensor, Tensor]],
    x_c: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    k: int,
    dead_latents: Tensor | None = None,
    k_aux: int = 0,
    candidates_per_row: int | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """:func:`encode_batch_topk` on top of any per-row top-k encoder with the contract of
    :func:`encode_topk` (the Triton backend passes its fused one)."""
    n = x_c.shape[0]
    m = W_enc.shape[0]
    c = min(m, candidates_per_row or 4 * k)
    budget = min(k * n, n * m)

    cand_values, cand_indices, aux_values, aux_indices = encode_topk_fn(
        x_c, W_enc, b_enc, c, dead_latents, k_aux
    )  # (N, c) candidates each
    while True:
        flat = cand_values.reshape(-1)
        threshold = flat.topk(budget, sorted=False).values.min() if budget < flat.numel() else None
        if threshold is None or c >= m:
            break
        # A row is complete when its weakest candidate is below the threshold (or zero).
        weakest = cand_values.min(dim=1).values
        incomplete = (weakest >= threshold) & (weakest > 0)
        if not bool(incomplete.any()):
            break
        c = min(m, 2 * c)
        rows = incomplete.nonzero().squeeze(1)
        more_values, more_indices, _, _ = encode_topk_fn(x_c[rows], W_enc, b_enc, c)
        pad = c - cand_values.shape[1]
        cand_values = F.pad(cand_values, (0, pad))
        cand_indices = F.pad(cand_indices, (0, pad))
        cand_values[rows] = more_values.to(cand_values.dtype)
        cand_indices[rows] = more_indices

    flat = cand_values.reshape(-1)
    if budget < flat.numel():
        keep_pos = flat.topk(budget, sorted=False).indices
        keep = torch.zeros_like(flat, dtype=torch.bool)
        keep[keep_pos] = True
        keep &= flat > 0
    else:
        keep = flat > 0
    keep = keep.view_as(cand_values)
    counts = keep.sum(1)
    offsets = torch.zeros(n + 1, dtype=torch.long, device=x_c.device)
    torch.cumsum(counts, 0, out=offsets[1:])
    return cand_values[keep], cand_indices[keep], offsets, aux_values, aux_indices


def encode_jumprelu(
    x_c: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    threshold: Tensor,
    bandwidth: float | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """JumpReLU encoder (Rajamanoharan et al. 2024): latent i is active when its pre-activation
    exceeds ``threshold[i]``.

    With ``bandwidth`` set (training), the positions whose pre-activation lies within
    ``bandwidth / 2`` of the threshold are tracked too, active or not: the straight-through
    estimator's rectangle kernel gives the threshold a gradient exactly there.

    Returns:
        pre (nnz,) the pre-activations at the tracked positions, indices (nnz,) int64,
        offsets (N + 1,): CSR, sorted by row. Active positions are ``pre > threshold[indices]``.
    """
    n = x_c.shape[0]
    m = W_enc.shape[0]
    step = chunk_rows(m, x_c.dtype)
    buffer = x_c.new_empty(min(n, step), m)
    pres, cols, counts = [], [], []
    for start, stop in _row_chunks(n, step):
        pre = buffer[: stop - start]
        torch.addmm(b_enc, x_c[start:stop], W_enc.t(), out=pre)
        tracked = pre > threshold
        if bandwidth is not None:
            tracked |= (pre - threshold).abs_() < bandwidth / 2
        rows_here, cols_here = tracked.nonzero(as_tuple=True)
        pres.append(pre[rows_here, cols_here])
        cols.append(cols_here)
        counts.append(tracked.sum(1))
    offsets = torch.zeros(n + 1, dtype=torch.long, device=x_c.device)
    torch.cumsum(torch.cat(counts), 0, out=offsets[1:])
    return torch.cat(pres), torch.cat(cols), offsets


def _scatter_rows(
    target_rows: Tensor, source_rows: Tensor, weights: Tensor, source: Tensor, n_target: int
) -> Tensor:
    """``out[target_rows[e]] += weights[e] * source[source_rows[e]]`` for every entry e.

    A sparse ``(n_target x N) @ (N x d)`` product: the weight gradients of the encoder and the
    decoder touch only the rows of the latents that fired.
    """
    compute_dtype = source.dtype
    if source.device.type == "cpu" and source.dtype in (torch.float16, torch.bfloat16):
        compute_dtype = torch.float32  # CPU sparse kernels are fp32/fp64 only
    coo = torch.sparse_coo_tensor(
        torch.stack([target_rows, source_rows]),
        weights.to(compute_dtype),
        (n_target, source.shape[0]),
        check_invariants=False,  # entries are unique (row, latent) pairs by construction
    )
    return torch.sparse.mm(coo, source.to(compute_dtype)).to(source.dtype)


def _rows_of(offsets: Tensor, nnz: int) -> Tensor:
    counts = offsets.diff()
    return torch.repeat_interleave(
        torch.arange(counts.numel(), device=offsets.device), counts, output_size=nnz
    )


def _weighted_row_sum(
    indices: Tensor, offsets: Tensor, k: int | None, weights: Tensor, table: Tensor
) -> Tensor:
    """``out[n] = sum_e weights[e] * table[indices[e]]`` over the entries of row n: (N, d)."""
    if k is not None:
        n = offsets.numel() - 1
        return F.embedding_bag(
            indices.view(n, k),
            table,
            per_sample_weights=weights.view(n, k).to(table.dtype),
            mode="sum",
        )
    return F.embedding_bag(
        indices, table, offsets[:-1], per_sample_weights=weights.to(table.dtype), mode="sum"
    )


def sparse_decode(
    values: Tensor, indices: Tensor, offsets: Tensor, k: int | None, W_dec: Tensor
) -> Tensor:
    """``out[n] = sum_j values[n, j] * W_dec[indices[n, j]]``: the decoder as a gather.

    Args:
        values, indices, offsets, k: CSR codes (see :class:`SparseCodes`).
        W_dec: (m, d) decoder, one row per latent.

    Returns:
        (N, d) reconstruction without the decoder bias.
    """
    if values.numel() == 0:
        return W_dec.new_zeros(offsets.numel() - 1, W_dec.shape[1])
    return _weighted_row_sum(indices, offsets, k, values, W_dec)


GATHER_CHUNK_BYTES = 2 << 20
"""Gathered rows per chunk of :func:`_gathered_dots`: about an L2 cache (2 MiB), so the rows
are still cached when they are reduced (16 MiB chunks ran ~3x slower on a 2-core CPU)."""


def _gathered_dots(vectors: Tensor, indices: Tensor, table: Tensor) -> Tensor:
    """(N, k) ``<vectors[n], table[indices[n, j]]>``, gathering the k rows of each token in chunks
    of a reused buffer: the whole (N, k, d) gather would be a fresh tensor of tens of MB per
    step, whose page faults cost more than the arithmetic."""
    n, k = indices.shape
    d = table.shape[1]
    step = max(1, GATHER_CHUNK_BYTES // (k * d * table.element_size()))
    out = vectors.new_empty(n, k)
    buffer = table.new_empty(min(n, step) * k, d)
    for start, stop in _row_chunks(n, step):
        rows = buffer[: (stop - start) * k]
        torch.index_select(table, 0, indices[start:stop].reshape(-1), out=rows)
        # (rows, k, d) . (rows, 1, d) -> (rows, k): one dot product per token and active latent.
        # vecdot is a fused multiply-reduce; bmm of (k x d) @ (d x 1) matrices was 3-4x slower
        # here (many tiny GEMMs), as were chunks larger than the L2 cache.
        torch.linalg.vecdot(
            rows.view(stop - start, k, d), vectors[start:stop].unsqueeze(1), out=out[start:stop]
        )
    return out


def sparse_decode_backward(
    grad_out: Tensor,
    values: Tensor,
    indices: Tensor,
    offsets: Tensor,
    k: int | None,
    W_dec: Tensor,
) -> tuple[Tensor, Tensor]:
    """Gradients of :func:`sparse_decode`.

    Returns:
        grad_values (nnz,) = ``<grad_out[row], W_dec[index]>`` per entry, and
        grad_W_dec (m, d), nonzero only on the rows of latents that appear in ``indices``.
    """
    n = offsets.numel() - 1
    if k is not None:
        grad_values = _gathered_dots(grad_out, indices.view(n, k), W_dec).view(-1)
        rows = torch.arange(n, device=offsets.device).repeat_interleave(k)
    else:
        rows = _rows_of(offsets, values.numel())
        grad_values = (W_dec[indices] * grad_out[rows]).sum(-1)
    grad_W_dec = _scatter_rows(indices, rows, values, grad_out, W_dec.shape[0])
    return grad_values, grad_W_dec


def sparse_encode_backward(
    grad_pre: Tensor,
    indices: Tensor,
    offsets: Tensor,
    k: int | None,
    x_c: Tensor,
    W_enc: Tensor,
    need_input_grad: bool = True,
) -> tuple[Tensor | None, Tensor, Tensor]:
    """Gradients of the encoder product restricted to the selected (row, latent) entries.

    Args:
        grad_pre: (nnz,) gradient of the loss w.r.t. the pre-activation at each entry (already
            multiplied by the activation's derivative).
        indices, offsets, k: CSR positions of the entries.
        x_c: (N, d) the encoder's input.
        W_enc: (m, d) encoder weights.

    Returns:
        grad_x_c (N, d) or None, grad_W_enc (m, d), grad_b_enc (m,).
    """
    m = W_enc.shape[0]
    rows = (
        torch.arange(offsets.numel() - 1, device=offsets.device).repeat_interleave(k)
        if k is not None
        else _rows_of(offsets, grad_pre.numel())
    )
    grad_W_enc = _scatter_rows(indices, rows, grad_pre, x_c, m)
    accumulate = torch.promote_types(grad_pre.dtype, torch.float32)
    grad_b_enc = torch.zeros(m, dtype=accumulate, device=grad_pre.device)
    grad_b_enc = grad_b_enc.index_add_(0, indices, grad_pre.to(accumulate)).to(W_enc.dtype)
    grad_x_c = _weighted_row_sum(indices, offsets, k, grad_pre, W_enc) if need_input_grad else None
    return grad_x_c, grad_W_enc, grad_b_enc


def jumprelu_backward(
    grad_values: Tensor,
    grad_l0: Tensor,
    pre: Tensor,
    indices: Tensor,
    threshold: Tensor,
    bandwidth: float | None,
    need_threshold_grad: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """Straight-through backward of JumpReLU at its tracked entries.

    ``z = pre * H(pre - theta)``: the pre-activation's gradient is ``H(pre - theta)`` (no
    pseudo-gradient), and the threshold's comes from the rectangle-kernel pseudo-derivatives
    (Rajamanoharan et al. 2024, eqs. 11-12), ``K(u) = 1[|u| < 1/2]``:

        dz/dtheta = -(theta / eps) * K((pre - theta) / eps)
        dH/dtheta = -(1 / eps)     * K((pre - theta) / eps)     (the L0 penalty's term)

    Args:
        grad_values: (nnz,) gradient of the loss w.r.t. the activation of each entry.
        grad_l0: 0-d gradient of the loss w.r.t. the total L0 count.
        pre, indices: (nnz,) pre-activations and latent ids of the tracked entries.
        threshold: (m,) per-latent thresholds.
        bandwidth: the kernel's width eps; required for the threshold's gradient.

    Returns:
        grad_pre (nnz,), and grad_threshold (m,) when asked for (else None).
    """
    theta = threshold[indices]
    active = pre > theta
    grad_pre = torch.where(active, grad_values, 0)
    if not need_threshold_grad:
        return grad_pre, None
    if bandwidth is None:
        raise RuntimeError("JumpReLU threshold gradient needs a bandwidth (training mode)")
    kernel = ((pre - theta).abs() < bandwidth / 2).to(pre.dtype) / bandwidth
    per_entry = -kernel * (grad_values * theta + grad_l0)
    grad_threshold = torch.zeros_like(threshold).index_add_(0, indices, per_entry)
    return grad_pre, grad_threshold
