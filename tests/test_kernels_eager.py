"""The eager kernels (the CPU training path) against dense float64 autograd references."""

from __future__ import annotations

import pytest
import torch

from saekit.kernels import batch_topk_encode, eager, jumprelu_encode, sparse_decode, topk_encode


def _params(n=37, d=19, m=53, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    W_enc = torch.randn(m, d, generator=g, dtype=dtype) / d**0.5
    b_enc = torch.randn(m, generator=g, dtype=dtype) * 0.1
    W_dec = torch.randn(m, d, generator=g, dtype=dtype)
    return x, W_enc, b_enc, W_dec


def _leafs(*ts):
    return [t.clone().requires_grad_(True) for t in ts]


@pytest.fixture(params=["whole", "gathers in chunks", "dense blocks"])
def eager_path(request, monkeypatch):
    """The eager kernels as they run by default at these tiny shapes ("whole": one chunk of
    everything), and each strategy for a variable count of entries per row in chunks far
    smaller than the data: ragged last chunks, rows split between chunks."""
    if request.param == "whole":
        return request.param
    dense = request.param == "dense blocks"
    monkeypatch.setattr(eager, "DENSE_DENSITY", 0.0 if dense else float("inf"))
    monkeypatch.setattr(eager, "CHUNK_BYTES", 3 * 53 * 8)  # 3 rows of (m = 53) float64
    monkeypatch.setattr(eager, "ENTRY_CHUNK_BYTES", 5 * 2 * 19 * 8)  # 5 entries of (d = 19)
    monkeypatch.setattr(eager, "SCATTER_CHUNK_ENTRIES", 7)
    return request.param


def _dense_topk_reference(x_c, W_enc, b_enc, W_dec, k):
    pre = (x_c @ W_enc.T + b_enc).relu()
    values, indices = pre.topk(k, dim=1)
    z = torch.zeros_like(pre).scatter(1, indices, values)
    return z @ W_dec, indices


@pytest.mark.parametrize("k", [1, 5, 53])
def test_topk_encode_decode_matches_dense_autograd(k, eager_path):
    x, W_enc, b_enc, W_dec = _params()
    ref = _leafs(x, W_enc, b_enc, W_dec)
    out_ref, idx_ref = _dense_topk_reference(*ref, k)
    grad_out = torch.randn_like(out_ref)
    (out_ref * grad_out).sum().backward()

    ours = _leafs(x, W_enc, b_enc, W_dec)
    codes, aux = topk_encode(ours[0], ours[1], ours[2], k)
    assert aux is None
    out = sparse_decode(codes, ours[3])
    (out * grad_out).sum().backward()

    torch.testing.assert_close(out, out_ref)
    assert torch.equal(codes.indices.view(-1, k).sort(1).values, idx_ref.sort(1).values)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a.grad, b.grad)


def test_auxk_gradient_reaches_encoder_and_decoder():
    """The AuxK reconstruction trains W_enc and b_enc too (not only W_dec), as plain autograd does."""
    x, W_enc, b_enc, W_dec = _params(seed=1)
    k, k_aux = 4, 6
    dead = torch.tensor([3, 7, 11, 20, 21, 40, 41, 52])
    target = torch.randn(x.shape[0], x.shape[1], dtype=x.dtype)

    ref = _leafs(x, W_enc, b_enc, W_dec)
    pre = (ref[0] @ ref[1].T + ref[2]).relu()
    masked = torch.full_like(pre, -torch.inf)
    masked[:, dead] = pre[:, dead]
    av, ai = masked.topk(k_aux, dim=1)
    z_aux = torch.zeros_like(pre).scatter(1, ai, av)
    ((z_aux @ ref[3] - target) ** 2).sum().backward()

    ours = _leafs(x, W_enc, b_enc, W_dec)
    _, aux = topk_encode(ours[0], ours[1], ours[2], k, dead, k_aux)
    assert aux is not None and set(aux.indices.tolist()) <= set(dead.tolist())
    ((sparse_decode(aux, ours[3]) - target) ** 2).sum().backward()

    assert ours[1].grad.abs().sum() > 0, "AuxK must give the encoder a gradient"
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a.grad, b.grad)


