"""Every Triton kernel, run in the interpreter on CPU, against its eager twin and float64.

Shapes are awkward on purpose (d not a power of two, m not a multiple of the tile, ragged row
blocks, k = 1 and k = m, duplicate latents in a row, all-zero rows) and small (the interpreter
is slow). Outputs come from poisoned memory (NaN / largest integer), so an element a kernel
forgot to write fails the comparison. The interpreter uses blocks of 16 rows, 16 latents, 16
input columns and 4 entries, so at these shapes every loop runs several times with masked tails.
"""

from __future__ import annotations

import pytest
import torch

import saekit.kernels.triton_backend as backend
import saekit.kernels.triton_encode as triton_encode
import saekit.kernels.triton_sparse as triton_sparse
from saekit.kernels import eager
from saekit.kernels.triton_common import INTERPRETING

N, D, M = 21, 19, 53


def setup_module():
    assert INTERPRETING, "the Triton modules were imported without TRITON_INTERPRET=1"


def _params(n=N, d=D, m=M, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    x[[2, n - 1]] = 0  # all-zero rows: their pre-activations are the bias
    W_enc = torch.randn(m, d, generator=g) / d**0.5
    b_enc = torch.randn(m, generator=g) * 0.1
    W_dec = torch.randn(m, d, generator=g)
    return x, W_enc, b_enc, W_dec


def _assert_exact_topk(values, indices, x, W, b, k):
    """``values``/``indices`` are a true top-k of the float64 pre-activations, ReLU'd."""
    pre = x.double() @ W.double().T + b.double()  # (N, m)
    reference = pre.topk(k, dim=1).values  # descending
    chosen = pre.gather(1, indices)
    assert indices.min() >= 0 and indices.max() < W.shape[0]
    assert (indices.sort(1).values.diff(dim=1) > 0).all(), "a latent was selected twice"
    assert (chosen >= reference[:, -1:] - 1e-5).all(), "a selected latent is not in the top k"
    torch.testing.assert_close(values.double(), chosen.relu(), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------- TopK


@pytest.mark.parametrize(("k", "splits"), [(1, 1), (5, 2), (16, 4), (M, 1)])
def test_fused_topk_matches_eager_and_float64(k, splits, poisoned):
    x, W, b, _ = _params()
    with poisoned():
        values, indices = triton_encode.topk_fused(x, W, b, k, splits=splits)
    assert values.shape == indices.shape == (N, k)
    _assert_exact_topk(values, indices, x, W, b, k)
    eager_values, eager_indices, _, _ = eager.encode_topk(x, W, b, k)
    assert torch.equal(indices.sort(1).values, eager_indices.sort(1).values)
    torch.testing.assert_close(values.sort(1).values, eager_values.sort(1).values)


def test_fused_topk_with_half_precision_operands(poisoned):
    """The product runs in the weights' dtype (the inputs are cast to it), accumulated in fp32:
    the selection is the exact top-k of the rounded operands."""
    x, W, b, _ = _params(seed=1)
    W16 = W.half()
    with poisoned():
        values, indices = triton_encode.topk_fused(x, W16, b, 7, splits=2)
    assert values.dtype == torch.float32
    _assert_exact_topk(values, indices, x.half(), W16, b, 7)


def test_auxk_selects_among_dead_latents_only(poisoned):
    x, W, b, _ = _params(seed=2)
    dead = torch.tensor([0, 4, 9, 10, 30, 52])
    with poisoned():
        _, indices, aux_values, aux_indices = backend.encode_topk(x, W, b, 4, dead, 8)
    assert aux_values.shape == (N, 6), "k_aux is clipped to the number of dead latents"
    ref = eager.encode_topk(x, W, b, 4, dead, 8)
    assert torch.equal(indices.sort(1).values, ref[1].sort(1).values)
    assert torch.equal(aux_indices.sort(1).values, ref[3].sort(1).values)
    torch.testing.assert_close(aux_values.sort(1).values, ref[2].sort(1).values)
    assert set(aux_indices.unique().tolist()) == set(dead.tolist())


def test_batch_topk_matches_eager():
    x, W, b, _ = _params(seed=3)
    x[:3] *= 30  # loud rows own more than their first 4k candidates: the refinement must run
    ours = backend.encode_batch_topk(x, W, b, 2)
    ref = eager.encode_batch_topk(x, W, b, 2)
    assert torch.equal(ours[2], ref[2]), "same count per row"
    for row in range(N):
        span = slice(int(ref[2][row]), int(ref[2][row + 1]))
        assert torch.equal(ours[1][span].sort().values, ref[1][span].sort().values)
    torch.testing.assert_close(ours[0].sort().values, ref[0].sort().values)


def test_plain_topk_path_matches_eager(monkeypatch):
    monkeypatch.setenv("SAEKIT_ENCODER", "plain")
    x, W, b, _ = _params(seed=4)
    values, indices, _, _ = backend.encode_topk(x, W, b, 6)
    _assert_exact_topk(values, indices, x, W, b, 6)


# ------------------------------------------------------------------------------- JumpReLU


def _jumprelu_reference(x, W, b, theta, bandwidth):
    pre = x.double() @ W.double().T + b.double()
    tracked = pre > theta.double()
    if bandwidth is not None:
        tracked |= (pre - theta.double()).abs() < bandwidth / 2
    return pre, tracked


@pytest.mark.parametrize(("bandwidth", "splits", "capacity"), [(None, 1, 64), (0.3, 2, 2)])
def test_fused_jumprelu_matches_eager_and_float64(bandwidth, splits, capacity, poisoned):
    """``capacity=2`` overflows on every row: the host must rerun with the exact capacity."""
    x, W, b, _ = _params(seed=5)
    theta = torch.rand(M) * 0.6
    with poisoned():
        pre, indices, offsets = triton_encode.jumprelu_fused(
            x, W, b, theta, bandwidth, splits=splits, capacity=capacity
        )
    ref_pre, ref_indices, ref_offsets = eager.encode_jumprelu(x, W, b, theta, bandwidth)
    assert torch.equal(offsets, ref_offsets)
    assert torch.equal(indices, ref_indices), "same entries, sorted by row then latent"
    torch.testing.assert_close(pre, ref_pre)

    pre64, tracked = _jumprelu_reference(x, W, b, theta, bandwidth)
    rows, cols = tracked.nonzero(as_tuple=True)
    assert torch.equal(indices, cols)
    torch.testing.assert_close(pre.double(), pre64[rows, cols], atol=1e-5, rtol=1e-5)
    assert offsets[-1] > N * 2, "the test must track more entries than the first capacity"


def test_fused_jumprelu_with_nothing_tracked():
    x, W, b, _ = _params(seed=6)
    pre, indices, offsets = triton_encode.jumprelu_fused(x, W, b, torch.full((M,), 1e6), None)
    assert pre.numel() == indices.numel() == 0
    assert torch.equal(offsets, torch.zeros(N + 1, dtype=torch.long))


# ------------------------------------------------------------------------------- sparse ops


def _codes(kind: str, n=N, m=M, seed=7):
    """(values, indices, offsets, k) with duplicates in one row, zero values and empty rows."""
    g = torch.Generator().manual_seed(seed)
    if kind == "fixed":
        k = 6
        indices = torch.randint(0, m, (n, k), generator=g)
        indices[0] = 11  # one latent six times in one row
        values = torch.rand(n, k, generator=g) + 0.1
        values[1, :3] = 0  # slots whose pre-activation was negative
        values[4] = 0  # a row with no active latent
        offsets = torch.arange(0, n * k + 1, k)
        return values.reshape(-1), indices.reshape(-1), offsets, k
    counts = torch.randint(0, 9, (n,), generator=g)
    counts[[0, 5, n - 1]] = 0  # empty rows, first and last among them
    offsets = torch.zeros(n + 1, dtype=torch.long)
    torch.cumsum(counts, 0, out=offsets[1:])
    nnz = int(offsets[-1])
    indices = torch.randint(0, m, (nnz,), generator=g)
    values = torch.randn(nnz, generator=g)
    return values, indices, offsets, None


def _dense(values, indices, offsets, m=M):
    """(N, m) float64 dense codes; duplicates add up."""
    rows = triton_sparse.entry_rows(offsets, indices.numel())
    dense = torch.zeros(offsets.numel() - 1, m, dtype=torch.float64)
    return dense.index_put((rows, indices), values.double(), accumulate=True)


@pytest.mark.parametrize("kind", ["fixed", "variable"])
def test_sparse_decode_matches_eager_and_float64(kind, poisoned):
    values, indices, offsets, k = _codes(kind)
    _, _, _, W_dec = _params()
    with poisoned():
        out = backend.sparse_decode(values, indices, offsets, k, W_dec)
    torch.testing.assert_close(out, eager.sparse_decode(values, indices, offsets, k, W_dec))
    reference = _dense(values, indices, offsets) @ W_dec.double()
    torch.testing.assert_close(out.double(), reference, atol=1e-5, rtol=1e-5)
    empty_rows = offsets.diff() == 0
    assert (out[empty_rows] == 0).all()


@pytest.mark.parametrize("kind", ["fixed", "variable"])
@pytest.mark.parametrize("deterministic", [False, True])
def test_sparse_decode_backward_matches_autograd(kind, deterministic, poisoned):
    values, indices, offsets, k = _codes(kind, seed=8)
    _, _, _, W_dec = _params(seed=8)
    grad_out = torch.randn(N, D)
    with poisoned():
        grad_values = triton_sparse.gather_dots(grad_out, indices, offsets, W_dec)
        grad_W, _ = triton_sparse.scatter_rows(
            values, indices, offsets, grad_out, M, deterministic=deterministic
        )

    v64 = values.double().requires_grad_(True)
    W64 = W_dec.double().requires_grad_(True)
    out = _dense(v64, indices, offsets) @ W64
    (out * grad_out.double()).sum().backward()
    torch.testing.assert_close(grad_values.double(), v64.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad_W.double(), W64.grad, atol=1e-5, rtol=1e-5)

    eager_grads = eager.sparse_decode_backward(grad_out, values, indices, offsets, k, W_dec)
    torch.testing.assert_close(grad_values, eager_grads[0])
    torch.testing.assert_close(grad_W, eager_grads[1])
    untouched = torch.ones(M, dtype=torch.bool)
    untouched[indices[values != 0]] = False
    assert (grad_W[untouched] == 0).all()


def test_deterministic_scatter_is_bitwise_repeatable():
    values, indices, offsets, _ = _codes("variable", seed=9)
    source = torch.randn(N, D)
    first = triton_sparse.scatter_rows(
        values, indices, offsets, source, M, with_bias=True, deterministic=True
    )
    again = triton_sparse.scatter_rows(
        values, indices, offsets, source, M, with_bias=True, deterministic=True
    )
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


@pytest.mark.parametrize("deterministic", [False, True])
def test_sparse_encode_backward_matches_autograd(deterministic, poisoned):
    x, W, b, _ = _params(seed=10)
    _, indices, offsets, _ = _codes("variable", seed=10)
    grad_pre = torch.randn(indices.numel())
    grad_pre[::5] = 0
    with poisoned():
        grad_W, grad_b = triton_sparse.scatter_rows(
            grad_pre, indices, offsets, x, M, with_bias=True, deterministic=deterministic
        )
        grad_x = triton_sparse.gather_rows(grad_pre, indices, offsets, W)

    x64, W64, b64 = (t.double().requires_grad_(True) for t in (x, W, b))
    rows = triton_sparse.entry_rows(offsets, indices.numel())
    pre = (x64[rows] * W64[indices]).sum(1) + b64[indices]  # the selected entries only
    (pre * grad_pre.double()).sum().backward()
    for ours, ref in [(grad_x, x64.grad), (grad_W, W64.grad), (grad_b, b64.grad)]:
        torch.testing.assert_close(ours.double(), ref, atol=1e-5, rtol=1e-5)

    eager_grads = eager.sparse_encode_backward(grad_pre, indices, offsets, None, x, W)
    for ours, ref in zip((grad_x, grad_W, grad_b), eager_grads, strict=True):
        torch.testing.assert_close(ours, ref)


def test_sparse_encode_backward_skips_the_input_gradient_when_not_needed():
    x, W, _, _ = _params(seed=11)
    _, indices, offsets, _ = _codes("variable", seed=11)
    grad_pre = torch.randn(indices.numel())
    grad_x, grad_W, grad_b = backend.sparse_encode_backward(
        grad_pre, indices, offsets, None, x, W, need_input_grad=False
    )
    assert grad_x is None
    ref = eager.sparse_encode_backward(grad_pre, indices, offsets, None, x, W)
    torch.testing.assert_close(grad_W, ref[1])
    torch.testing.assert_close(grad_b, ref[2])


@pytest.mark.parametrize("deterministic", [False, True])
def test_jumprelu_backward_matches_eager(deterministic, poisoned):
    g = torch.Generator().manual_seed(12)
    theta = torch.rand(M, generator=g) * 0.5 + 0.1
    _, indices, _, _ = _codes("variable", seed=12)
    bandwidth = 0.2
    # Half the entries sit inside the rectangle kernel's support, half well outside it.
    offset = (torch.rand(indices.numel(), generator=g) - 0.5) * bandwidth * 0.9
    offset[::2] = torch.randn(offset[::2].shape, generator=g).abs() + bandwidth
    pre = theta[indices] + offset * torch.where(torch.arange(indices.numel()) % 4 < 2, 1, -1)
    grad_values = torch.randn(indices.numel(), generator=g)
    grad_l0 = torch.tensor(0.37)
    with poisoned():
        grad_pre, grad_theta = triton_sparse.jumprelu_backward(
            grad_values, grad_l0, pre, indices, theta, bandwidth, deterministic=deterministic
        )
    ref_pre, ref_theta = eager.jumprelu_backward(
        grad_values, grad_l0, pre, indices, theta, bandwidth
    )
    torch.testing.assert_close(grad_pre, ref_pre)
    torch.testing.assert_close(grad_theta, ref_theta)
    assert (grad_theta != 0).sum() > 5, "the test must put entries inside the kernel's support"
    no_theta = triton_sparse.jumprelu_backward(
        grad_values, grad_l0, pre, indices, theta, bandwidth, need_threshold_grad=False
    )
    assert no_theta[1] is None
    torch.testing.assert_close(no_theta[0], ref_pre)
