"""What every saekit Triton kernel shares: how it launches, and sortable (value, latent) keys.

Imported only by the Triton backend (never on a machine without triton). ``TRITON_INTERPRET``
is read when ``@triton.jit`` decorates, so it is read here once, at import, the same way: under
the interpreter (the CPU tests) every kernel launches with one small fixed configuration that
exercises its loops and masked tails, because multi-config autotuning needs a GPU.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import triton
import triton.language as tl
from triton import knobs

INTERPRETING: bool = bool(knobs.runtime.interpret)
"""True when this module (and so every kernel) was imported under ``TRITON_INTERPRET=1``."""

MIN_KEY = tl.constexpr(-(2**63))
"""Below every packed key: the empty slot of a running top-k (a constexpr, so that kernels may
read this global)."""


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def launch(
    kernel: Any,
    grid: Callable[[dict[str, Any]], tuple[int, ...]],
    *args: Any,
    interpreter_config: dict[str, Any],
    **kwargs: Any,
) -> None:
    """Launch an autotuned ``kernel``; under the interpreter, its bare function with
    ``interpreter_config`` (autotuning benchmarks on a GPU, which the interpreter has not)."""
    if INTERPRETING:
        kernel.fn[grid(interpreter_config)](*args, **kwargs, **interpreter_config)
    else:
        kernel[grid](*args, **kwargs)


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input precision for operands of ``dtype``: float32 products keep torch's
    setting (full precision unless the user allowed TF32); half-precision ones ignore it."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def multiprocessors(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (a guess of 132, an H100's, off CUDA)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132


@triton.jit
def pack_keys(values, columns):
    """(float32 value, int32 column) -> int64 key ordered by value, ties to the lower column.

    A float's bits read as a signed int order positive floats correctly and negative ones
    backwards; flipping the 31 low bits of the negative ones makes the whole order monotone.
    The column goes in the low half, inverted so that a smaller column wins a tie. One key per
    candidate lets ``tl.topk``/``tl.sort`` (which sort values only) carry the latent id along.
    """
    bits = values.to(tl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (ordered.to(tl.int64) << 32) | (0x7FFFFFFF - columns).to(tl.int64)


@triton.jit
def unpack_values(keys):
    """The float32 values of :func:`pack_keys` keys (bit-exact)."""
    ordered = (keys >> 32).to(tl.int32)
    bits = ordered ^ ((ordered >> 31) & 0x7FFFFFFF)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def unpack_columns(keys):
    """The columns of :func:`pack_keys` keys."""
    return 0x7FFFFFFF - (keys & 0x7FFFFFFF).to(tl.int32)
