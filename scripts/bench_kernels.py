"""Benchmark of saekit's Triton kernels and whole training steps against the GPU's floor.

In one run, on one GPU:

1. the two ceilings: a large bf16 matrix product (FLOP/s) and a large device-to-device copy
   (bytes/s, read + written);
2. every kernel at each shape: time, achieved TFLOP/s and GB/s, and the ratio of its floor
   (from :mod:`saekit.kernels.roofline` and the measured ceilings) to its time: 1.0 is the
   floor, L2 hits can take a memory-bound kernel past it;
3. whole training steps (forward, backward, optimizer, decoder upkeep, as ``Trainer`` runs
   them, without its logging): TopK, BatchTopK and JumpReLU on the Triton kernels, the same
   TopK step with AuxK on a fraction of dead latents, and EleutherAI sparsify's TopK step, with
   and without AuxK, when it is installed (its own fused encoder and Triton decoder, its
   autocast, the same Adam; like its trainer it does not clip gradients);
4. ``Trainer`` itself on in-memory batches already on the GPU, against the bare TopK step: its
   own overhead (bookkeeping; a non-logging step reads nothing back from the device);
5. with ``--cache DIR``, ``saekit``'s trainer fed from that activation cache (disk, decode,
   host-to-device copy included), so the data feed's own ceiling shows.

Every record is one JSON line (``kind``: machine, ceiling, kernel, step, note). Timed records
carry ``seconds`` (the median of the steady state) and ``first_call_seconds`` (the first call
alone: Triton's compilation, unless its disk cache holds the kernel, and autotuning, which
benchmarks every configuration once per new shape key, plus one call). On an H200 the default
run (both shapes of issue 16, N = 16384) takes about three minutes.

    python scripts/bench_kernels.py                                  # the issue's two shapes
    python scripts/bench_kernels.py --shapes 768x24576x32 --tokens 16384 --dead_fraction 0.1
    python scripts/bench_kernels.py --cache runs/cache --hookpoint vision_model.encoder.layers.10
    python scripts/bench_kernels.py --cpu-smoke    # the script's own check on a CPU: Triton
                                                   # interpreter, tiny shapes, figures meaningless
"""

from __future__ import annotations

import os
import sys

if "--cpu-smoke" in sys.argv:  # read when triton is imported: before anything imports it
    os.environ["TRITON_INTERPRET"] = "1"

import argparse
import contextlib
import datetime
import itertools
import json
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from saekit.dictionaries import SAEConfig, StepContext, build_dictionary
from saekit.dictionaries.base import default_k_aux
from saekit.kernels import eager, roofline
from saekit.kernels.dispatch import encoder_path, force_backend
from saekit.training import TrainConfig

ISSUE_SHAPES = "768x24576x32,4096x131072x64"


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


@dataclass(frozen=True)
class Shape:
    d: int
    m: int
    k: int

    @staticmethod
    def parse(text: str) -> Shape:
        try:
            d, m, k = (int(part) for part in text.lower().split("x"))
        except ValueError:
            raise SystemExit(f"--shapes: {text!r} is not DxMxK (e.g. 768x24576x32)") from None
        if not 1 <= k <= m:
            raise SystemExit(f"--shapes: {text!r} needs 1 <= k <= m")
        return Shape(d, m, k)

    def record(self) -> dict:
        return {"d": self.d, "m": self.m, "k": self.k}


@dataclass(frozen=True)
class Ceilings:
    flops_per_s: float
    bytes_per_s: float


@dataclass(frozen=True)
class Timing:
    seconds: float
    """Median of the timed calls (the steady state)."""
    first_call_seconds: float
    """The first call, synchronised: compilation and autotuning included."""


