"""Tests of the Triton kernels in Triton's CPU interpreter.

They run only in a process started with ``TRITON_INTERPRET=1``: the variable is read when
triton and the kernels are imported, and an interpreted triton cannot share a process with a
compiled one. ``tests/test_kernels_triton.py`` starts such a process for the default test run;
run them by hand with ``TRITON_INTERPRET=1 pytest tests/interpreted``.
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

INTERPRETING = os.environ.get("TRITON_INTERPRET", "").strip().lower() in {"1", "true", "on", "yes"}

# Collected only in the interpreted process (elsewhere these modules would import a compiled
# triton and could not run on CPU tensors).
collect_ignore_glob = [] if INTERPRETING else ["test_*.py"]


@pytest.fixture(autouse=True)
def _fused_everywhere(monkeypatch):
    """Run the fused encoders on CPU float32 (``auto`` would pick the plain path there)."""
    monkeypatch.setenv("SAEKIT_ENCODER", "fused")
    monkeypatch.delenv("SAEKIT_DISABLE_TRITON", raising=False)


@pytest.fixture
def poisoned():
    """A context manager: see :func:`poisoned_memory`."""
    return poisoned_memory


@contextlib.contextmanager
def poisoned_memory():
    """Every uninitialised tensor torch hands out is NaN (floats) or the largest integer, so an
    output element that a kernel forgot to write shows up in the comparison."""
    was = torch.are_deterministic_algorithms_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was)
        torch.utils.deterministic.fill_uninitialized_memory = fill
