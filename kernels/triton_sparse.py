"""Sparse gathers and scatter-adds over CSR codes: the decoder, and every backward but the
encoder's dense product (which the backward does not need at all).

With N tokens, k active latents per token and width d, each of these moves ``O(N k d)`` numbers
and does ``2 N k d`` FLOPs: they are memory bound, so they read weights in the dtype they are
given (the bf16 copies under autocast, half the bytes of the fp32 masters; at m = 24576,
d = 768 the bf16 copy, 38 MB, fits an H100's 50 MB L2) and accumulate in float32.

* :func:`gather_rows`: ``out[n] = sum_e w[e] * T[idx[e]]`` over row n's entries (the decoder's
  forward; the encoder input's gradient).
* :func:`gather_dots`: ``out[e] = <V[row(e)], T[idx[e]]>`` (the gradient of the activations).
* :func:`scatter_rows`: ``G[idx[e]] += w[e] * S[row(e)]`` (the decoder's and encoder's weight
  gradients, and the encoder bias's): float32 atomics into the touched rows only, or, when torch
  is asked for deterministic algorithms, a sort of the entries by latent and one program per
  latent that sums its entries in a fixed order and writes the row once.
* :func:`jumprelu_backward`: the straight-through estimator's gradients in one pass over the
  entries.

Entries whose weight is exactly zero (a TopK slot whose pre-activation was negative, a JumpReLU
entry tracked only for its threshold) are skipped: their rows are neither read nor written.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .triton_common import INTERPRETING, next_power_of_2


def _blocks(d: int, entries_per_row: float) -> tuple[int, int]:
    """(BLOCK_E, BLOCK_D): entries and columns a program holds at once. Under the interpreter,
    deliberately small so that the tests run every loop and masked tail."""
    if INTERPRETING:
        return 4, 16
    block_d = 128 if d <= 128 else 256
    block_e = max(2, min(32, next_power_of_2(max(1, round(entries_per_row)))))
    return block_e, block_d


@triton.jit
def gather_rows_kernel(
    weights_ptr,  # (nnz,)
    idx_ptr,  # (nnz,) int64 rows of the table
    offsets_ptr,  # (N + 1,) int64
    table_ptr,  # (M, D)
    out_ptr,  # (N, D) float32
    D,
    stride_t,
    stride_o,
    BLOCK_E: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    ds = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = ds < D
    start = tl.load(offsets_ptr + row)
    end = tl.load(offsets_ptr + row + 1)
    acc = tl.zeros((BLOCK_D,), tl.float32)
    for e0 in range(start, end, BLOCK_E):
        es = e0 + tl.arange(0, BLOCK_E)
        e_ok = es < end
        w = tl.load(weights_ptr + es, mask=e_ok, other=0.0).to(tl.float32)
        live = e_ok & (w != 0.0)
        idx = tl.load(idx_ptr + es, mask=live, other=0)
        t = tl.load(
            table_ptr + idx[:, None] * stride_t + ds[None, :],
            mask=live[:, None] & d_ok[None, :],
            other=0.0,
        ).to(tl.float32)  # (BLOCK_E, BLOCK_D)
        acc += tl.sum(w[:, None] * t, axis=0)
    tl.store(out_ptr + row * stride_o + ds, acc, mask=d_ok)


@triton.jit
def gather_dots_kernel(
    vec_ptr,  # (N, D) one vector per row
    idx_ptr,  # (nnz,) int64
    offsets_ptr,  # (N + 1,) int64
    table_ptr,  # (M, D)
    out_ptr,  # (nnz,) float32
    D,
    stride_v,
    stride_t,
    BLOCK_E: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    start = tl.load(offsets_ptr + row)
    end = tl.load(offsets_ptr + row + 1)
    for e0 in range(start, end, BLOCK_E):
        es = e0 + tl.arange(0, BLOCK_E)
        e_ok = es < end
        idx = tl.load(idx_ptr + es, mask=e_ok, other=0)
        acc = tl.zeros((BLOCK_E,), tl.float32)
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            d_ok = ds < D
            v = tl.load(vec_ptr + row * stride_v + ds, mask=d_ok, other=0.0).to(tl.float32)
            t = tl.load(
                table_ptr + idx[:, None] * stride_t + ds[None, :],
                mask=e_ok[:, None] & d_ok[None, :],
                other=0.0,
            ).to(tl.float32)
            acc += tl.sum(t * v[None, :], axis=1)
        tl.store(out_ptr + es, acc, mask=e_ok)


@triton.jit
def scatter_rows_atomic_kernel(
    weights_ptr,  # (nnz,)
    idx_ptr,  # (nnz,) int64 target rows
    offsets_ptr,  # (N + 1,) int64
    source_ptr,  # (N, D)
    out_ptr,  # (M, D) float32, zeroed: accumulates
    bias_ptr,  # (M,) float32, zeroed: accumulates sum of weights, if HAS_BIAS
    D,
    stride_s,
    stride_o,
    HAS_BIAS: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    d_block = tl.program_id(1)
    ds = d_block * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = ds < D
    start = tl.load(offsets_ptr + row)
    end = tl.load(offsets_ptr + row + 1)
    src = tl.load(source_ptr + row * stride_s + ds, mask=d_ok, other=0.0).to(tl.float32)
    for e0 in range(start, end, BLOCK_E):
        es = e0 + tl.arange(0, BLOCK_E)
        e_ok = es < end
        w = tl.load(weights_ptr + es, mask=e_ok, other=0.0).to(tl.float32)
        live = e_ok & (w != 0.0)
        idx = tl.load(idx_ptr + es, mask=live, other=0)
        tl.atomic_add(
            out_ptr + idx[:, None] * stride_o + ds[None, :],
            w[:, None] * src[None, :],
            mask=live[:, None] & d_ok[None, :],
            sem="relaxed",
        )
        if HAS_BIAS:  # noqa: SIM102 (compile-time test, then the runtime one)
            if d_block == 0:
                tl.atomic_add(bias_ptr + idx, w, mask=live, sem="relaxed")


@triton.jit
def scatter_rows_sorted_kernel(
    weights_ptr,  # (nnz,)
    order_ptr,  # (nnz,) int64 entries sorted by target row (stable)
    entry_rows_ptr,  # (nnz,) int64 source row of each entry
    segments_ptr,  # (M + 1,) int64 start of each target row's run in `order`
    source_ptr,  # (N, D)
    out_ptr,  # (M, D) float32: every row written
    bias_ptr,  # (M,) float32: every element written, if HAS_BIAS
    D,
    stride_s,
    stride_o,
    HAS_BIAS: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    target = tl.program_id(0).to(tl.int64)
    d_block = tl.program_id(1)
    ds = d_block * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = ds < D
    start = tl.load(segments_ptr + target)
    end = tl.load(segments_ptr + target + 1)
    acc = tl.zeros((BLOCK_D,), tl.float32)
    weight_sum = tl.zeros((BLOCK_E,), tl.float32)
    for e0 in range(start, end, BLOCK_E):
        es = e0 + tl.arange(0, BLOCK_E)
        e_ok = es < end
        entry = tl.load(order_ptr + es, mask=e_ok, other=0)
        w = tl.load(weights_ptr + entry, mask=e_ok, other=0.0).to(tl.float32)
        live = e_ok & (w != 0.0)
        src_row = tl.load(entry_rows_ptr + entry, mask=live, other=0)
        s = tl.load(
            source_ptr + src_row[:, None] * stride_s + ds[None, :],
            mask=live[:, None] & d_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.sum(w[:, None] * s, axis=0)
        weight_sum += w
    tl.store(out_ptr + target * stride_o + ds, acc, mask=d_ok)
    if HAS_BIAS:  # noqa: SIM102 (compile-time test, then the runtime one)
        if d_block == 0:
            tl.store(bias_ptr + target, tl.sum(weight_sum, axis=0))


@triton.jit
def jumprelu_backward_kernel(
    grad_values_ptr,  # (nnz,)
    pre_ptr,  # (nnz,)
    idx_ptr,  # (nnz,) int64
    theta_ptr,  # (M,)
    grad_l0_ptr,  # () gradient of the L0 count
    grad_pre_ptr,  # (nnz,) float32 out
    per_entry_ptr,  # (nnz,) float32 out: threshold gradient per entry, if not ATOMIC
    grad_theta_ptr,  # (M,) float32, zeroed: accumulates, if ATOMIC
    nnz,
    bandwidth,
    NEED_THETA: tl.constexpr,
    ATOMIC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    es = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = es < nnz
    g = tl.load(grad_values_ptr + es, mask=ok, other=0.0).to(tl.float32)
    pre = tl.load(pre_ptr + es, mask=ok, other=0.0).to(tl.float32)
    idx = tl.load(idx_ptr + es, mask=ok, other=0)
    theta = tl.load(theta_ptr + idx, mask=ok, other=0.0).to(tl.float32)
    tl.store(grad_pre_ptr + es, tl.where(pre > theta, g, 0.0), mask=ok)
    if NEED_THETA:
        grad_l0 = tl.load(grad_l0_ptr).to(tl.float32)
        inside = tl.abs(pre - theta) < bandwidth * 0.5  # the rectangle kernel's support
        per_entry = tl.where(inside, -(g * theta + grad_l0) / bandwidth, 0.0)
        if ATOMIC:
            tl.atomic_add(grad_theta_ptr + idx, per_entry, mask=ok & inside, sem="relaxed")
        else:
            tl.store(per_entry_ptr + es, per_entry, mask=ok)


# ------------------------------------------------------------------------------- launchers


def gather_rows(weights: Tensor, indices: Tensor, offsets: Tensor, table: Tensor) -> Tensor:
    """(N, D) float32: row n is ``sum_e weights[e] * table[indices[e]]`` over its entries."""
    n = offsets.numel() - 1
    d = table.shape[1]
    out = torch.empty(n, d, dtype=torch.float32, device=table.device)
    if n == 0 or d == 0:
        return out
    table = table.contiguous()
    block_e, block_d = _blocks(d, weights.numel() / n)
    gather_rows_kernel[(n, triton.cdiv(d, block_d))](
        weights,
        indices,
        offsets,
        table,
        out,
        d,
        table.stride(0),
        out.stride(0),
        BLOCK_E=block_e,
        BLOCK_D=block_d,
    )
    return out


def gather_dots(vectors: Tensor, indices: Tensor, offsets: Tensor, table: Tensor) -> Tensor:
    """(nnz,) float32: ``<vectors[row(e)], table[indices[e]]>`` for every entry e."""
    n = offsets.numel() - 1
    d = table.shape[1]
    out = torch.empty(indices.numel(), dtype=torch.float32, device=table.device)
    if n == 0 or indices.numel() == 0:
        return out
    vectors = vectors.contiguous()
    table = table.contiguous()
    block_e, block_d = _blocks(d, indices.numel() / n)
    gather_dots_kernel[(n,)](
        vectors,
        indices,
        offsets,
        table,
        out,
        d,
        vectors.stride(0),
        table.stride(0),
        BLOCK_E=block_e,
        BLOCK_D=min(block_d, 128),  # one row of vectors is reloaded per entry block
    )
    return out


def entry_rows(offsets: Tensor, nnz: int) -> Tensor:
    """(nnz,) int64 the row of each CSR entry."""
    counts = offsets.diff()
    return torch.repeat_interleave(
        torch.arange(counts.numel(), device=offsets.device), counts, output_size=nnz
    )


def scatter_rows(
    weights: Tensor,
    indices: Tensor,
    offsets: Tensor,
    source: Tensor,
    n_target: int,
    *,
    with_bias: bool = False,
    deterministic: bool | None = None,
) -> tuple[Tensor, Tensor | None]:
    """``G[indices[e]] += weights[e] * source[row(e)]``: the (n_target, D) float32 weight
    gradient, and with ``with_bias`` the (n_target,) sums of the weights per target row.

    ``deterministic`` (default: whether torch is asked for deterministic algorithms) sorts the
    entries by target row and sums each row's entries in one fixed order: bit-identical
    results run to run, at the cost of a sort and an uneven load for very popular latents.
    """
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    n = offsets.numel() - 1
    d = source.shape[1]
    device = source.device
    source = source.contiguous()
    block_e, block_d = _blocks(d, weights.numel() / max(n, 1))
    if deterministic:
        out = torch.empty(n_target, d, dtype=torch.float32, device=device)
        bias = torch.empty(n_target, dtype=torch.float32, device=device) if with_bias else None
        if n_target == 0:
            return out, bias
        order = torch.argsort(indices, stable=True)
        segments = torch.searchsorted(
            indices[order], torch.arange(n_target + 1, device=device, dtype=indices.dtype)
        )
        scatter_rows_sorted_kernel[(n_target, triton.cdiv(d, block_d))](
            weights,
            order,
            entry_rows(offsets, indices.numel()),
            segments,
            source,
            out,
            bias if bias is not None else out,
            d,
            source.stride(0),
            out.stride(0),
            HAS_BIAS=with_bias,
            BLOCK_E=block_e,
            BLOCK_D=block_d,
        )
        return out, bias
    out = torch.zeros(n_target, d, dtype=torch.float32, device=device)
    bias = torch.zeros(n_target, dtype=torch.float32, device=device) if with_bias else None
    if n == 0 or indices.numel() == 0:
        return out, bias
    scatter_rows_atomic_kernel[(n, triton.cdiv(d, block_d))](
        weights,
        indices,
        offsets,
        source,
        out,
        bias if bias is not None else out,
        d,
        source.stride(0),
        out.stride(0),
        HAS_BIAS=with_bias,
        BLOCK_E=block_e,
        BLOCK_D=block_d,
    )
    return out, bias


def jumprelu_backward(
    grad_values: Tensor,
    grad_l0: Tensor,
    pre: Tensor,
    indices: Tensor,
    threshold: Tensor,
    bandwidth: float | None,
    need_threshold_grad: bool = True,
    *,
    deterministic: bool | None = None,
) -> tuple[Tensor, Tensor | None]:
    """The contract of :func:`saekit.kernels.eager.jumprelu_backward`, in one pass over the
    entries; gradients in float32. The threshold's per-latent sums are float32 atomics, or
    under deterministic algorithms a ``index_add_`` that torch then makes deterministic."""
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    if need_threshold_grad and bandwidth is None:
        raise RuntimeError("JumpReLU threshold gradient needs a bandwidth (training mode)")
    nnz = pre.numel()
    device = pre.device
    grad_pre = torch.empty(nnz, dtype=torch.float32, device=device)
    grad_threshold = (
        torch.zeros(threshold.shape, dtype=torch.float32, device=device)
        if need_threshold_grad
        else None
    )
    per_entry = (
        torch.empty(nnz, dtype=torch.float32, device=device)
        if need_threshold_grad and deterministic
        else grad_pre
    )
    if nnz == 0:
        return grad_pre, grad_threshold
    block = 128 if INTERPRETING else 1024
    jumprelu_backward_kernel[(triton.cdiv(nnz, block),)](
        grad_values.contiguous(),
        pre,
        indices,
        threshold,
        grad_l0.reshape(()).to(device=device, dtype=torch.float32),
        grad_pre,
        per_entry,
        grad_threshold if grad_threshold is not None else grad_pre,
        nnz,
        float(bandwidth or 1.0),
        NEED_THETA=need_threshold_grad,
        ATOMIC=not deterministic,
        BLOCK=block,
    )
    if grad_threshold is not None and deterministic:
        grad_threshold.index_add_(0, indices, per_entry)
    return grad_pre, grad_threshold