def test_batch_topk_is_exact_and_matches_dense_autograd(eager_path):
    x, W_enc, b_enc, W_dec = _params(n=29, m=41, seed=2)
    # Make a few rows very loud so they own far more than k winners: the candidate
    # refinement must find them all.
    x[:3] *= 30
    k = 3
    ref = _leafs(x, W_enc, b_enc, W_dec)
    pre = (ref[0] @ ref[1].T + ref[2]).relu()
    flat = pre.reshape(-1)
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[flat.topk(k * x.shape[0]).indices] = True
    z = torch.where(keep.view_as(pre) & (pre > 0), pre, 0)
    out_ref = z @ ref[3]
    grad_out = torch.randn_like(out_ref)
    (out_ref * grad_out).sum().backward()

    ours = _leafs(x, W_enc, b_enc, W_dec)
    codes, _ = batch_topk_encode(ours[0], ours[1], ours[2], k)
    assert codes.l0()[:3].min() > 4 * k, "loud rows keep more than the 4k first candidates"
    out = sparse_decode(codes, ours[3])
    (out * grad_out).sum().backward()
    torch.testing.assert_close(codes.to_dense(), z.detach())
    torch.testing.assert_close(out, out_ref)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a.grad, b.grad)


def test_jumprelu_straight_through_gradients(eager_path):
    x, W_enc, b_enc, W_dec = _params(n=31, m=23, seed=3)
    x[[4, 5, 20]] = 0  # rows whose only entries would come from b_enc: none pass the threshold
    b_enc = b_enc.clamp(max=0.1)
    threshold = torch.rand(23, dtype=x.dtype) * 0.5 + 0.25
    eps = 0.2
    grad_out = torch.randn(31, x.shape[1], dtype=x.dtype)
    l0_weight = 0.37

    # Reference: dense math with the rectangle-kernel pseudo-derivatives written out by hand.
    ref = _leafs(x, W_enc, b_enc, W_dec, threshold)
    pre = ref[0] @ ref[1].T + ref[2]
    active = (pre > ref[4]).to(pre.dtype)
    z = pre * active
    out_ref = z @ ref[3]
    (out_ref * grad_out).sum().backward(inputs=ref[:4])
    with torch.no_grad():
        dz = grad_out @ W_dec.T  # (N, m)
        pre_d = pre.detach()
        kernel = ((pre_d - threshold).abs() < eps / 2).to(pre.dtype) / eps
        grad_theta_ref = (-(threshold / 1) * kernel * dz - l0_weight * kernel).sum(0)

    ours = _leafs(x, W_enc, b_enc, W_dec, threshold)
    codes, l0 = jumprelu_encode(ours[0], ours[1], ours[2], ours[4], eps)
    out = sparse_decode(codes, ours[3])
    ((out * grad_out).sum() + l0_weight * l0).backward()

    torch.testing.assert_close(out, out_ref)
    assert (codes.offsets.diff() == 0).sum() >= 3, "empty rows must be among the cases"
    assert l0.item() == active.sum().item()
    for a, b in zip(ours[:4], ref[:4], strict=True):
        torch.testing.assert_close(a.grad, b.grad)
    torch.testing.assert_close(ours[4].grad, grad_theta_ref)


def test_chunked_encoder_matches_unchunked(monkeypatch):
    x, W_enc, b_enc, _ = _params(n=50, m=30, seed=4, dtype=torch.float32)
    whole = eager.encode_topk(x, W_enc, b_enc, 5)
    monkeypatch.setattr(eager, "CHUNK_BYTES", 30 * 4 * 7)  # 7 rows per chunk, last chunk ragged
    chunked = eager.encode_topk(x, W_enc, b_enc, 5)
    # Same selection; values agree to rounding (the product's blocking depends on the chunk).
    assert torch.equal(whole[1].sort(1).values, chunked[1].sort(1).values)
    torch.testing.assert_close(whole[0].sort(1).values, chunked[0].sort(1).values)


def test_decode_of_empty_rows_is_zero():
    W_dec = torch.randn(8, 4)
    values = torch.tensor([1.0, 2.0])
    indices = torch.tensor([3, 5])
    offsets = torch.tensor([0, 0, 2, 2])  # rows 0 and 2 have no active latent
    out = eager.sparse_decode(values, indices, offsets, None, W_dec)
    assert torch.equal(out[0], torch.zeros(4)) and torch.equal(out[2], torch.zeros(4))
    torch.testing.assert_close(out[1], W_dec[3] + 2 * W_dec[5])
