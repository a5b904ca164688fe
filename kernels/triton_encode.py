"""Fused encoders: the ``(N, d) @ (d, m)`` product with its epilogue (bias, then top-k or the
JumpReLU threshold) in one kernel, so the ``N x m`` pre-activations never reach memory.

Writing and re-reading those pre-activations costs ``4 m`` bytes per token in bf16 (12 GB per
step of 16k tokens at m = 131072); the fused kernels keep each ``BLOCK_N x BLOCK_M`` tile of them
in registers, reduce it at once, and write ``O(k)`` numbers per token.

TopK (two kernels). The grid is (row blocks) x (latent splits). Each program walks its split's
latent tiles, computes a tile of pre-activations with ``tl.dot`` and keeps a running top-k of
them: the tile's own top-k (a bitonic top-k, Shanbhag et al. 2018, "Efficient Top-K Query
Processing on Massively Parallel Hardware") is merged into the running one by the bitonic
trick: the element-wise max of a descending and an ascending sorted list is the top half of their
union, and one bitonic merge sorts it. A program writes its split's k candidates per row as
packed (value, latent) keys; the merge kernel takes the top k of the ``splits x k`` candidates
per row. Splitting the latents gives the GPU enough programs at moderate N; the candidates cost
``8 k`` bytes per split and token.

JumpReLU (one kernel). The threshold is elementwise, so no merge: each program compacts its
tile's tracked entries (above the threshold, or within half a bandwidth of it for the
straight-through estimator) with a prefix sum and appends them to its (row, split) segment of a
buffer, counting them all. If some segment overflowed, the host reruns with the exact capacity
needed; a remembered capacity makes that rare after the first step.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from .triton_common import (
    INTERPRETING,
    MIN_KEY,
    dot_precision,
    launch,
    multiprocessors,
    next_power_of_2,
    pack_keys,
    unpack_columns,
    unpack_values,
)

MAX_FUSED_K = 128
"""Largest (padded) k the fused TopK kernel handles; past it the running top-k no longer fits in
registers beside the product's accumulator, and the plain path (dense product + ``torch.topk``)
takes over."""


def _config(block_n: int, block_m: int, warps: int) -> triton.Config:
    return triton.Config(
        {"BLOCK_N": block_n, "BLOCK_M": block_m, "BLOCK_D": 64}, num_warps=warps, num_stages=3
    )


# Tiles per padded k. Compiled for sm_90 (H100), none of these spills registers to local memory
# (tests/test_kernels_triton.py checks it); larger tiles such as 128 x 128 or 64 x 256 do, and so
# do most of these with 4 warps instead of 8.
TOPK_CONFIGS: dict[int, list[triton.Config]] = {
    32: [_config(64, 128, 8), _config(64, 64, 8), _config(32, 64, 8), _config(32, 128, 8)],
    64: [_config(64, 64, 8), _config(32, 64, 8), _config(32, 128, 8), _config(16, 128, 8)],
    128: [_config(32, 128, 8), _config(16, 128, 8)],
}
JUMPRELU_CONFIGS = [_config(64, 64, 8), _config(32, 128, 8), _config(32, 64, 8), _config(32, 64, 4)]

_INTERPRETER_CONFIG: dict[str, Any] = {"BLOCK_N": 16, "BLOCK_M": 16, "BLOCK_D": 16}


def _topk_configs(
    configs: list[triton.Config], named_args: dict[str, Any], **kwargs: Any
) -> list[triton.Config]:
    """The tiles for this k (autotuning prunes to them)."""
    k_pad = int(kwargs.get("K_PAD", named_args.get("K_PAD", 32)))
    return TOPK_CONFIGS[max(32, k_pad)]


# ---------------------------------------------------------------------------------- TopK


@triton.autotune(
    configs=[c for configs in TOPK_CONFIGS.values() for c in configs],
    key=["D", "K_PAD"],
    prune_configs_by={"early_config_prune": _topk_configs},
)
@triton.jit
def topk_candidates_kernel(
    x_ptr,  # (N, D) inputs, in the weights' dtype
    w_ptr,  # (M, D) encoder rows
    b_ptr,  # (M,) bias
    keys_ptr,  # (N, splits, K_PAD) int64 out: each split's top-K_PAD packed keys, descending
    N,
    M,
    D,
    cols_per_split,
    n_splits,
    stride_x,
    stride_w,
    K_PAD: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    split = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    col_start = split * cols_per_split
    col_stop = tl.minimum(M, col_start + cols_per_split)

    best = tl.full((BLOCK_N, K_PAD), MIN_KEY, tl.int64)  # running top-k, descending
    for tile in range(col_start, col_stop, BLOCK_M):
        cols = tile + tl.arange(0, BLOCK_M)
        col_ok = cols < col_stop
        acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            d_ok = ds < D
            x = tl.load(
                x_ptr + rows64[:, None] * stride_x + ds[None, :],
                mask=row_ok[:, None] & d_ok[None, :],
                other=0.0,
            )  # (BLOCK_N, BLOCK_D)
            w = tl.load(
                w_ptr + cols.to(tl.int64)[:, None] * stride_w + ds[None, :],
                mask=col_ok[:, None] & d_ok[None, :],
                other=0.0,
            )  # (BLOCK_M, BLOCK_D)
            acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
        bias = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        pre = tl.where(col_ok[None, :], acc + bias[None, :], float("-inf"))  # (BLOCK_N, BLOCK_M)
        keys = pack_keys(pre, tl.broadcast_to(cols[None, :], (BLOCK_N, BLOCK_M)))
        top = tl.topk(keys, K_PAD, dim=1)  # (BLOCK_N, K_PAD) descending
        # max(descending, ascending) = the top K_PAD of both, as a bitonic sequence.
        best = tl.bitonic_merge(tl.maximum(best, tl.flip(top, 1)), 1, True)

    out = keys_ptr + (rows64[:, None] * n_splits + split) * K_PAD + tl.arange(0, K_PAD)[None, :]
    tl.store(out, best, mask=row_ok[:, None])


@triton.jit
def topk_merge_kernel(
    keys_ptr,  # (N, WIDTH) int64 candidates
    values_ptr,  # (N, k) out
    indices_ptr,  # (N, k) int64 out
    index_map_ptr,  # (M,) int64: latent id of each weight row (AuxK's dead latents), if MAP
    N,
    k,
    WIDTH: tl.constexpr,
    K_PAD: tl.constexpr,
    BLOCK_R: tl.constexpr,
    RELU: tl.constexpr,
    MAP: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    keys = tl.load(
        keys_ptr + rows64[:, None] * WIDTH + tl.arange(0, WIDTH)[None, :],
        mask=row_ok[:, None],
        other=MIN_KEY,
    )
    if WIDTH > K_PAD:  # noqa: SIM108 (a compile-time branch)
        top = tl.topk(keys, K_PAD, dim=1)
    else:
        top = keys  # one split: already its sorted top-k
    values = unpack_values(top)
    if RELU:
        values = tl.maximum(values, 0.0)
    latents = unpack_columns(top).to(tl.int64)
    j = tl.arange(0, K_PAD)[None, :]
    ok = row_ok[:, None] & (j < k)
    if MAP:
        latents = tl.load(index_map_ptr + latents, mask=ok, other=0)
    tl.store(values_ptr + rows64[:, None] * k + j, values, mask=ok)
    tl.store(indices_ptr + rows64[:, None] * k + j, latents, mask=ok)


def _splits(n: int, m: int, k_pad: int, device: torch.device) -> int:
    """Latent splits: enough programs for two waves over the GPU at ``BLOCK_N = 64``, while each
    split keeps at least 1024 latents and the merge stays narrow."""
    row_blocks = triton.cdiv(n, 64)
    target = 2 * multiprocessors(device)
    splits = 1
    while row_blocks * splits < target and m // (2 * splits) >= 1024 and 2 * splits * k_pad <= 2048:
        splits *= 2
    return splits


def topk_fused(
    x: Tensor,
    W: Tensor,
    b: Tensor,
    k: int,
    *,
    relu: bool = True,
    index_map: Tensor | None = None,
    splits: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Top-k of ``x @ W.T + b`` per row, from the fused kernels.

    Args:
        x: (N, D) inputs; cast to W's dtype (the product's), accumulated in float32.
        W: (M, D) weight rows, b: (M,) bias.
        k: how many to keep per row, at most M and MAX_FUSED_K.
        relu: return ``max(value, 0)`` (selection is on the raw values: ReLU is monotone).
        index_map: (M,) int64 latent id of each row of W, for a gathered sub-matrix (AuxK).
        splits: latent splits (default: enough to fill the GPU); a power of two.

    Returns:
        values (N, k) float32, sorted descending per row; indices (N, k) int64.
    """
    n, d = x.shape
    m = W.shape[0]
    if not 1 <= k <= m:
        raise ValueError(f"k={k} must be between 1 and the number of rows of W ({m})")
    k_pad = next_power_of_2(k)
    if k_pad > MAX_FUSED_K:
        raise ValueError(f"the fused top-k keeps at most {MAX_FUSED_K} per row, asked for {k}")
    values = torch.empty(n, k, dtype=torch.float32, device=x.device)
    indices = torch.empty(n, k, dtype=torch.long, device=x.device)
    if n == 0:
        return values, indices
    x = x.to(W.dtype).contiguous()
    W = W.contiguous()
    splits = splits or _splits(n, m, k_pad, x.device)
    # Splits start on a tile boundary of every config (BLOCK_M <= 256), except for tiny M.
    unit = _INTERPRETER_CONFIG["BLOCK_M"] if INTERPRETING else 256
    cols_per_split = triton.cdiv(triton.cdiv(m, splits), unit) * unit
    keys = torch.empty(n, splits * k_pad, dtype=torch.long, device=x.device)
    launch(
        topk_candidates_kernel,
        lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), splits),
        x,
        W,
        b,
        keys,
        n,
        m,
        d,
        cols_per_split,
        splits,
        x.stride(0),
        W.stride(0),
        interpreter_config={**_INTERPRETER_CONFIG, "BLOCK_M": max(16, k_pad)},
        K_PAD=k_pad,
        PRECISION=dot_precision(W.dtype),
    )
    width = splits * k_pad
    block_r = max(1, min(64, 4096 // width))
    topk_merge_kernel[(triton.cdiv(n, block_r),)](
        keys,
        values,
        indices,
        index_map if index_map is not None else indices,
        n,
        k,
        WIDTH=width,
        K_PAD=k_pad,
        BLOCK_R=block_r,
        RELU=relu,
        MAP=index_map is not None,
    )
    return values, indices


# ---------------------------------------------------------------------------------- JumpReLU


@triton.autotune(configs=JUMPRELU_CONFIGS, key=["D", "TRACK_BAND"])
@triton.jit
def jumprelu_encode_kernel(
    x_ptr,  # (N, D) inputs, in the weights' dtype
    w_ptr,  # (M, D)
    b_ptr,  # (M,)
    theta_ptr,  # (M,) thresholds
    pre_ptr,  # (N, splits, capacity) float32 out: tracked pre-activations
    col_ptr,  # (N, splits, capacity) int32 out: their latents
    count_ptr,  # (N, splits) int32 out: tracked entries, including those past capacity
    N,
    M,
    D,
    cols_per_split,
    n_splits,
    capacity,
    half_band,
    stride_x,
    stride_w,
    TRACK_BAND: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    split = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    col_start = split * cols_per_split
    col_stop = tl.minimum(M, col_start + cols_per_split)
    segment = (rows64 * n_splits + split) * capacity  # (BLOCK_N,) start of each row's segment

    count = tl.zeros((BLOCK_N,), tl.int32)
    for tile in range(col_start, col_stop, BLOCK_M):
        cols = tile + tl.arange(0, BLOCK_M)
        col_ok = cols < col_stop
        acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            d_ok = ds < D
            x = tl.load(
                x_ptr + rows64[:, None] * stride_x + ds[None, :],
                mask=row_ok[:, None] & d_ok[None, :],
                other=0.0,
            )
            w = tl.load(
                w_ptr + cols.to(tl.int64)[:, None] * stride_w + ds[None, :],
                mask=col_ok[:, None] & d_ok[None, :],
                other=0.0,
            )
            acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
        bias = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        theta = tl.load(theta_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        pre = acc + bias[None, :]
        tracked = pre > theta[None, :]
        if TRACK_BAND:
            tracked = tracked | (tl.abs(pre - theta[None, :]) < half_band)
        tracked = tracked & col_ok[None, :] & row_ok[:, None]
        flags = tracked.to(tl.int32)
        slot = count[:, None] + tl.cumsum(flags, axis=1) - 1  # (BLOCK_N, BLOCK_M)
        keep = tracked & (slot < capacity)
        where = segment[:, None] + slot
        tl.store(pre_ptr + where, pre, mask=keep)
        tl.store(col_ptr + where, tl.broadcast_to(cols[None, :], (BLOCK_N, BLOCK_M)), mask=keep)
        count += tl.sum(flags, axis=1)
    tl.store(count_ptr + rows64 * n_splits + split, count, mask=row_ok)


_capacity_hint: dict[tuple[int, int], int] = {}
"""Last capacity each (M, splits) needed: a good first guess for the next step's buffers."""


def jumprelu_fused(
    x: Tensor,
    W: Tensor,
    b: Tensor,
    threshold: Tensor,
    bandwidth: float | None,
    *,
    splits: int | None = None,
    capacity: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """JumpReLU's tracked entries of ``x @ W.T + b`` as CSR, from the fused kernel.

    Same selection as :func:`saekit.kernels.eager.encode_jumprelu`: ``pre > threshold``, or
    ``|pre - threshold| < bandwidth / 2`` when ``bandwidth`` is given.

    Returns:
        pre (nnz,) float32, indices (nnz,) int64, offsets (N + 1,) int64; entries sorted by row,
        then by latent.
    """
    n, d = x.shape
    m = W.shape[0]
    device = x.device
    x = x.to(W.dtype).contiguous()
    W = W.contiguous()
    splits = splits or _splits(n, m, 16, device)
    unit = _INTERPRETER_CONFIG["BLOCK_M"] if INTERPRETING else 256
    cols_per_split = triton.cdiv(triton.cdiv(m, splits), unit) * unit
    capacity = capacity or _capacity_hint.get((m, splits), 64)
    while True:
        pre_buf = torch.empty(n, splits, capacity, dtype=torch.float32, device=device)
        col_buf = torch.empty(n, splits, capacity, dtype=torch.int32, device=device)
        counts = torch.empty(n, splits, dtype=torch.int32, device=device)
        if n == 0:
            break
        launch(
            jumprelu_encode_kernel,
            lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), splits),
            x,
            W,
            b,
            threshold,
            pre_buf,
            col_buf,
            counts,
            n,
            m,
            d,
            cols_per_split,
            splits,
            capacity,
            (bandwidth or 0.0) / 2,
            x.stride(0),
            W.stride(0),
            interpreter_config=_INTERPRETER_CONFIG,
            TRACK_BAND=bandwidth is not None,
            PRECISION=dot_precision(W.dtype),
        )
        needed = int(counts.max())
        if needed <= capacity:
            break
        capacity = needed  # exact: the kernel counted every tracked entry
    if n:
        _capacity_hint[(m, splits)] = max(16, needed + needed // 8)
    filled = torch.arange(capacity, device=device) < counts.unsqueeze(-1)  # (N, splits, capacity)
    offsets = torch.zeros(n + 1, dtype=torch.long, device=device)
    torch.cumsum(counts.sum(1), 0, out=offsets[1:])
    return pre_buf[filled], col_buf[filled].long(), offsets
