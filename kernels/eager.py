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
* No function here holds an ``nnz x d`` tensor (one gathered row per entry): with a variable
  count per row (JumpReLU, BatchTopK) the gathers and scatter-adds walk the entries in chunks of
  bounded size, so a step's extra memory stays at tens of MB whatever nnz is (a JumpReLU
  dictionary at initialisation tracks about half its latents: 33M entries for 4096 rows of a
  16384-latent dictionary, which one gather of d = 768 floats per entry would turn into 98 GiB).
  The chunks find the rows of their entries with ``searchsorted`` on the row offsets, so no
  chunk boundary is read back to the host.
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
        ``nnz = min(k * N, N * m)`` non-negative values (zeros only when the batch has fewer
        positive pre-activations); then the per-row AuxK selection over ``dead_latents`` as in
        :func:`encode_topk` (aux_values, aux_indices, each (N, k_aux')).
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
        if budget >= flat.numel():
            keep = torch.arange(flat.numel(), device=flat.device)
            break
        keep = flat.topk(budget, sorted=False).indices
        if c >= m:
            break
        # A row is complete when its weakest candidate is below the threshold (or zero).
        threshold = flat[keep].min()
        weakest = cand_values.min(dim=1).values
        incomplete = (weakest >= threshold) & (weakest > 0)
        if not bool(incomplete.any()):  # the step's one read back: did the candidates suffice?
            break
        c = min(m, 2 * c)
        rows = incomplete.nonzero().squeeze(1)
        more_values, more_indices, _, _ = encode_topk_fn(x_c[rows], W_enc, b_enc, c)
        pad = c - cand_values.shape[1]
        cand_values = F.pad(cand_values, (0, pad))
        cand_indices = F.pad(cand_indices, (0, pad))
        cand_values[rows] = more_values.to(cand_values.dtype)
        cand_indices[rows] = more_indices

    # Exactly `budget` entries in row-major order (so sorted by row), found without a boolean
    # mask, whose size a GPU would have to read back; a batch with fewer positive candidates
    # than that keeps the rest as explicit zeros, which carry no gradient.
    keep = keep.sort().values
    width = cand_values.shape[1]
    offsets = torch.searchsorted(keep, torch.arange(n + 1, device=keep.device) * width)
    values = cand_values.reshape(-1)[keep]
    indices = cand_indices.reshape(-1)[keep]
    return values, indices, offsets, aux_values, aux_indices


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
    pres: list[Tensor] = []
    cols: list[Tensor] = []
    offsets = torch.zeros(n + 1, dtype=torch.long, device=x_c.device)
    for start, stop in _row_chunks(n, step):
        pre = buffer[: stop - start]
        torch.addmm(b_enc, x_c[start:stop], W_enc.t(), out=pre)
        tracked = pre > threshold
        if bandwidth is not None:
            tracked |= (pre - threshold).abs_() < bandwidth / 2
        flat = tracked.view(-1).nonzero().squeeze(1)  # row-major: sorted by row, then latent
        pres.append(pre.view(-1).index_select(0, flat))
        cols.append((flat % m).to(torch.int32))  # half the bytes while the chunks wait
        # Row r of the chunk ends at its first entry at a flat position of (r + 1) m or more.
        ends = torch.arange(1, stop - start + 1, device=x_c.device) * m
        offsets[start + 1 : stop + 1] = torch.searchsorted(flat, ends) + offsets[start]
    # Concatenated by hand, releasing each piece once copied: torch.cat would hold every piece
    # and the result at once (at initialisation the tracked entries are half of N x m).
    device = x_c.device
    return (
        _concat_releasing(pres, x_c.dtype, device),
        _concat_releasing(cols, torch.long, device),
        offsets,
    )


def _concat_releasing(parts: list[Tensor], dtype: torch.dtype, device: torch.device) -> Tensor:
    """``torch.cat(parts).to(dtype)``, emptying ``parts`` as it goes."""
    out = torch.empty(sum(p.numel() for p in parts), dtype=dtype, device=device)
    start = 0
    parts.reverse()
    while parts:
        part = parts.pop()
        out[start : start + part.numel()] = part
        start += part.numel()
    return out


ENTRY_CHUNK_BYTES = 16 << 20
"""Gathered rows (entries x d) held at once by the gathers over a variable count of entries per
row; also bounds every other per-entry temporary below."""

SCATTER_CHUNK_ENTRIES = 1 << 18
"""Entries per sparse product of :func:`_accumulate` (its COO indices and the sort inside cost
a few tens of bytes per entry: about 10 MB)."""


def _spans(total: int, step: int):
    for start in range(0, total, step):
        yield start, min(total, start + step)


def _entry_rows(offsets: Tensor, k: int | None, start: int, stop: int) -> Tensor:
    """The rows of entries ``start:stop`` of CSR codes: (stop - start,) int64."""
    entries = torch.arange(start, stop, device=offsets.device)
    if k is not None:
        return entries // k
    # Row r owns offsets[r] <= e < offsets[r + 1]: the last offset <= e (empty rows repeat it).
    return torch.searchsorted(offsets, entries, right=True) - 1


def _accumulate(
    out: Tensor,
    targets: Callable[[int, int], Tensor],
    sources: Callable[[int, int], Tensor],
    weights: Tensor,
    source: Tensor,
) -> Tensor:
    """``out[targets[e]] += weights[e] * source[sources[e]]`` for every entry e, in place.

    A sparse ``(n_out x n_source) @ (n_source x d)`` product in chunks of entries, each
    accumulated into ``out`` by the sparse-dense ``addmm_`` (faster on CPU than ``sparse.mm``,
    which returns a fresh dense result). ``targets(start, stop)`` and ``sources(start, stop)``
    give the two indices of entries ``start:stop``; entries are unique (target, source) pairs by
    construction.
    """
    compute = out
    if source.device.type == "cpu" and source.dtype in (torch.float16, torch.bfloat16):
        compute = out.float()  # CPU sparse kernels are fp32/fp64 only
        source = source.float()
    for start, stop in _spans(weights.numel(), SCATTER_CHUNK_ENTRIES):
        coo = torch.sparse_coo_tensor(
            torch.stack([targets(start, stop), sources(start, stop)]),
            weights[start:stop].to(compute.dtype),
            (out.shape[0], source.shape[0]),
            check_invariants=False,
        )
        compute.addmm_(coo, source)
    if compute is not out:
        out.copy_(compute)
    return out


DENSE_DENSITY = 1 / 32
"""Past this fraction of (row, latent) pairs present, codes with a variable count per row go
through dense products over blocks of rows on a CPU instead of gathers. There a gathered entry
costs tens of times a dense product's element (a row of d floats fetched from anywhere in the
weights against d multiply-adds on cached operands): a JumpReLU step at initialisation, with
half of the latents tracked (d = 768, m = 16384, N = 4096), took 570 s on gathers and takes
seconds on products. The blocks' bounds are read on the host, which costs nothing on a CPU; on
a CUDA device (the eager path runs there only with Triton disabled) the gathers, which need no
host read, stay. TopK codes (a fixed count) always take the gathers."""


def _dense(nnz: int, offsets: Tensor, k: int | None, m: int) -> bool:
    n = offsets.numel() - 1
    return k is None and offsets.device.type == "cpu" and nnz > DENSE_DENSITY * n * m


def _dense_blocks(offsets: Tensor, indices: Tensor, m: int, dtype: torch.dtype):
    """``(r0, r1, e0, e1, local_rows, latents)`` for blocks of rows of about ``CHUNK_BYTES`` of
    dense ``(rows, m)``: the block's rows, its entries' span, and their (row in the block,
    latent) positions. The blocks' bounds are read on the host, once per call (CPU only)."""
    n = offsets.numel() - 1
    step = chunk_rows(m, dtype)
    spans = list(_row_chunks(n, step))
    bounds = torch.cat([offsets[:-1:step], offsets[-1:]]).tolist()
    for i, (r0, r1) in enumerate(spans):
        e0, e1 = bounds[i], bounds[i + 1]
        local = torch.repeat_interleave(
            torch.arange(r1 - r0, device=offsets.device),
            offsets[r0 : r1 + 1].diff(),
            output_size=e1 - e0,
        )
        yield r0, r1, e0, e1, local, indices[e0:e1]


def _fill(block: Tensor, local: Tensor, latents: Tensor, weights: Tensor) -> Tensor:
    """``block`` (rows, m) holding ``weights`` at (local, latents) and zeros elsewhere."""
    block.zero_()
    return block.index_put_((local, latents), weights.to(block.dtype), accumulate=True)


def _scatter_to_latents(
    indices: Tensor,
    offsets: Tensor,
    k: int | None,
    weights: Tensor,
    source: Tensor,
    n_latents: int,
) -> Tensor:
    """(n_latents, d) ``G[indices[e]] += weights[e] * source[row(e)]``: a weight gradient, which
    touches only the rows of the latents that appear in ``indices``."""
    out = source.new_zeros(n_latents, source.shape[1])
    return _accumulate(
        out,
        lambda start, stop: indices[start:stop],
        lambda start, stop: _entry_rows(offsets, k, start, stop),
        weights,
        source,
    )


def _weighted_row_sum(
    indices: Tensor, offsets: Tensor, k: int | None, weights: Tensor, table: Tensor
) -> Tensor:
    """``out[n] = sum_e weights[e] * table[indices[e]]`` over the entries of row n: (N, d)."""
    n = offsets.numel() - 1
    if k is not None:
        return F.embedding_bag(
            indices.view(n, k),
            table,
            per_sample_weights=weights.view(n, k).to(table.dtype),
            mode="sum",
        )
    m = table.shape[0]
    if _dense(weights.numel(), offsets, k, m):
        out = table.new_empty(n, table.shape[1])
        block = table.new_empty(min(n, chunk_rows(m, table.dtype)), m)
        for r0, r1, e0, e1, local, latents in _dense_blocks(offsets, indices, m, table.dtype):
            here = _fill(block[: r1 - r0], local, latents, weights[e0:e1])
            torch.mm(here, table, out=out[r0:r1])
        return out
    out = table.new_zeros(n, table.shape[1])
    return _accumulate(
        out,
        lambda start, stop: _entry_rows(offsets, None, start, stop),
        lambda start, stop: indices[start:stop],
        weights,
        table,
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


def _entry_dots(vectors: Tensor, indices: Tensor, offsets: Tensor, table: Tensor) -> Tensor:
    """(nnz,) ``<vectors[row(e)], table[indices[e]]>`` for a variable count of entries per row,
    gathering both rows of an entry into reused buffers, a chunk of entries at a time."""
    nnz = indices.numel()
    d = table.shape[1]
    step = max(1, ENTRY_CHUNK_BYTES // (2 * d * max(table.element_size(), vectors.element_size())))
    out = vectors.new_empty(nnz)
    latent_rows = table.new_empty(min(nnz, step), d)
    token_rows = vectors.new_empty(min(nnz, step), d)
    for start, stop in _spans(nnz, step):
        here = stop - start
        torch.index_select(table, 0, indices[start:stop], out=latent_rows[:here])
        rows = _entry_rows(offsets, None, start, stop)
        torch.index_select(vectors, 0, rows, out=token_rows[:here])
        torch.linalg.vecdot(
            latent_rows[:here].to(vectors.dtype), token_rows[:here], out=out[start:stop]
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
    m = W_dec.shape[0]
    if _dense(values.numel(), offsets, k, m):
        # Per block of rows: the dense gradient of the activations, read at the entries, and the
        # decoder's gradient as one product of the block's dense codes with grad_out.
        W = W_dec.to(grad_out.dtype)
        grad_values = grad_out.new_empty(values.numel())
        grad_W_dec = grad_out.new_zeros(m, grad_out.shape[1])
        step = chunk_rows(m, grad_out.dtype)
        block = grad_out.new_empty(min(n, step), m)
        dots = grad_out.new_empty(min(n, step), m)
        for r0, r1, e0, e1, local, latents in _dense_blocks(offsets, indices, m, grad_out.dtype):
            codes = _fill(block[: r1 - r0], local, latents, values[e0:e1])
            grad_W_dec.addmm_(codes.t(), grad_out[r0:r1])
            here = torch.mm(grad_out[r0:r1], W.t(), out=dots[: r1 - r0])
            grad_values[e0:e1] = here[local, latents]
        return grad_values, grad_W_dec
    if k is not None:
        grad_values = _gathered_dots(grad_out, indices.view(n, k), W_dec).view(-1)
    else:
        grad_values = _entry_dots(grad_out, indices, offsets, W_dec)
    grad_W_dec = _scatter_to_latents(indices, offsets, k, values, grad_out, W_dec.shape[0])
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
    n = offsets.numel() - 1
    accumulate = torch.promote_types(grad_pre.dtype, torch.float32)
    grad_b_enc = torch.zeros(m, dtype=accumulate, device=grad_pre.device)
    grad_b_enc = grad_b_enc.index_add_(0, indices, grad_pre.to(accumulate)).to(W_enc.dtype)
    if _dense(grad_pre.numel(), offsets, k, m):
        grad_W_enc = x_c.new_zeros(m, x_c.shape[1])
        grad_x_c = W_enc.new_empty(n, W_enc.shape[1]) if need_input_grad else None
        block = x_c.new_empty(min(n, chunk_rows(m, x_c.dtype)), m)
        for r0, r1, e0, e1, local, latents in _dense_blocks(offsets, indices, m, x_c.dtype):
            grads = _fill(block[: r1 - r0], local, latents, grad_pre[e0:e1])
            grad_W_enc.addmm_(grads.t(), x_c[r0:r1])
            if grad_x_c is not None:
                torch.mm(grads.to(W_enc.dtype), W_enc, out=grad_x_c[r0:r1])
        return grad_x_c, grad_W_enc, grad_b_enc
    grad_W_enc = _scatter_to_latents(indices, offsets, k, grad_pre, x_c, m)
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
    nnz = pre.numel()
    grad_pre = torch.empty_like(grad_values)
    grad_threshold = torch.zeros_like(threshold) if need_threshold_grad else None
    if need_threshold_grad and bandwidth is None:
        raise RuntimeError("JumpReLU threshold gradient needs a bandwidth (training mode)")
    step = max(1, ENTRY_CHUNK_BYTES // 16)  # a few per-entry temporaries per chunk
    for start, stop in _spans(nnz, step):
        here = slice(start, stop)
        theta = threshold[indices[here]]
        active = pre[here] > theta
        grad_pre[here] = torch.where(active, grad_values[here], 0)
        if grad_threshold is None or bandwidth is None:
            continue
        kernel = ((pre[here] - theta).abs() < bandwidth / 2).to(pre.dtype) / bandwidth
        per_entry = -kernel * (grad_values[here] * theta + grad_l0)
        grad_threshold.index_add_(0, indices[here], per_entry.to(threshold.dtype))
    return grad_pre, grad_threshold
