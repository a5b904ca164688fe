"""Training throughput benchmark (issue: core training).

Trains TopK on 2^20 synthetic rows of d_in=256 built from 4096 known sparse features (8 per row),
with 4096 latents, k=8 and batch 4096, and prints one JSON line: tokens/s, explained variance,
dead fraction, feature recovery. Runs on CUDA when available (``--device``).

Where it can, the same configuration runs with EleutherAI sparsify and SAELens (if installed) on
the same data, and their figures print as further JSON lines, so the comparison is side by side.

    python scripts/bench_train.py [--rows 1048576] [--device cpu] [--compare]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from saekit._malloc import keep_large_allocations_in_heap
from saekit.dictionaries import SAEConfig
from saekit.sources import ArraySource
from saekit.synthetic import make_sparse_dataset, mean_max_cosine
from saekit.training import TrainConfig, Trainer


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def explained_variance(reconstruct, x: torch.Tensor) -> float:
    """1 - FVU of ``reconstruct`` on held-out rows, the same measure for every library."""
    with torch.no_grad():
        recon = reconstruct(x)
    return round(1 - ((x - recon).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item(), 4)


def bench_saekit(data, heldout, args) -> dict:
    source = ArraySource(data.activations, args.batch_size, epochs=args.epochs, seed=0)
    train = TrainConfig(
        batch_size=args.batch_size,
        epochs=args.epochs,
        lr_warmup_steps=20,
        log_every=10_000,
        checkpoint_every=0,
        progress=False,
        device=args.device,
        autocast=args.device != "cpu",
    )
    cfg = SAEConfig(architecture="topk", k=args.k, d_sae=args.latents)
    trainer = Trainer([cfg], train, source)
    # The other libraries build their optimizers before their clocks start; building the first
    # Adam imports torch._dynamo (~2 s once per process), which is not training time.
    torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], fused=True)
    start = time.perf_counter()
    (result,) = trainer.fit()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return {
        "library": "saekit",
        "tokens_per_s": round(trainer.tokens / elapsed),
        "explained_variance": explained_variance(result.sae, heldout),
        "dead_fraction": result.metrics["dead_fraction"],
        "feature_recovery_mmcs": round(
            mean_max_cosine(result.sae.W_dec.detach(), data.features), 4
        ),
        "seconds": round(elapsed, 2),
    }


def bench_sparsify(data, heldout, args) -> dict | None:
    """EleutherAI sparsify's SparseCoder driven by a minimal loop mirroring its trainer."""
    if args.device == "cpu":  # its Triton decoder is picked whenever triton imports, GPU or not
        os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
    try:
        from sparsify import SparseCoder, SparseCoderConfig
    except ImportError:
        return None
    device = torch.device(args.device)
    x_all = data.activations
    sae = SparseCoder(
        x_all.shape[1], SparseCoderConfig(num_latents=args.latents, k=args.k), device=device
    )
    opt = torch.optim.Adam(sae.parameters(), lr=2e-4 / (args.latents / 2**14) ** 0.5)
    start = time.perf_counter()
    tokens = 0
    for epoch in range(args.epochs):
        order = torch.randperm(x_all.shape[0], generator=torch.Generator().manual_seed(epoch))
        for i in range(0, x_all.shape[0], args.batch_size):
            x = x_all[order[i : i + args.batch_size]].to(device)
            out = sae(x)
            out.fvu.backward()
            sae.remove_gradient_parallel_to_decoder_directions()
            opt.step()
            opt.zero_grad()
            sae.set_decoder_norm_to_unit_norm()
            tokens += x.shape[0]
    elapsed = time.perf_counter() - start
    return {
        "library": "eai-sparsify",
        "tokens_per_s": round(tokens / elapsed),
        "explained_variance": explained_variance(
            lambda x: sae(x.to(device)).sae_out.cpu(), heldout
        ),
        "feature_recovery_mmcs": round(mean_max_cosine(sae.W_dec.detach().cpu(), data.features), 4),
        "seconds": round(elapsed, 2),
    }


def bench_saelens(data, heldout, args) -> dict | None:
    """SAELens's TopK training SAE driven by the same minimal loop (its runner needs a model)."""
    try:
        from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
        from sae_lens.saes.sae import TrainStepInput
    except ImportError:
        return None
    device = torch.device(args.device)
    d = data.activations.shape[1]
    cfg = TopKTrainingSAEConfig(d_in=d, d_sae=args.latents, k=args.k, device=str(device))
    sae = TopKTrainingSAE(cfg)
    sae.b_dec.data = data.activations[:4096].mean(0).to(device)
    opt = torch.optim.Adam(sae.parameters(), lr=2e-4 / (args.latents / 2**14) ** 0.5)
    start = time.perf_counter()
    tokens = 0
    for epoch in range(args.epochs):
        order = torch.randperm(
            data.activations.shape[0], generator=torch.Generator().manual_seed(epoch)
        )
        for i in range(0, data.activations.shape[0], args.batch_size):
            x = data.activations[order[i : i + args.batch_size]].to(device)
            out = sae.training_forward_pass(
                TrainStepInput(
                    sae_in=x,
                    coefficients={},
                    dead_neuron_mask=None,
                    n_training_steps=0,
                    is_logging_step=False,
                )
            )
            out.loss.backward()
            opt.step()
            opt.zero_grad()
            tokens += x.shape[0]
    elapsed = time.perf_counter() - start
    return {
        "library": "sae-lens",
        "tokens_per_s": round(tokens / elapsed),
        "explained_variance": explained_variance(lambda x: sae(x.to(device)).cpu(), heldout),
        "feature_recovery_mmcs": round(mean_max_cosine(sae.W_dec.detach().cpu(), data.features), 4),
        "seconds": round(elapsed, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=2**20)
    parser.add_argument("--d_in", type=int, default=256)
    parser.add_argument("--latents", type=int, default=4096)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--batch_size", type=int, default=4096)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--compare", action="store_true", help="also run sparsify and SAELens when installed"
    )
    args = parser.parse_args()
    keep_large_allocations_in_heap()  # as `saekit train` does on CPU

    data = make_sparse_dataset(args.rows, args.d_in, args.latents, args.k, seed=0)
    heldout = make_sparse_dataset(
        16384, args.d_in, args.latents, args.k, seed=1, features=data.features
    ).activations
    shape = {
        "rows": args.rows,
        "d_in": args.d_in,
        "latents": args.latents,
        "k": args.k,
        "batch": args.batch_size,
    }
    results = [bench_saekit(data, heldout, args)]
    if args.compare:
        results += [
            r
            for r in (bench_sparsify(data, heldout, args), bench_saelens(data, heldout, args))
            if r
        ]
    for r in results:
        print(
            json.dumps(
                {"benchmark": "train_topk", "device": machine(), "dtype": "float32", **shape, **r}
            )
        )


if __name__ == "__main__":
    main()
