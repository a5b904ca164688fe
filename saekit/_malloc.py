"""Keep large CPU allocations in the heap instead of fresh ``mmap`` s (Linux/glibc only).

A training step on CPU allocates and frees several multi-megabyte tensors (gradients, scatter
results). glibc serves each of them with a fresh ``mmap`` whose first touch page-faults every
4 KiB page: about 7% of a step in ``scripts/bench_train.py``. Raising the mmap and trim
thresholds lets freed blocks be reused, as jemalloc or tcmalloc would. This is process-wide, so
only the command-line entry points and benchmarks call it, never library code.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


@functools.cache
def keep_large_allocations_in_heap(threshold_bytes: int = 1 << 30) -> bool:
    """Ask glibc to serve allocations below ``threshold_bytes`` from the heap; True if it agreed."""
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = mallopt(_M_MMAP_THRESHOLD, threshold_bytes) == 1
    return ok and mallopt(_M_TRIM_THRESHOLD, 2 * threshold_bytes) == 1
