"""Training benchmark: speed and learning per step, saekit beside the peers, on ground truth.

Every library trains a TopK dictionary on the same batches in the same order (one
:class:`~saekit.sources.ArraySource`, or one activation cache on disk with ``--feed cache``),
with the same batch size, number of steps and learning rate (``2e-4 / sqrt(m / 2^14)``, Gao et
al. 2024). saekit runs ``Trainer`` with its defaults, as ``saekit train`` does; eai-sparsify and
SAELens run minimal loops that mirror their trainers (their runners need a model). One JSON line
per run.

On the CPU (default) the data are ground-truth sets of known unit features (saekit.synthetic),
evaluated on held-out rows of the same features:

- ``a``: d_in = 256, 4096 features, 8 active per row, uniform frequencies; 4096 latents, k = 8;
- ``b``: d_in = 128, 1536 features, 5 active per row, Zipf(0.7) frequencies; 2048 latents, k = 5.

Learning is measured as explained variance on held-out rows, feature recovery as the mean max
cosine of each true feature with the decoder rows (MMCS; Sharkey et al. 2022) and as the mean
cosine after a one-to-one matching of true features to latents (Hungarian algorithm; a latent
counts once, so duplicates do not help), and dead latents as the fraction that fire on none of
65,536 held-out rows.

On a GPU, ``--shape 768`` (d = 768, m = 24576, k = 32) and ``--shape 4096`` (d = 4096,
m = 131072, k = 64) time N = 16384-row steps on a pool of synthetic rows kept on the device
(``--feed array``) or read from a bf16 cache on local disk (``--feed cache``); ``saekit-bare``
is saekit's dictionary in a minimal loop, so the Trainer's own overhead is the difference. Every
library trains under bf16 autocast with float32 master weights there, as sparsify's trainer
does; compile and autotune time (the first steps, on a throwaway copy) is reported apart from
the timed steps.

    python scripts/bench_train.py --compare                      # CPU: sets a and b, 1 and 4 epochs
    python scripts/bench_train.py --compare --shape 768 --shape 4096 --feed array --feed cache
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from saekit._malloc import keep_large_allocations_in_heap
from saekit.dictionaries import SAEConfig, build_dictionary
from saekit.dictionaries.base import StepContext
from saekit.sources import ArraySource
from saekit.synthetic import make_sparse_dataset, mean_max_cosine
from saekit.training import TrainConfig, Trainer


@dataclass(frozen=True)
class Setting:
    """A dataset and the dictionary trained on it."""

    d_in: int
    n_features: int
    active: int
    """Features per row."""
    zipf: float
    """Feature frequencies fall as rank^-zipf (0: uniform)."""
    latents: int
    k: int


DATASETS = {
    "a": Setting(d_in=256, n_features=4096, active=8, zipf=0.0, latents=4096, k=8),
    "b": Setting(d_in=128, n_features=1536, active=5, zipf=0.7, latents=2048, k=5),
}
GPU_SHAPES = {
    "768": Setting(d_in=768, n_features=24576, active=32, zipf=0.0, latents=24576, k=32),
    "4096": Setting(d_in=4096, n_features=131072, active=64, zipf=0.0, latents=131072, k=64),
    "smoke": Setting(d_in=64, n_features=512, active=8, zipf=0.0, latents=512, k=8),  # any device
}
HELDOUT_ROWS = 65536


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def synchronize(device: torch.device) -> None:
    """Device work is asynchronous: every clock stops only after the device is done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(loop: Callable[[int], Any], warmup_steps: int, steps: int, device: torch.device):
    """``loop(steps)``'s result, its seconds, and the seconds of a throwaway ``loop(warmup_steps)``
    run first (compilation, autotuning, first-call imports), each clock stopped after the device
    is done."""
    start = time.perf_counter()
    loop(warmup_steps)
    synchronize(device)
    warmup = time.perf_counter() - start
    start = time.perf_counter()
    result = loop(steps)
    synchronize(device)
    return result, time.perf_counter() - start, warmup


def learning_rate(latents: int) -> float:
    return 2e-4 / math.sqrt(latents / 2**14)