class Timer:
    """Median wall time of a callable, with CUDA events on a GPU, and the first call's apart.
    ``flush_l2`` overwrites a buffer larger than L2 before each call, so memory-bound kernels are
    timed cold."""

    def __init__(self, device: torch.device, repeats: int, warmup: int) -> None:
        self.device = device
        self.repeats = repeats
        self.warmup = warmup
        self._flush = (
            torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
            if device.type == "cuda"
            else None
        )

    def __call__(self, fn: Callable[[], object], *, flush_l2: bool = True) -> Timing:
        self._sync()
        start = time.perf_counter()
        fn()
        self._sync()
        first = time.perf_counter() - start
        for _ in range(self.warmup - 1):
            fn()
        if self.device.type != "cuda":
            times = []
            for _ in range(self.repeats):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
            return Timing(statistics.median(times), first)
        torch.cuda.synchronize()
        events = []
        for _ in range(self.repeats):
            if flush_l2 and self._flush is not None:
                self._flush.zero_()
            begin = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            events.append((begin, end))
        torch.cuda.synchronize()
        return Timing(statistics.median(b.elapsed_time(e) for b, e in events) / 1e3, first)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def measure_ceilings(timer: Timer, device: torch.device) -> Ceilings:
    size = 8192 if device.type == "cuda" else 256
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    seconds = timer(lambda: a @ b, flush_l2=False).seconds
    flops = 2 * size**3 / seconds
    emit(
        {
            "kind": "ceiling",
            "name": f"{dtype} matmul {size}^3",
            "seconds": seconds,
            "tflops": flops / 1e12,
        }
    )
    n_bytes = 2**31 if device.type == "cuda" else 2**24
    src = torch.empty(n_bytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    seconds = timer(lambda: dst.copy_(src), flush_l2=False).seconds
    bandwidth = 2 * n_bytes / seconds  # every byte read once and written once
    emit(
        {
            "kind": "ceiling",
            "name": f"device copy {n_bytes >> 20} MiB",
            "seconds": seconds,
            "gbps": bandwidth / 1e9,
        }
    )
    return Ceilings(flops, bandwidth)


def report(
    kind: str,
    name: str,
    shape: Shape,
    tokens: int,
    timing: Timing,
    phases: list[roofline.Phase],
    ceilings: Ceilings,
    **extra,
) -> None:
    seconds = timing.seconds
    flops = sum(p.flops for p in phases)
    n_bytes = sum(p.bytes for p in phases)
    floor = roofline.floor_seconds(phases, ceilings.flops_per_s, ceilings.bytes_per_s)
    emit(
        {
            "kind": kind,
            "name": name,
            **shape.record(),
            "tokens": tokens,
            "seconds": seconds,
            "first_call_seconds": timing.first_call_seconds,
            "tflops": flops / seconds / 1e12,
            "gbps": n_bytes / seconds / 1e9,
            "floor_seconds": floor,
            "fraction_of_floor": floor / seconds,
            "tokens_per_s": tokens / seconds,
            **extra,
        }
    )


@contextlib.contextmanager
def env(**values: str | None) -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in values}
    for key, value in values.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def deterministic(on: bool) -> Iterator[None]:
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(on, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was)


# ------------------------------------------------------------------------------- kernels


