"""The autograd wrappers and a whole training run on the Triton kernels (interpreted, forced onto
CPU tensors) against the same on the eager kernels."""

from __future__ import annotations

import pytest
import torch

import saekit.kernels.triton_backend as triton_backend
from saekit.dictionaries import SAEConfig
from saekit.kernels import batch_topk_encode, jumprelu_encode, sparse_decode, topk_encode
from saekit.kernels.dispatch import backend_for, force_backend
from saekit.sources import ArraySource
from saekit.synthetic import make_sparse_dataset
from saekit.training import TrainConfig, Trainer

N, D, M = 21, 19, 53
STEPS = 8


def _leaves(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g)
    W_enc = torch.randn(M, D, generator=g) / D**0.5
    b_enc = torch.randn(M, generator=g) * 0.1
    W_dec = torch.randn(M, D, generator=g) / D**0.5
    return [t.requires_grad_(True) for t in (x, W_enc, b_enc, W_dec)]


def _grads_both_ways(loss_fn, seed=0):
    """Gradients of ``loss_fn(x, W_enc, b_enc, W_dec)`` on the eager and the Triton kernels."""
    results = []
    for use_triton in (False, True):
        leaves = _leaves(seed)
        if use_triton:
            with force_backend(triton_backend):
                assert backend_for(leaves[0]) is triton_backend
                loss = loss_fn(*leaves)
                loss.backward()
        else:
            assert backend_for(leaves[0]).__name__.endswith("eager")
            loss = loss_fn(*leaves)
            loss.backward()
        results.append((loss.detach(), [t.grad for t in leaves]))
    return results


def test_topk_and_auxk_gradients_match_eager():
    dead = torch.tensor([1, 5, 8, 13, 21, 34, 52])
    target = torch.randn(N, D, generator=torch.Generator().manual_seed(1))

    def loss_fn(x, W_enc, b_enc, W_dec):
        codes, aux = topk_encode(x, W_enc, b_enc, 4, dead, 5)
        recon = sparse_decode(codes, W_dec)
        auxk = sparse_decode(aux, W_dec)
        return (recon - target).pow(2).sum() + (auxk - (target - recon).detach()).pow(2).sum()

    (eager_loss, eager_grads), (loss, grads) = _grads_both_ways(loss_fn)
    torch.testing.assert_close(loss, eager_loss)
    for ours, ref in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_auxk_alone_trains_the_encoder():
    """The AuxK term's gradient reaches W_enc and b_enc (not only W_dec), on the dead rows."""
    dead = torch.tensor([2, 3, 30, 40, 50])
    target = torch.randn(N, D, generator=torch.Generator().manual_seed(2))

    def aux_only(x, W_enc, b_enc, W_dec):
        _, aux = topk_encode(x, W_enc, b_enc, 4, dead, 3)
        return (sparse_decode(aux, W_dec) - target).pow(2).sum()

    (_, eager_grads), (_, grads) = _grads_both_ways(aux_only, seed=3)
    _, grad_W_enc, grad_b_enc, grad_W_dec = grads
    assert grad_W_enc[dead].abs().sum() > 0 and grad_b_enc[dead].abs().sum() > 0
    live = torch.ones(M, dtype=torch.bool)
    live[dead] = False
    assert (grad_W_enc[live] == 0).all() and (grad_W_dec[live] == 0).all()
    for ours, ref in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_batch_topk_gradients_match_eager():
    def loss_fn(x, W_enc, b_enc, W_dec):
        codes, aux = batch_topk_encode(x, W_enc, b_enc, 3, torch.tensor([0, 7, 9]), 2)
        return sparse_decode(codes, W_dec).pow(2).sum() + sparse_decode(aux, W_dec).sum()

    (eager_loss, eager_grads), (loss, grads) = _grads_both_ways(loss_fn, seed=4)
    torch.testing.assert_close(loss, eager_loss)
    for ours, ref in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_jumprelu_gradients_match_eager():
    thresholds = []

    def loss_fn(x, W_enc, b_enc, W_dec):
        theta = torch.linspace(0.05, 0.6, M).requires_grad_(True)
        thresholds.append(theta)
        codes, l0 = jumprelu_encode(x, W_enc, b_enc, theta, 0.3)
        return sparse_decode(codes, W_dec).pow(2).sum() + 0.37 * l0

    (eager_loss, eager_grads), (loss, grads) = _grads_both_ways(loss_fn, seed=5)
    torch.testing.assert_close(loss, eager_loss)
    for ours, ref in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    eager_theta, theta = thresholds
    assert theta.grad is not None and (theta.grad != 0).sum() > 3
    torch.testing.assert_close(theta.grad, eager_theta.grad, atol=1e-4, rtol=1e-4)


def _train(data, use_triton: bool):
    source = ArraySource(data.activations, 16, epochs=1, seed=0)
    train = TrainConfig(
        batch_size=16,
        max_steps=STEPS,
        lr=3e-3,
        # Adam turns any gradient far above eps into a step of about lr, so with the default
        # eps a latent whose gradient is rounding noise (~1e-8) moves by lr either way. A
        # larger eps keeps this test about the kernels, not about the sign of such noise.
        adam_eps=1e-6,
        lr_warmup_steps=2,
        dead_tokens=32,  # latents die within the run, so AuxK takes part
        auxk_alpha=0.5,
        k_aux=4,
        sparsity_warmup_steps=2,
        device="cpu",
        log_every=4,
        checkpoint_every=0,
        progress=False,
    )
    configs = [
        SAEConfig(architecture="topk", k=2, d_sae=40),
        SAEConfig(architecture="batchtopk", k=2, d_sae=40),
        SAEConfig(architecture="jumprelu", d_sae=40),
    ]
    trainer = Trainer(configs, train, source)
    if use_triton:
        with force_backend(triton_backend):
            return trainer.fit()
    return trainer.fit()


@pytest.mark.timeout(300)
def test_training_on_triton_kernels_gives_the_eager_dictionary():
    data = make_sparse_dataset(STEPS * 16, 12, 30, 2, seed=0)
    eager_results = _train(data, use_triton=False)
    triton_results = _train(data, use_triton=True)
    for ref, ours in zip(eager_results, triton_results, strict=True):
        assert ours.name == ref.name
        assert ours.metrics["step"] == ref.metrics["step"] == STEPS
        if ours.sae.cfg.architecture == "topk":
            assert "auxk" in ours.metrics, "AuxK must have run in this test"
        for key, value in ref.sae.state_dict().items():
            torch.testing.assert_close(ours.sae.state_dict()[key], value, atol=5e-5, rtol=1e-4)
        assert ours.metrics["fvu"] == pytest.approx(ref.metrics["fvu"], rel=1e-3, abs=1e-5)