# ---------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(
    reconstruct: Callable[[Tensor], Tensor],
    active_latents: Callable[[Tensor], Tensor],
    decoder: Tensor,
    heldout: Tensor,
    features: Tensor | None,
) -> dict:
    """Held-out explained variance, feature recovery and dead latents, the same for every
    library. ``active_latents(x)`` gives the ids of the latents that fire on rows ``x``."""
    fired = torch.zeros(decoder.shape[0], dtype=torch.bool, device=decoder.device)
    sse = total = 0.0
    mean = heldout.mean(0)
    for rows in heldout.split(4096):
        recon = reconstruct(rows).float()
        sse += (rows - recon).pow(2).sum().item()
        total += (rows - mean).pow(2).sum().item()
        fired[active_latents(rows).flatten()] = True
    record = {
        "explained_variance": round(1 - sse / total, 4),
        "dead_fraction": round(1 - fired.float().mean().item(), 4),
    }
    if features is not None and features.shape[0] <= 8192:
        learned = decoder.detach().float().cpu()
        record["feature_recovery_mmcs"] = round(mean_max_cosine(learned, features.cpu()), 4)
        record["feature_recovery_matched"] = matched_recovery(learned, features.cpu())
    return record


def matched_recovery(learned: Tensor, truth: Tensor) -> float:
    """Mean cosine of each true feature with its latent under the best one-to-one matching."""
    similarity = (F.normalize(truth.float(), dim=1) @ F.normalize(learned.float(), dim=1).T).numpy()
    rows, cols = linear_sum_assignment(similarity, maximize=True)
    return round(float(similarity[rows, cols].sum() / truth.shape[0]), 4)


# ---------------------------------------------------------------------------- data feeds


class Feed:
    """The batches every library trains on: a fresh iterator of the same order each time."""

    def __init__(self, make: Callable[[], Iterable[Tensor]], label: str) -> None:
        self.make = make
        self.label = label

    def source(self) -> Iterable[Tensor]:
        return self.make()


def array_feed(data: Tensor, batch: int, epochs: int) -> Feed:
    return Feed(lambda: ArraySource(data, batch, epochs=epochs, seed=0), "array")