def bench_kernels(
    shape: Shape,
    n: int,
    device: torch.device,
    timer: Timer,
    ceilings: Ceilings,
    dead_fraction: float,
) -> None:
    from saekit.kernels import triton_backend as tb

    d, m, k = shape.d, shape.m, shape.k
    # bf16 operands on a GPU, as under autocast; float32 on the interpreter (its bf16 dot is wrong)
    op_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(n, d, device=device, generator=g)
    W_enc = (torch.randn(m, d, device=device, generator=g) / d**0.5).to(op_dtype)
    b_enc = torch.zeros(m, device=device)
    W_dec = torch.randn(m, d, device=device, generator=g).to(op_dtype)
    grad_out = torch.randn(n, d, device=device, generator=g)
    with env(SAEKIT_ENCODER="fused"):
        values, indices, _, _ = tb.encode_topk(x, W_enc, b_enc, k)
    values, indices = values.reshape(-1), indices.reshape(-1)
    offsets = torch.arange(0, n * k + 1, k, device=device)
    n_dead = max(1, int(dead_fraction * m))
    dead = torch.randperm(m, device=device)[:n_dead]
    k_aux = min(default_k_aux(d), n_dead)
    # A threshold at each row's k-th largest pre-activation, averaged: L0 about k.
    theta = torch.full((m,), float(values.view(n, k).min(1).values.mean()), device=device)

    def kernel(name, fn, phases, **extra):
        report("kernel", name, shape, n, timer(fn), phases, ceilings, **extra)

    product = roofline.encoder_product(n, d, m)
    # What SAEKIT_ENCODER=auto would run here (kernels/dispatch.py's table of measured figures).
    with env(SAEKIT_ENCODER=None):
        auto = {kind: encoder_path(kind, d, op_dtype) for kind in ("topk", "jumprelu")}
    for path in ("fused", "plain"):
        with env(SAEKIT_ENCODER=path):
            kernel(
                f"topk encoder ({path})",
                lambda: tb.encode_topk(x, W_enc, b_enc, k),
                [product],
                auto_picks=auto["topk"],
            )
            kernel(
                f"topk encoder + AuxK on {dead_fraction:.0%} dead ({path})",
                lambda: tb.encode_topk(x, W_enc, b_enc, k, dead, k_aux),
                [product, roofline.encoder_product(n, d, n_dead)],
                auto_picks=auto["topk"],
            )
            pre, idx, _ = tb.encode_jumprelu(x, W_enc, b_enc, theta, 0.05)
            tracked = pre.numel() / n
            kernel(
                f"jumprelu encoder ({path})",
                lambda: tb.encode_jumprelu(x, W_enc, b_enc, theta, 0.05),
                roofline.jumprelu_step(n, d, m, tracked, tracked)[:1],
                tracked_per_token=tracked,
                auto_picks=auto["jumprelu"],
            )
    kernel(
        "decode",
        lambda: tb.sparse_decode(values, indices, offsets, k, W_dec),
        [roofline.sparse_decode(n, d, k)],
    )
    kernel(
        "decode, eager twin (embedding_bag)",
        lambda: eager.sparse_decode(values, indices, offsets, k, W_dec),
        [roofline.sparse_decode(n, d, k)],
    )
    for det in (False, True):
        label = "deterministic" if det else "atomic"
        with deterministic(det):
            kernel(
                f"decode backward ({label})",
                lambda: tb.sparse_decode_backward(grad_out, values, indices, offsets, k, W_dec),
                [roofline.sparse_decode_backward(n, d, k)],
            )
            kernel(
                f"encoder backward ({label})",
                lambda: tb.sparse_encode_backward(values, indices, offsets, k, x, W_enc),
                [roofline.sparse_encode_backward(n, d, k)],
            )
    grad_values = torch.randn_like(pre)
    grad_l0 = torch.tensor(0.01, device=device)
    nnz = pre.numel()
    kernel(
        "jumprelu backward (straight-through)",
        lambda: tb.jumprelu_backward(grad_values, grad_l0, pre, idx, theta, 0.05),
        [roofline.Phase("jumprelu backward", 10 * nnz, 32 * nnz)],
    )


# ------------------------------------------------------------------------------- steps


def saekit_step(
    architecture: str,
    shape: Shape,
    x: torch.Tensor,
    dead_fraction: float,
    theta: float | None = None,
) -> Callable[[], None]:
    """One step of ``Trainer`` (forward under bf16 autocast on CUDA, backward, decoder-gradient
    projection, clipping, fused Adam, constraints, firing counts), without its logging."""
    d, m, k = shape.d, shape.m, shape.k
    device = x.device
    train = TrainConfig()
    sae = build_dictionary(SAEConfig(architecture=architecture, k=k, d_sae=m).resolved(d), device)
    if theta is not None:
        sae.set_threshold(theta)
    optimizer = torch.optim.Adam(
        sae.parameters(),
        lr=train.learning_rate(m),
        betas=train.adam_betas,
        eps=train.adam_eps,
        fused=device.type == "cuda",
    )
    dead = torch.randperm(m, device=device)[: int(dead_fraction * m)] if dead_fraction else None
    ctx = StepContext(
        dead_latents=dead,
        k_aux=default_k_aux(d),
        auxk_alpha=train.auxk_alpha,
        sparsity_coefficient=train.sparsity_weight(architecture),
        jumprelu_bandwidth=train.jumprelu_bandwidth,
    )

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = sae.training_forward(x, ctx)
        out.loss.backward()
        if sae.normalize_decoder:
            sae.remove_gradient_parallel_to_decoder_directions()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sae.after_optimizer_step()
        out.codes.firing_counts()

    return step


def sparsify_step(shape: Shape, x: torch.Tensor, dead_fraction: float) -> Callable[[], None] | None:
    try:
        from sparsify import SparseCoder, SparseCoderConfig
    except ImportError:
        return None
    d, m, k = shape.d, shape.m, shape.k
    sae = SparseCoder(d, SparseCoderConfig(num_latents=m, k=k), device=x.device)
    train = TrainConfig()
    optimizer = torch.optim.Adam(
        sae.parameters(),
        lr=train.learning_rate(m),
        betas=train.adam_betas,
        eps=train.adam_eps,
        fused=x.is_cuda,
    )
    dead_mask = None
    if dead_fraction:
        dead_mask = torch.zeros(m, dtype=torch.bool, device=x.device)
        dead_mask[torch.randperm(m, device=x.device)[: int(dead_fraction * m)]] = True

    def step() -> None:
        out = sae(x, dead_mask=dead_mask)
        (out.fvu + train.auxk_alpha * out.auxk_loss).backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sae.set_decoder_norm_to_unit_norm()

    return step


