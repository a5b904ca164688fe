"""The Triton backend: the functions of :mod:`saekit.kernels.eager`, with the same names and
arguments, for CUDA tensors. :mod:`saekit.kernels.dispatch` picks it per call.

Two deliberate differences from the eager contracts, both about dtypes:

* products and gathers run in the *weights'* dtype (the inputs are cast to it), so the autograd
  wrappers can hand in bf16 copies of float32 master weights under autocast; everything
  accumulates in float32;
* every output (activations, pre-activations, reconstructions, gradients) is float32; the
  wrappers cast each to the dtype of the tensor it belongs to.

Where a step's time goes, phase by phase, is worked out in :mod:`saekit.kernels.roofline`.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from . import dispatch, eager
from .triton_common import next_power_of_2
from .triton_encode import MAX_FUSED_K, jumprelu_fused, topk_fused
from .triton_sparse import gather_dots, gather_rows, jumprelu_backward, scatter_rows

__all__ = [
    "encode_batch_topk",
    "encode_jumprelu",
    "encode_topk",
    "encoder_path",
    "jumprelu_backward",
    "sparse_decode",
    "sparse_decode_backward",
    "sparse_encode_backward",
]

PLAIN_CHUNK_BYTES = 1 << 30
"""Pre-activations the plain path holds at once: big enough for full-speed products."""


def encoder_path(kind: Literal["topk", "jumprelu"], k: int, W: Tensor) -> str:
    """``"fused"`` or ``"plain"`` for an encoder of ``kind`` selecting ``k`` per row (TopK) over
    the weight rows ``W`` (m, d): :func:`saekit.kernels.dispatch.encoder_path`, and plain
    whenever the fused TopK cannot hold k (its running top-k lives in registers)."""
    if kind == "topk" and next_power_of_2(k) > MAX_FUSED_K:
        return "plain"
    return dispatch.encoder_path(kind, W.shape[1], W.dtype)


# ------------------------------------------------------------------------------- encoders


def _plain_products(x: Tensor, W: Tensor, b: Tensor):
    """(start, stop, pre) row chunks of ``x @ W.T + b`` in W's dtype (cuBLAS)."""
    n, m = x.shape[0], W.shape[0]
    rows = max(1, PLAIN_CHUNK_BYTES // max(1, m * W.element_size()))
    x = x.to(W.dtype)
    b = b.to(W.dtype)
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        yield start, stop, torch.addmm(b, x[start:stop], W.t())


def _topk(
    x: Tensor, W: Tensor, b: Tensor, k: int, index_map: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """(N, k) float32 ReLU'd top-k values of ``x @ W.T + b`` and their int64 latents."""
    if encoder_path("topk", k, W) == "fused":
        return topk_fused(x, W, b, k, index_map=index_map)
    n = x.shape[0]
    values = torch.empty(n, k, dtype=torch.float32, device=x.device)
    indices = torch.empty(n, k, dtype=torch.long, device=x.device)
    for start, stop, pre in _plain_products(x, W, b):
        top, idx = pre.topk(k, dim=1, sorted=False)
        values[start:stop] = top
        indices[start:stop] = idx if index_map is None else index_map[idx]
    return values.relu_(), indices


def encode_topk(
    x_c: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    k: int,
    dead_latents: Tensor | None = None,
    k_aux: int = 0,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`saekit.kernels.eager.encode_topk`. AuxK runs the same encoder on the dead
    latents' rows only, gathered: its extra product costs ``n_dead / m`` of the main one."""
    n = x_c.shape[0]
    values, indices = _topk(x_c, W_enc, b_enc, k)
    use_aux = dead_latents is not None and dead_latents.numel() > 0 and k_aux > 0
    if not use_aux:
        empty = torch.empty(n, 0, dtype=torch.float32, device=x_c.device)
        return values, indices, empty, torch.empty(n, 0, dtype=torch.long, device=x_c.device)
    assert dead_latents is not None
    k_aux = min(k_aux, dead_latents.numel())
    aux_values, aux_indices = _topk(
        x_c,
        W_enc.index_select(0, dead_latents),
        b_enc.index_select(0, dead_latents),
        k_aux,
        index_map=dead_latents,
    )
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
    """:func:`saekit.kernels.eager.encode_batch_topk`, on this backend's per-row top-k."""
    return eager.batch_topk_from_rows(
        encode_topk, x_c, W_enc, b_enc, k, dead_latents, k_aux, candidates_per_row
    )


def encode_jumprelu(
    x_c: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    threshold: Tensor,
    bandwidth: float | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`saekit.kernels.eager.encode_jumprelu` (pre-activations in float32)."""
    if encoder_path("jumprelu", 1, W_enc) == "fused":
        return jumprelu_fused(x_c, W_enc, b_enc, threshold, bandwidth)
    n = x_c.shape[0]
    pres, cols, counts = [], [], []
    theta = threshold.float()
    for _, _, pre in _plain_products(x_c, W_enc, b_enc):
        pre = pre.float()
        tracked = pre > theta
        if bandwidth is not None:
            tracked |= (pre - theta).abs_() < bandwidth / 2
        rows_here, cols_here = tracked.nonzero(as_tuple=True)
        pres.append(pre[rows_here, cols_here])
        cols.append(cols_here)
        counts.append(tracked.sum(1))
    offsets = torch.zeros(n + 1, dtype=torch.long, device=x_c.device)
    if n:
        torch.cumsum(torch.cat(counts), 0, out=offsets[1:])
        return torch.cat(pres), torch.cat(cols), offsets
    empty = torch.empty(0, device=x_c.device)
    return empty, empty.long(), offsets


# ------------------------------------------------------------------------------- sparse ops


def sparse_decode(
    values: Tensor, indices: Tensor, offsets: Tensor, k: int | None, W_dec: Tensor
) -> Tensor:
    """:func:`saekit.kernels.eager.sparse_decode`: (N, d) float32."""
    return gather_rows(values.contiguous(), indices.contiguous(), offsets, W_dec)


def sparse_decode_backward(
    grad_out: Tensor,
    values: Tensor,
    indices: Tensor,
    offsets: Tensor,
    k: int | None,
    W_dec: Tensor,
) -> tuple[Tensor, Tensor]:
    """:func:`saekit.kernels.eager.sparse_decode_backward`: grad_values (nnz,) and grad_W_dec
    (m, d), both float32; the latter touched only on the rows of the active latents."""
    indices = indices.contiguous()
    grad_values = gather_dots(grad_out, indices, offsets, W_dec)
    grad_W_dec, _ = scatter_rows(values.contiguous(), indices, offsets, grad_out, W_dec.shape[0])
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
    """:func:`saekit.kernels.eager.sparse_encode_backward`: grad_x_c (N, d) or None,
    grad_W_enc (m, d), grad_b_enc (m,), all float32."""
    grad_pre = grad_pre.contiguous()
    indices = indices.contiguous()
    grad_W, grad_b = scatter_rows(grad_pre, indices, offsets, x_c, W_enc.shape[0], with_bias=True)
    assert grad_b is not None
    grad_x = gather_rows(grad_pre, indices, offsets, W_enc) if need_input_grad else None
    return grad_x, grad_W, grad_b