def cache_feed(data: Tensor, batch: int, epochs: int, directory: Path) -> Feed:
    """Writes ``data`` through saekit's cache writer once (bf16 shards), then reads it back."""
    from torch import nn

    from saekit.adapters import CustomAdapter
    from saekit.cache import CacheConfig, cache_activations, open_training_source

    class Rows(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rows = nn.Identity()

        def forward(self, x: Tensor) -> Tensor:
            return self.rows(x)

    shutil.rmtree(directory, ignore_errors=True)
    cfg = CacheConfig(
        hookpoints=["rows"],
        output_dir=str(directory),
        batch_size=4096,
        dtype="bfloat16",
        rows_per_shard=65536,
        progress=False,
    )
    cache_activations(CustomAdapter(Rows().eval()), data.cpu(), cfg)
    return Feed(
        lambda: open_training_source(directory, batch_size=batch, epochs=epochs, seed=0), "cache"
    )


def on_device(batches: Iterable[Tensor], device: torch.device) -> Iterator[Tensor]:
    for x in batches:
        yield x.to(device, torch.float32, non_blocking=True)


# ---------------------------------------------------------------------------- libraries


def run_saekit(feed: Feed, setting: Setting, args, device: torch.device, steps: int):
    """saekit's Trainer with its defaults (``saekit train``)."""

    def trainer(max_steps: int) -> Trainer:
        train = TrainConfig(
            batch_size=args.batch_size,
            epochs=args.epochs_now,
            max_steps=max_steps,
            lr=learning_rate(setting.latents),
            log_every=args.log_every,
            checkpoint_every=0,
            progress=False,
            device=str(device),
            dead_tokens=args.dead_tokens or TrainConfig.dead_tokens,
            **args.train_options,
        )
        cfg = SAEConfig(architecture="topk", k=setting.k, d_sae=setting.latents)
        return Trainer([cfg], train, feed.source())

    def loop(n: int) -> tuple[Trainer, list]:
        run = trainer(n)
        return run, run.fit()

    # The warm-up run compiles, autotunes and builds the first Adam (torch._dynamo's import).
    (run, (result,)), elapsed, warmup = timed(loop, args.warmup_steps, steps, device)
    sae = result.sae

    def active(x: Tensor) -> Tensor:
        codes = sae.encode(x)
        return codes.indices[codes.values > 0]

    return run.tokens, run.step, elapsed, warmup, sae, sae.W_dec, active


def run_saekit_bare(feed: Feed, setting: Setting, args, device: torch.device, steps: int):
    """saekit's dictionary and kernels in a minimal loop: the Trainer's overhead is the rest."""
    cfg = SAEConfig(
        architecture="topk", k=setting.k, d_sae=setting.latents, d_in=setting.d_in
    ).resolved(setting.d_in)

    def loop(n: int):
        sae = build_dictionary(cfg, device=device)
        opt = torch.optim.Adam(sae.parameters(), lr=learning_rate(setting.latents), fused=True)
        ctx = StepContext()
        tokens = done = 0
        for x in on_device(feed.source(), device):
            if done >= n:
                break
            with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                out = sae.training_forward(x, ctx)
            out.loss.backward()
            sae.remove_gradient_parallel_to_decoder_directions()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sae.after_optimizer_step()
            tokens += x.shape[0]
            done += 1
        return sae, tokens, done

    (sae, tokens, done), elapsed, warmup = timed(loop, args.warmup_steps, steps, device)

    def active(x: Tensor) -> Tensor:
        codes = sae.encode(x)
        return codes.indices[codes.values > 0]

    return tokens, done, elapsed, warmup, sae, sae.W_dec, active


def run_sparsify(feed: Feed, setting: Setting, args, device: torch.device, steps: int):
    """EleutherAI sparsify's SparseCoder in a loop mirroring its trainer (bf16 autocast on GPU)."""
    if device.type == "cpu":  # its Triton decoder is picked whenever triton imports, GPU or not
        os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
    from sparsify import SparseCoder, SparseCoderConfig

    def loop(n: int):
        sae = SparseCoder(
            setting.d_in, SparseCoderConfig(num_latents=setting.latents, k=setting.k), device=device
        )
        opt = torch.optim.Adam(sae.parameters(), lr=learning_rate(setting.latents))
        tokens = done = 0
        for x in on_device(feed.source(), device):
            if done >= n:
                break
            with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                out = sae(x)
            out.fvu.backward()
            sae.remove_gradient_parallel_to_decoder_directions()
            opt.step()
            opt.zero_grad()
            sae.set_decoder_norm_to_unit_norm()
            tokens += x.shape[0]
            done += 1
        return sae, tokens, done

    (sae, tokens, done), elapsed, warmup = timed(loop, args.warmup_steps, steps, device)

    def reconstruct(x: Tensor) -> Tensor:
        return sae(x).sae_out

    def active(x: Tensor) -> Tensor:
        codes = sae.encode(x)
        return codes.top_indices[codes.top_acts > 0]

    return tokens, done, elapsed, warmup, reconstruct, sae.W_dec, active


def run_saelens(feed: Feed, setting: Setting, args, device: torch.device, steps: int):
    """SAELens's TopK training SAE driven by the same minimal loop (its runner needs a model)."""
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.saes.sae import TrainStepInput

    def loop(n: int):
        cfg = TopKTrainingSAEConfig(
            d_in=setting.d_in, d_sae=setting.latents, k=setting.k, device=str(device)
        )
        sae = TopKTrainingSAE(cfg)
        opt = torch.optim.Adam(sae.parameters(), lr=learning_rate(setting.latents))
        tokens = done = 0
        for x in on_device(feed.source(), device):
            if done >= n:
                break
            if done == 0:
                sae.b_dec.data = x.mean(0)
            with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                out = sae.training_forward_pass(
                    TrainStepInput(
                        sae_in=x,
                        coefficients={},
                        dead_neuron_mask=None,
                        n_training_steps=done,
                        is_logging_step=False,
                    )
                )
            out.loss.backward()
            opt.step()
            opt.zero_grad()
            tokens += x.shape[0]
            done += 1
        return sae, tokens, done

    (sae, tokens, done), elapsed, warmup = timed(loop, args.warmup_steps, steps, device)

    def active(x: Tensor) -> Tensor:
        return sae.encode(x).nonzero()[:, 1]

    return tokens, done, elapsed, warmup, sae, sae.W_dec, active


LIBRARIES = {
    "saekit": run_saekit,
    "saekit-bare": run_saekit_bare,
    "eai-sparsify": run_sparsify,
    "sae-lens": run_saelens,
}


# ---------------------------------------------------------------------------- driver


def dataset(setting: Setting, rows: int, device: torch.device, seed: int = 0):
    """Rows of a ground-truth set on ``device`` and the held-out rows of the same features."""
    data = make_sparse_dataset(
        rows,
        setting.d_in,
        setting.n_features,
        setting.active,
        zipf_exponent=setting.zipf,
        seed=seed,
        device=device,
    )
    heldout = make_sparse_dataset(
        HELDOUT_ROWS,
        setting.d_in,
        setting.n_features,
        setting.active,
        zipf_exponent=setting.zipf,
        seed=seed + 1,
        features=data.features,
        device=device,
    )
    return data.activations, heldout.activations, data.features


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def bench(name: str, setting: Setting, feed: Feed, heldout, features, args, device) -> None:
    steps = args.steps or -(-args.rows // args.batch_size) * args.epochs_now
    for library in args.libraries:
        base = {
            "benchmark": "train_topk",
            "dataset": name,
            "feed": feed.label,
            "library": library,
            "epochs": args.epochs_now if not args.steps else None,
            "d_in": setting.d_in,
            "latents": setting.latents,
            "k": setting.k,
            "batch": args.batch_size,
            "lr": learning_rate(setting.latents),
            "dtype": "bfloat16 autocast, float32 weights" if device.type == "cuda" else "float32",
            "device": machine(device),
            "date": date.today().isoformat(),
        }
        if library == "saekit":
            base["dead_tokens"] = args.dead_tokens or TrainConfig.dead_tokens
            if args.train_options:
                base["train_options"] = args.train_options
        try:
            tokens, done, elapsed, warmup, reconstruct, decoder, active = LIBRARIES[library](
                feed, setting, args, device, steps
            )
        except ImportError as error:
            emit({**base, "skipped": f"not installed: {error}"})
            continue
        emit(
            {
                **base,
                "steps": done,
                "tokens_per_s": round(tokens / elapsed),
                "seconds": round(elapsed, 2),
                "compile_and_warmup_seconds": round(warmup, 2),
                **evaluate(reconstruct, active, decoder, heldout, features),
            }
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", action="append", choices=sorted(DATASETS), default=None)
    parser.add_argument("--shape", action="append", choices=sorted(GPU_SHAPES), default=None)
    parser.add_argument("--epochs", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--rows", type=int, default=None, help="default 2^20 (CPU), 2^18 (GPU)")
    parser.add_argument("--steps", type=int, default=0, help="fixed steps instead of epochs")
    parser.add_argument("--batch_size", type=int, default=None, help="4096 (CPU), 16384 (GPU)")
    parser.add_argument("--feed", action="append", choices=["array", "cache"], default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup_steps", type=int, default=3)
    parser.add_argument("--log_every", type=int, default=50)
    parser.add_argument("--dead_tokens", type=int, default=0, help="saekit's; 0 = its default")
    parser.add_argument(
        "--library", action="append", choices=sorted(LIBRARIES), dest="libraries", default=None
    )
    parser.add_argument(
        "--compare", action="store_true", help="run eai-sparsify and SAELens too (if installed)"
    )
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument(
        "--train",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a TrainConfig default for saekit (ablations), e.g. latent_init=random",
    )
    args = parser.parse_args()
    args.train_options = {k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in args.train)}
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_large_allocations_in_heap()  # as `saekit train` does on CPU
    gpu = args.shape is not None
    if args.libraries is None:
        args.libraries = ["saekit"] + (["saekit-bare"] if gpu else [])
        args.libraries += ["eai-sparsify", "sae-lens"] if args.compare else []
    args.batch_size = args.batch_size or (16384 if gpu else 4096)
    args.rows = args.rows or (2**18 if gpu else 2**20)
    settings = (
        {f"gpu-{s}": GPU_SHAPES[s] for s in args.shape}
        if gpu
        else {d: DATASETS[d] for d in args.dataset or sorted(DATASETS)}
    )
    for name, setting in settings.items():
        data, heldout, features = dataset(setting, args.rows, device)
        for feed_kind in args.feed or ["array"]:
            for epochs in [1] if args.steps else args.epochs:
                args.epochs_now = epochs if not args.steps else 10**9
                if feed_kind == "cache":
                    with tempfile.TemporaryDirectory(prefix="saekit-bench-") as tmp:
                        feed = cache_feed(data, args.batch_size, args.epochs_now, Path(tmp))
                        bench(name, setting, feed, heldout, features, args, device)
                else:
                    feed = array_feed(data, args.batch_size, args.epochs_now)
                    bench(name, setting, feed, heldout, features, args, device)
        del data, heldout


if __name__ == "__main__":
    main()