def bench_steps(
    shape: Shape,
    n: int,
    device: torch.device,
    timer: Timer,
    ceilings: Ceilings,
    dead_fraction: float,
    with_eager: bool,
) -> None:
    d, m, k = shape.d, shape.m, shape.k
    x = torch.randn(n, d, device=device)
    x *= d**0.5 / x.norm(dim=1, keepdim=True).mean()  # the trainer's input scaling
    n_dead = int(dead_fraction * m)
    k_aux = min(default_k_aux(d), n_dead)

    def step(name, fn, phases, **extra) -> Timing | None:
        if fn is None:
            emit({"kind": "note", "name": name, "note": "not installed"})
            return None
        timing = timer(fn, flush_l2=False)
        report("step", name, shape, n, timing, phases, ceilings, **extra)
        return timing

    plain = roofline.topk_step(n, d, m, k)
    aux = roofline.topk_step(n, d, m, k, n_dead=n_dead, k_aux=k_aux)
    bare = step("topk step (saekit, triton)", saekit_step("topk", shape, x, 0.0), plain)
    if n_dead:
        step(
            f"topk step + AuxK, {dead_fraction:.0%} dead (saekit, triton)",
            saekit_step("topk", shape, x, dead_fraction),
            aux,
        )
    if with_eager:
        with env(SAEKIT_DISABLE_TRITON="1"):
            step("topk step (saekit, eager float32)", saekit_step("topk", shape, x, 0.0), plain)
    with torch.no_grad():  # a threshold that keeps about k latents per token at initialisation
        probe = build_dictionary(SAEConfig(architecture="topk", k=k, d_sae=m).resolved(d), device)
        theta = float(probe.encode(x[:1024]).values.view(-1, k).min(1).values.mean())
        del probe
    step(
        "jumprelu step (saekit, triton)",
        saekit_step("jumprelu", shape, x, 0.0, theta),
        roofline.jumprelu_step(n, d, m, k),
    )
    # BatchTopK selects with the TopK encoder (4k candidates per row), then the batch's k N.
    step("batchtopk step (saekit, triton)", saekit_step("batchtopk", shape, x, 0.0), plain)
    assert bare is not None
    bench_trainer(shape, x, timer, ceilings, bare)
    if device.type == "cuda":
        step("topk step (eai-sparsify)", sparsify_step(shape, x, 0.0), plain)
        if n_dead:
            step(
                f"topk step + AuxK, {dead_fraction:.0%} dead (eai-sparsify)",
                sparsify_step(shape, x, dead_fraction),
                aux,
            )
    torch.cuda.empty_cache() if device.type == "cuda" else None


class _Clock:
    """Batches from ``source`` (or ``batch`` forever); when the trainer asks for batch ``start``
    and batch ``stop`` (steps ``start - 1`` and ``stop - 1`` are then done), waits for the device
    and reads the clock. Two synchronisations in all, so the steps between run as they would."""

    def __init__(self, start: int, stop: int, source=None, batch: torch.Tensor | None = None):
        self.start, self.stop = start, stop
        self.source, self.batch = source, batch
        self.d_in = source.d_in if source is not None else batch.shape[1]
        self.began = time.perf_counter()
        self.times: list[float] = []

    def __iter__(self):
        batches = iter(self.source) if self.source is not None else itertools.repeat(self.batch)
        for i, batch in enumerate(batches):
            if i in (self.start, self.stop):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                self.times.append(time.perf_counter())
            yield batch

    def timing(self) -> Timing:
        steps = self.stop - self.start
        return Timing((self.times[1] - self.times[0]) / steps, self.times[0] - self.began)


def _run_trainer(shape: Shape, n: int, device: torch.device, clock: _Clock) -> None:
    from saekit.training import Trainer

    train = TrainConfig(
        batch_size=n,
        max_steps=clock.stop + 1,
        device=str(device),
        log_every=10**9,
        checkpoint_every=0,
        progress=False,
    )
    Trainer([SAEConfig(architecture="topk", k=shape.k, d_sae=shape.m)], train, clock).fit()


