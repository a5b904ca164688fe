"""Peak memory of one eager (CPU) training step at initialisation, as a JSON line per record.

A JumpReLU dictionary at initialisation tracks about half of its latents on every token (its
thresholds start near zero): at d = 768, m = 16384 and N = 4096 that is ~34M (row, latent)
entries, which a decoder gather of d floats per entry would turn into 98 GiB. The eager kernels
walk such entries in bounded chunks (or dense blocks of rows); this measures one step of
``Trainer`` (forward, backward, clipping, fused Adam, decoder upkeep, bookkeeping) on a freshly
initialised dictionary against the issue's budget of 2 GB. Each step runs in a process of its
own, so that every peak is its own, with its address space capped some GB past what importing
torch maps: a step that did materialise ``nnz x d`` fails with an error, not the OOM killer.

    python scripts/bench_eager_memory.py                     # jumprelu and batchtopk, the issue's shape
    python scripts/bench_eager_memory.py --architectures topk --tokens 16384
    python scripts/bench_eager_memory.py --cli-malloc        # glibc set up as `saekit train` does

Fields: ``peak_rss_bytes`` (the process's high-water mark, ``getrusage``), ``baseline_bytes``
(resident once torch and saekit are imported and the batch exists), ``training_bytes`` (their
difference: the dictionary, the optimizer and the step), ``l0`` (active latents per token),
``seconds`` (the run's wall time: initialisation and the step).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

BUDGET_BYTES = 2 * 10**9
"""The issue's bound on a step's peak memory (2 GB)."""

ADDRESS_SPACE_HEADROOM = 12 * 2**30
"""The child's address space may grow this far past what importing torch maps: a step that
materialised an ``nnz x d`` tensor then fails with an error instead of waking the OOM killer."""


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _address_space_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * resource.getpagesize()


def run_step(architecture: str, d: int, m: int, n: int, k: int, cli_malloc: int = 0) -> dict:
    """One step of ``Trainer`` on a freshly initialised dictionary on CPU, in this process."""
    import torch

    from saekit._malloc import keep_large_allocations_in_heap
    from saekit.dictionaries import SAEConfig
    from saekit.training import TrainConfig, Trainer

    if cli_malloc:  # what `saekit train` does to glibc's allocator
        keep_large_allocations_in_heap()
    limit = _address_space_bytes() + ADDRESS_SPACE_HEADROOM
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    torch.manual_seed(0)
    x = torch.randn(n, d)
    baseline = _rss_bytes()  # the interpreter, torch and saekit, and the batch
    train = TrainConfig(
        batch_size=n, max_steps=1, device="cpu", progress=False, checkpoint_every=0, log_every=1
    )
    start = time.perf_counter()
    (result,) = Trainer([SAEConfig(architecture=architecture, k=k, d_sae=m)], train, [x]).fit()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "kind": "eager_step_memory",
        "architecture": architecture,
        "d": d,
        "m": m,
        "tokens": n,
        "k": k,
        "l0": result.metrics["l0"],
        "seconds": seconds,
        "peak_rss_bytes": peak,
        "baseline_bytes": baseline,
        "training_bytes": peak - baseline,
        "budget_bytes": BUDGET_BYTES,
        "within_budget": peak - baseline <= BUDGET_BYTES,
        "cli_malloc": bool(cli_malloc),
        "torch_threads": torch.get_num_threads(),
    }


def measure(
    architecture: str,
    d: int,
    m: int,
    n: int,
    k: int,
    cli_malloc: bool = False,
    timeout: float = 900,
) -> dict:
    """:func:`run_step` in a fresh process (so its peak is its own); the record it printed."""
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); import bench_eager_memory as b; "
        "print(json.dumps(b.run_step(sys.argv[2], *map(int, sys.argv[3:]))))"
    )
    here = str(Path(__file__).resolve().parent)
    proc = subprocess.run(
        [sys.executable, "-c", code, here, architecture, *map(str, (d, m, n, k, int(cli_malloc)))],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        return {
            "kind": "eager_step_memory",
            "architecture": architecture,
            "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "crashed",
            "returncode": proc.returncode,
        }
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--architectures", default="jumprelu,batchtopk")
    parser.add_argument("--d", type=int, default=768)
    parser.add_argument("--latents", type=int, default=16384)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument(
        "--cli-malloc",
        action="store_true",
        help="keep large allocations in glibc's heap, as `saekit train` does",
    )
    args = parser.parse_args()
    for architecture in args.architectures.split(","):
        record = measure(architecture, args.d, args.latents, args.tokens, args.k, args.cli_malloc)
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
