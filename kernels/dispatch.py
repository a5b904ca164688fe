"""Per-call choice between the Triton kernels and their eager torch twins.

Triton runs when the tensor is on a CUDA device, triton imports, and ``SAEKIT_DISABLE_TRITON``
is not set to a true value. Everything else (CPU, no triton, opted out) takes the eager path,
which computes the same math.

Tests run the Triton kernels on CPU tensors in Triton's interpreter through
:func:`force_backend`; nothing else should call it.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from collections.abc import Iterator
from types import ModuleType

from torch import Tensor

from . import eager

_TRUE = {"1", "true", "yes", "on"}


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