def bench_trainer(
    shape: Shape, x: torch.Tensor, timer: Timer, ceilings: Ceilings, bare: Timing
) -> None:
    """``Trainer`` on the same batch, already on the device, again and again: the bare step plus
    the trainer's bookkeeping. ``first_call_seconds`` is here everything before the timed steps
    (initialisation from the first batch, compilation, autotuning, the warm-up steps)."""
    n = x.shape[0]
    clock = _Clock(timer.warmup, timer.warmup + timer.repeats, batch=x)
    _run_trainer(shape, n, x.device, clock)
    timing = clock.timing()
    report(
        "step",
        "topk step (saekit Trainer, in-memory batches on the device)",
        shape,
        n,
        timing,
        roofline.topk_step(n, shape.d, shape.m, shape.k),
        ceilings,
        overhead_over_bare_step=timing.seconds / bare.seconds - 1,
    )


def bench_cache_fed(
    cache: str,
    hookpoint: str | None,
    shape: Shape,
    n: int,
    steps: int,
    ceilings: Ceilings,
    device: torch.device,
) -> None:
    from saekit.cache import open_training_source

    warmup = 3
    clock = _Clock(
        warmup,
        warmup + steps,
        source=open_training_source(cache, hookpoint=hookpoint, batch_size=n, epochs=None),
    )
    shape = Shape(clock.d_in, shape.m, shape.k)
    _run_trainer(shape, n, device, clock)
    timing = clock.timing()
    report(
        "step",
        f"topk step fed from the cache {cache} (saekit trainer)",
        shape,
        n,
        timing,
        roofline.topk_step(n, shape.d, shape.m, shape.k),
        ceilings,
        feed_gbps=n * shape.d * clock.source.dtype.itemsize / timing.seconds / 1e9,
    )


# ------------------------------------------------------------------------------- main


def _commit() -> str | None:
    """The checkout's commit, when it is a git checkout (a copied tree is not)."""
    import subprocess

    try:
        done = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", default=ISSUE_SHAPES, help="DxMxK, comma-separated")
    parser.add_argument("--tokens", type=int, default=16384, help="tokens per batch (N)")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per kernel")
    parser.add_argument("--steps", type=int, default=20, help="timed training steps")
    parser.add_argument("--dead_fraction", type=float, default=0.1, help="dead latents for AuxK")
    parser.add_argument("--eager", action="store_true", help="also time the eager float32 step")
    parser.add_argument("--no-kernels", dest="kernels", action="store_false")
    parser.add_argument("--no-steps", dest="steps_on", action="store_false")
    parser.add_argument("--cache", help="an activation cache directory to feed a training run from")
    parser.add_argument("--hookpoint", help="the cache's hookpoint (when it holds several)")
    parser.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="run on CPU in the Triton interpreter at tiny shapes (checks this script)",
    )
    args = parser.parse_args()

    if args.cpu_smoke:
        device = torch.device("cpu")
        shapes = [Shape(24, 80, 4)]
        args.tokens, args.repeats, args.steps = 64, 1, 1
    else:
        if not torch.cuda.is_available():
            raise SystemExit(
                "bench_kernels.py measures GPU kernels: no CUDA device here "
                "(--cpu-smoke checks the script itself on a CPU)"
            )
        device = torch.device("cuda")
        shapes = [Shape.parse(s) for s in args.shapes.split(",")]
    import triton

    emit(
        {
            "kind": "machine",
            "device": torch.cuda.get_device_name()
            if device.type == "cuda"
            else f"{platform.machine()} CPU, Triton interpreter",
            "date": datetime.date.today().isoformat(),
            "torch": torch.__version__,
            "triton": triton.__version__,
            "commit": _commit(),
            "tokens": args.tokens,
        }
    )
    timer = Timer(device, args.repeats, warmup=2)
    ceilings = measure_ceilings(timer, device)
    context = contextlib.nullcontext()
    if args.cpu_smoke:
        from saekit.kernels import triton_backend

        context = force_backend(triton_backend)
    with context:
        for shape in shapes:
            if args.kernels:
                bench_kernels(shape, args.tokens, device, timer, ceilings, args.dead_fraction)
            if args.steps_on:
                step_timer = Timer(device, args.steps, warmup=3)
                bench_steps(
                    shape, args.tokens, device, step_timer, ceilings, args.dead_fraction, args.eager
                )
            if args.cache:
                bench_cache_fed(
                    args.cache, args.hookpoint, shape, args.tokens, args.steps, ceilings, device
                )


if __name__ == "__main__":
    main()
