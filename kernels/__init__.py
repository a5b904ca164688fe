"""saekit's kernels: sparse encode/decode for sparse autoencoders.

Installed as ``saekit.kernels`` (never as a top-level ``kernels`` module, a name that belongs to
an unrelated distribution). Every kernel has an eager torch twin in :mod:`saekit.kernels.eager`;
:mod:`saekit.kernels.dispatch` picks Triton per call on CUDA tensors.
"""

from .codes import SparseCodes
from .dispatch import backend_for, use_triton
from .functions import batch_topk_encode, jumprelu_encode, sparse_decode, topk_encode

__all__ = [
    "SparseCodes",
    "backend_for",
    "batch_topk_encode",
    "jumprelu_encode",
    "sparse_decode",
    "topk_encode",
    "use_triton",
]
