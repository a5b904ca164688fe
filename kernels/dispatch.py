"""Per-call choice between the Triton kernels and their eager torch twins, and, on the Triton
backend, between the fused encoders and a dense product followed by a selection.

Triton runs when the tensor is on a CUDA device, triton imports, and ``SAEKIT_DISABLE_TRITON``
is not set to a true value. Everything else (CPU, no triton, opted out) takes the eager path,
which computes the same math. The encoder's path follows the figures measured on a GPU
(:data:`ENCODER_TIMINGS`).

Tests run the Triton kernels on CPU tensors in Triton's interpreter through
:func:`force_backend`; nothing else should call it.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Literal

import torch
from torch import Tensor

from . import eager

_TRUE = {"1", "true", "yes", "on"}

# ---------------------------------------------------------------------------- encoder choice

ENCODER_ENV = "SAEKIT_ENCODER"
"""``auto`` (default: the table below), ``fused`` (the fused kernels wherever they apply) or
``plain`` (a dense cuBLAS product, then ``torch.topk`` / a threshold compare)."""


@dataclass(frozen=True)
class EncoderTiming:
    """One measured encoder: both paths on the same inputs (N = 16384 rows, bf16 operands)."""

    kind: Literal["topk", "jumprelu"]
    d: int
    m: int
    k: int | None
    fused_ms: float
    plain_ms: float

    @property
    def faster(self) -> str:
        return "fused" if self.fused_ms < self.plain_ms else "plain"


MEASURED_ON = (
    "NVIDIA H200, torch 2.11.0+cu130, triton 3.6.0, commit 6fb8a46, 2026-12-04 "
    "(scripts/bench_kernels.py; issue 16)"
)
ENCODER_TIMINGS = (
    EncoderTiming("topk", 768, 24576, 32, fused_ms=7.76, plain_ms=3.91),
    EncoderTiming("topk", 4096, 131072, 64, fused_ms=176.0, plain_ms=39.3),
    EncoderTiming("jumprelu", 768, 24576, None, fused_ms=5.5, plain_ms=8.5),
    EncoderTiming("jumprelu", 4096, 131072, None, fused_ms=122.0, plain_ms=63.0),
)
"""The encoders as measured on a GPU (:data:`MEASURED_ON`): what ``auto`` follows."""

FUSED_JUMPRELU_MAX_D = 1024
"""Under ``auto``, JumpReLU's fused encoder runs for input widths up to this.

Both paths cost a product and a pass over the ``N x m`` pre-activations. The fused kernel's
``tl.dot`` ran at 113 (d = 768) and 144 TFLOP/s (d = 4096), cuBLAS's at about 700; the plain
path's threshold compare and compaction cost ~19 ps per pre-activation (8.5 ms at d = 768 less
its 0.9 ms product), which the fused kernel saves. Per pre-activation the fused path costs
``2 d / 113e12`` s and the plain one ``2 d / 700e12 + 19e-12`` s: equal at d ~ 1300 (~1500 at
144 TFLOP/s). 1024 keeps the measured win at 768 and stays clear of the crossover."""


def encoder_path(kind: Literal["topk", "jumprelu"], d: int, dtype: torch.dtype) -> str:
    """``"fused"`` or ``"plain"`` for an encoder of ``kind`` over inputs of width ``d`` with
    operands of ``dtype``, as ``SAEKIT_ENCODER`` asks (``auto`` by default).

    ``auto`` follows :data:`ENCODER_TIMINGS`: TopK (and so AuxK and BatchTopK, which select
    with it) is faster on cuBLAS and ``torch.topk`` at both measured widths; JumpReLU's fused
    kernel wins at d = 768 and loses at d = 4096 (:data:`FUSED_JUMPRELU_MAX_D`). Float32
    products always take cuBLAS (``tl.dot`` in float32 runs far below it). Whether the fused
    TopK kernel can hold the k asked for is the backend's business (it falls back to plain).
    """
    choice = os.environ.get(ENCODER_ENV, "auto").strip().lower()
    if choice not in ("auto", "fused", "plain"):
        raise ValueError(f"{ENCODER_ENV}={choice!r}: use auto, fused or plain")
    if choice != "auto":
        return choice
    if dtype not in (torch.bfloat16, torch.float16):
        return "plain"
    if kind == "jumprelu" and d <= FUSED_JUMPRELU_MAX_D:
        return "fused"
    return "plain"


# ---------------------------------------------------------------------------- backend choice


def triton_disabled_by_env() -> bool:
    return os.environ.get("SAEKIT_DISABLE_TRITON", "").strip().lower() in _TRUE


@functools.cache
def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


@functools.cache
def _triton_backend() -> ModuleType | None:
    """The Triton backend module, or None when this build has none."""
    if not triton_importable():
        return None
    try:
        return importlib.import_module(f"{__package__}.triton_backend")
    except ImportError:
        return None


_forced_backend: ModuleType | None = None


@contextlib.contextmanager
def force_backend(backend: ModuleType) -> Iterator[None]:
    """Test-only: route every kernel call, CPU tensors included, to ``backend``.

    The tests import the Triton backend with ``TRITON_INTERPRET=1`` (under a private module
    name, so the real one stays compiled) and train through it on CPU tensors.
    ``SAEKIT_DISABLE_TRITON`` still wins.
    """
    global _forced_backend
    previous, _forced_backend = _forced_backend, backend
    try:
        yield
    finally:
        _forced_backend = previous


def use_triton(t: Tensor) -> bool:
    """Whether a kernel called on ``t`` runs in Triton."""
    if triton_disabled_by_env():
        return False
    if _forced_backend is not None:
        return True
    return t.is_cuda and _triton_backend() is not None


def backend_for(t: Tensor) -> ModuleType:
    """The module (Triton or eager) whose functions implement the kernels for ``t``."""
    if use_triton(t):
        backend = _forced_backend or _triton_backend()
        assert backend is not None
        return backend
    return eager
