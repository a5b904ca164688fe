"""Where the time of one TopK training step goes on this machine (the bench_train.py shape).

Times each part of the step separately, in the order the trainer runs them, and prints one JSON
line per part plus the total: milliseconds per step and share of the step.

    python scripts/profile_train_step.py [--steps 20]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections import defaultdict

import torch

from saekit._malloc import keep_large_allocations_in_heap
from saekit.dictionaries import SAEConfig, StepContext, build_dictionary
from saekit.kernels import eager
from saekit.synthetic import make_sparse_dataset
from saekit.training import TrainConfig
from saekit.training.trainer import _make_optimizer

ENCODE = "encoder: dense product + top-k (fused, chunked)"
DECODE = "decoder: sparse gather (forward)"
DECODE_BACKWARD = "decoder backward: k dot products + scatter into W_dec"
ENCODE_BACKWARD = "encoder backward: scatter into W_enc, b_enc; input grad"
WHOLE = "whole step (forward, backward, clip, Adam, renorm)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    keep_large_allocations_in_heap()
    n, d, m, k = 4096, 256, 4096, 8
    data = make_sparse_dataset(2**16, d, m, k, seed=0).activations
    sae = build_dictionary(SAEConfig(k=k, d_sae=m).resolved(d))
    optimizer = _make_optimizer(list(sae.parameters()), 4e-4, TrainConfig())
    ctx = StepContext(k_aux=d // 2, auxk_alpha=1 / 32)
    totals: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def timer(name: str):
        start = time.perf_counter()
        yield
        totals[name] += time.perf_counter() - start

    offsets = torch.arange(0, n * k + 1, k)
    for step in range(args.steps + 2):
        if step == 2:
            totals.clear()  # warm-up steps are not counted
        with timer("data: gather a shuffled batch"):
            x = data[torch.randint(0, data.shape[0], (n,))]
        x_c = (x - sae.b_dec).detach()
        W_enc, b_enc, W_dec = sae.W_enc.detach(), sae.b_enc.detach(), sae.W_dec.detach()
        # The kernels, called on their own to attribute the time...
        with timer(ENCODE):
            values, indices, _, _ = eager.encode_topk(x_c, W_enc, b_enc, k)
        values, indices = values.view(-1), indices.view(-1)
        with timer(DECODE):
            eager.sparse_decode(values, indices, offsets, k, W_dec)
        grad = torch.randn(n, d)
        with timer(DECODE_BACKWARD):
            eager.sparse_decode_backward(grad, values, indices, offsets, k, W_dec)
        with timer(ENCODE_BACKWARD):
            eager.sparse_encode_backward(values, indices, offsets, k, x_c, W_enc)
        # ... and the whole step, to measure what surrounds them.
        with timer(WHOLE):
            out = sae.training_forward(x, ctx)
            out.loss.backward()
            sae.remove_gradient_parallel_to_decoder_directions()
            torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sae.after_optimizer_step()

    steps = args.steps
    whole = totals[WHOLE] / steps
    kernel_parts = [ENCODE, DECODE, DECODE_BACKWARD, ENCODE_BACKWARD]
    kernels = sum(totals[p] for p in kernel_parts) / steps
    for part, seconds in totals.items():
        ms = 1000 * seconds / steps
        print(
            json.dumps(
                {
                    "part": part,
                    "ms_per_step": round(ms, 2),
                    "share_of_step": round(ms / (1000 * whole), 3),
                }
            )
        )
    other = whole - kernels
    print(
        json.dumps(
            {
                "part": "loss, autograd bookkeeping, clip, Adam, renorm",
                "ms_per_step": round(1000 * other, 2),
                "share_of_step": round(other / whole, 3),
            }
        )
    )
    print(
        json.dumps({"tokens_per_s_step_only": round(n / whole), "threads": torch.get_num_threads()})
    )


if __name__ == "__main__":
    main()
