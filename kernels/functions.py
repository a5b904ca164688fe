"""Autograd wrappers over the kernels: what the dictionaries call.

Each ``Function`` computes its forward with :func:`backend_for` (Triton on CUDA, the eager twin
elsewhere) and writes its backward by hand so that gradients stay sparse: only the latents a row
selected receive gradient, through gathers and scatter-adds rather than dense products.

Under CUDA autocast on the Triton path, the kernels read the weights through bf16 (the autocast
dtype) copies made once per weight update (:func:`_operand`): the encoder's product then runs at
bf16 speed and every sparse gather moves half the bytes, while gradients still accumulate in
float32 and are returned in the masters' dtype. Elsewhere (CPU, eager, no autocast) the weights
are used as they are.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import Tensor

from .codes import SparseCodes
from .dispatch import backend_for, use_triton

# id(weight) -> (weak reference, version counter, low-precision copy)
_operand_cache: dict[int, tuple[weakref.ref, int, Tensor]] = {}


def _operand(t: Tensor) -> Tensor:
    """``t`` as the kernels should read it: a copy in the autocast dtype when CUDA autocast is
    on and the Triton backend runs, else ``t`` itself."""
    if not (t.is_cuda and t.is_floating_point() and torch.is_autocast_enabled("cuda")):
        return t
    dtype = torch.get_autocast_dtype("cuda")
    if t.dtype == dtype or t.element_size() < 4 or not use_triton(t):
        return t
    return cached_copy(t, dtype)


def cached_copy(t: Tensor, dtype: torch.dtype) -> Tensor:
    """A detached copy of ``t`` in ``dtype``, reused until ``t`` changes in place (its version
    counter moves: an optimiser step, a renormalisation) or is freed. A step that reads
    ``W_dec`` twice (the decode and AuxK's) casts it once."""
    key = id(t)
    hit = _operand_cache.get(key)
    if hit is not None and hit[0]() is t and hit[1] == t._version and hit[2].dtype == dtype:
        return hit[2]
    low = t.detach().to(dtype)
    for stale in [k for k, (ref, _, _) in _operand_cache.items() if ref() is None]:
        del _operand_cache[stale]
    _operand_cache[key] = (weakref.ref(t), t._version, low)
    return low


def _grad(grad: Tensor | None, output: Tensor) -> Tensor:
    """An output's incoming gradient, zeros when autograd has none for it. Every Function here
    turns off autograd's own materialisation of missing gradients: it would also fill zeros for
    the non-differentiable outputs, an int64 tensor per entry (274 MB for the 34M entries of a
    JumpReLU step at initialisation)."""
    return torch.zeros_like(output) if grad is None else grad


def _like(t: Tensor | None, reference: Tensor) -> Tensor | None:
    """``t`` in ``reference``'s dtype (the Triton backend returns float32 throughout)."""
    return None if t is None else t.to(reference.dtype)


class _TopKEncode(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x_c: Tensor,
        W_enc: Tensor,
        b_enc: Tensor,
        k: int,
        dead_latents: Tensor | None,
        k_aux: int,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        W_op = _operand(W_enc)
        x_op = x_c.to(W_op.dtype)
        values, indices, aux_values, aux_indices = backend_for(x_c).encode_topk(
            x_op, W_op, b_enc, k, dead_latents, k_aux
        )
        values, aux_values = values.to(x_c.dtype), aux_values.to(x_c.dtype)
        ctx.save_for_backward(x_op, W_op, values, indices, aux_values, aux_indices)
        ctx.dtypes = (x_c.dtype, W_enc.dtype, b_enc.dtype)
        ctx.mark_non_differentiable(indices, aux_indices)
        ctx.set_materialize_grads(False)
        return values, indices, aux_values, aux_indices

    @staticmethod
    def backward(ctx: Any, grad_values: Tensor, _gi: Any, grad_aux: Tensor, _ga: Any):
        x_c, W_enc, values, indices, aux_values, aux_indices = ctx.saved_tensors
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        # ReLU gate: values are post-ReLU, so an entry carries gradient iff it is positive.
        grad_pre = torch.where(values > 0, _grad(grad_values, values), 0)
        idx = indices
        if aux_indices.shape[1] > 0:
            grad_aux_pre = torch.where(aux_values > 0, _grad(grad_aux, aux_values), 0)
            grad_pre = torch.cat([grad_pre, grad_aux_pre], dim=1)
            idx = torch.cat([indices, aux_indices], dim=1)
        n, width = idx.shape
        offsets = torch.arange(0, n * width + 1, width, device=idx.device)
        grad_x, grad_W, grad_b = backend_for(x_c).sparse_encode_backward(
            grad_pre.reshape(-1),
            idx.reshape(-1),
            offsets,
            width,
            x_c,
            W_enc,
            ctx.needs_input_grad[0],
        )
        return (
            None if grad_x is None else grad_x.to(x_dtype),
            grad_W.to(w_dtype),
            grad_b.to(b_dtype),
            None,
            None,
            None,
        )


def topk_encode(
    x_c: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    k: int,
    dead_latents: Tensor | None = None,
    k_aux: int = 0,
) -> tuple[SparseCodes, SparseCodes | None]:
    """TopK codes of ``x_c`` (N, d), and the AuxK codes over ``dead_latents`` when given.

    Gradients flow to ``x_c``, ``W_enc`` and ``b_enc`` through both sets of codes, so the AuxK
    loss trains the encoder as well as the decoder (Gao et al. 2024, appendix B.1).
    """
    values, indices, aux_values, aux_indices = _TopKEncode.apply(
        x_c, W_enc, b_enc, k, dead_latents, k_aux
    )
    m = W_enc.shape[0]
    codes = SparseCodes.from_topk(values, indices, m)
    aux = SparseCodes.from_topk(aux_values, aux_indices, m) if aux_indices.shape[1] > 0 else None
    return codes, aux


class _BatchTopKEncode(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x_c: Tensor,
        W_enc: Tensor,
        b_enc: Tensor,
        k: int,
        dead_latents: Tensor | None,
        k_aux: int,
    ):
        W_op = _operand(W_enc)
        x_op = x_c.to(W_op.dtype)
        values, indices, offsets, aux_values, aux_indices = backend_for(x_c).encode_batch_topk(
            x_op, W_op, b_enc, k, dead_latents, k_aux
        )
        values, aux_values = values.to(x_c.dtype), aux_values.to(x_c.dtype)
        ctx.save_for_backward(x_op, W_op, values, indices, offsets, aux_values, aux_indices)
        ctx.dtypes = (x_c.dtype, W_enc.dtype, b_enc.dtype)
        ctx.mark_non_differentiable(indices, offsets, aux_indices)
        ctx.set_materialize_grads(False)
        return values, indices, offsets, aux_values, aux_indices

    @staticmethod
    def backward(ctx: Any, grad_values: Tensor, _gi: Any, _go: Any, grad_aux: Tensor, _ga: Any):
        x_c, W_enc, values, indices, offsets, aux_values, aux_indices = ctx.saved_tensors
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        backend = backend_for(x_c)
        need_x = ctx.needs_input_grad[0]
        # ReLU gate: a kept value of zero (a batch short of positive candidates) has none.
        grad_pre = torch.where(values > 0, _grad(grad_values, values), 0)
        grad_x, grad_W, grad_b = backend.sparse_encode_backward(
            grad_pre, indices, offsets, None, x_c, W_enc, need_x
        )
        if aux_indices.shape[1] > 0:
            n, width = aux_indices.shape
            aux_offsets = torch.arange(0, n * width + 1, width, device=x_c.device)
            grad_aux_pre = torch.where(aux_values > 0, _grad(grad_aux, aux_values), 0).reshape(-1)
            gx, gw, gb = backend.sparse_encode_backward(
                grad_aux_pre, aux_indices.reshape(-1), aux_offsets, width, x_c, W_enc, need_x
            )
            grad_W, grad_b = grad_W + gw, grad_b + gb
            grad_x = grad_x + gx if gx is not None and grad_x is not None else grad_x
        return (
            None if grad_x is None else grad_x.to(x_dtype),
            grad_W.to(w_dtype),
            grad_b.to(b_dtype),
            None,
            None,
            None,
        )


def batch_topk_encode(
    x_c: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    k: int,
    dead_latents: Tensor | None = None,
    k_aux: int = 0,
) -> tuple[SparseCodes, SparseCodes | None]:
    """BatchTopK codes: the ``k * N`` largest activations of the batch (variable per row), and
    the per-row AuxK codes over ``dead_latents`` when given."""
    values, indices, offsets, aux_values, aux_indices = _BatchTopKEncode.apply(
        x_c, W_enc, b_enc, k, dead_latents, k_aux
    )
    m = W_enc.shape[0]
    codes = SparseCodes(values, indices, offsets, m, None)
    aux = SparseCodes.from_topk(aux_values, aux_indices, m) if aux_indices.shape[1] > 0 else None
    return codes, aux


JUMPRELU_CHUNK = 1 << 22
"""Entries per pass of :func:`_jumprelu_values`: its temporaries (a gathered threshold, a mask)
stay at tens of MB however many entries a step tracks (33M at a JumpReLU's initialisation)."""


def _jumprelu_values(pre: Tensor, indices: Tensor, threshold: Tensor) -> tuple[Tensor, Tensor]:
    """``pre * H(pre - threshold[indices])`` and the number of active entries (a 0-d tensor in
    ``pre``'s dtype), a chunk of entries at a time."""
    values = torch.empty_like(pre)
    l0 = pre.new_zeros((), dtype=torch.long)
    for start in range(0, pre.numel(), JUMPRELU_CHUNK):
        here = slice(start, start + JUMPRELU_CHUNK)
        active = pre[here] > threshold[indices[here]]
        values[here] = torch.where(active, pre[here], 0)
        l0 += torch.count_nonzero(active)
    return values, l0.to(pre.dtype)


class _JumpReLUEncode(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x_c: Tensor,
        W_enc: Tensor,
        b_enc: Tensor,
        threshold: Tensor,
        bandwidth: float | None,
    ):
        W_op = _operand(W_enc)
        x_op = x_c.to(W_op.dtype)
        pre, indices, offsets = backend_for(x_c).encode_jumprelu(
            x_op, W_op, b_enc, threshold, bandwidth
        )
        pre = pre.to(x_c.dtype)
        values, l0 = _jumprelu_values(pre, indices, threshold)
        ctx.save_for_backward(x_op, W_op, threshold, pre, indices, offsets)
        ctx.bandwidth = bandwidth
        ctx.dtypes = (x_c.dtype, W_enc.dtype, b_enc.dtype)
        ctx.mark_non_differentiable(indices, offsets)
        ctx.set_materialize_grads(False)
        return values, indices, offsets, l0

    @staticmethod
    def backward(ctx: Any, grad_values: Tensor, _gi: Any, _go: Any, grad_l0: Tensor):
        x_c, W_enc, threshold, pre, indices, offsets = ctx.saved_tensors
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        backend = backend_for(x_c)
        grad_pre, grad_threshold = backend.jumprelu_backward(
            _grad(grad_values, pre),
            grad_l0 if grad_l0 is not None else pre.new_zeros(()),
            pre,
            indices,
            threshold,
            ctx.bandwidth,
            ctx.needs_input_grad[3],
        )
        grad_x, grad_W, grad_b = backend.sparse_encode_backward(
            grad_pre, indices, offsets, None, x_c, W_enc, ctx.needs_input_grad[0]
        )
        return (
            None if grad_x is None else grad_x.to(x_dtype),
            grad_W.to(w_dtype),
            grad_b.to(b_dtype),
            _like(grad_threshold, threshold),
            None,
        )


def jumprelu_encode(
    x_c: Tensor, W_enc: Tensor, b_enc: Tensor, threshold: Tensor, bandwidth: float | None = None
) -> tuple[SparseCodes, Tensor]:
    """JumpReLU codes of ``x_c`` and the total L0 (a differentiable count of active entries).

    With ``bandwidth`` set, entries near the threshold are carried as explicit zeros so that the
    straight-through estimator can reach the threshold; ``threshold`` gets a gradient both from
    the reconstruction and from the L0 count.
    """
    values, indices, offsets, l0 = _JumpReLUEncode.apply(x_c, W_enc, b_enc, threshold, bandwidth)
    return SparseCodes(values, indices, offsets, W_enc.shape[0], None), l0


class _SparseDecode(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, values: Tensor, indices: Tensor, offsets: Tensor, k: int | None, W_dec: Tensor
    ):
        W_op = _operand(W_dec)
        ctx.save_for_backward(values, indices, offsets, W_op)
        ctx.k = k
        ctx.w_dtype = W_dec.dtype
        out = backend_for(W_dec).sparse_decode(values, indices, offsets, k, W_op)
        return out.to(W_dec.dtype)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor):
        values, indices, offsets, W_dec = ctx.saved_tensors
        grad_values, grad_W_dec = backend_for(W_dec).sparse_decode_backward(
            grad_out.contiguous(), values, indices, offsets, ctx.k, W_dec
        )
        return grad_values.to(values.dtype), None, None, None, grad_W_dec.to(ctx.w_dtype)


def sparse_decode(codes: SparseCodes, W_dec: Tensor) -> Tensor:
    """(N, d) ``sum_j codes[n, j] * W_dec[j]``, without the decoder bias."""
    return _SparseDecode.apply(codes.values, codes.indices, codes.offsets, codes.k, W_dec)
