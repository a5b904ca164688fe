"""saekit's kernels: sparse encode/decode for sparse autoencoders.

The modules live in the repository's top-level ``kernels/`` folder, which has no
``__init__.py`` on purpose: a regular package there would be imported as the top-level module
``kernels`` whenever the repository root is on ``sys.path`` (``python -m pytest``,
``python -c``, ``python -m saekit``), shadowing the unrelated ``kernels`` distribution that
transformers (a required dependency since 5.25) and diffusers import. This package is their only
entry point: in a checkout (editable install) it adds that folder to its ``__path__``; the wheel
installs the modules beside this file (``setup.py``).

Every kernel has an eager torch twin in :mod:`saekit.kernels.eager`;
:mod:`saekit.kernels.dispatch` picks Triton per call on CUDA tensors.
"""

from pathlib import Path

_CHECKOUT_KERNELS = Path(__file__).resolve().parents[2] / "kernels"
if not (Path(__file__).parent / "codes.py").exists() and _CHECKOUT_KERNELS.is_dir():
    __path__.append(str(_CHECKOUT_KERNELS))

from .codes import SparseCodes  # noqa: E402
from .dispatch import backend_for, use_triton  # noqa: E402
from .functions import (  # noqa: E402
    batch_topk_encode,
    jumprelu_encode,
    sparse_decode,
    topk_encode,
)

__all__ = [
    "SparseCodes",
    "backend_for",
    "batch_topk_encode",
    "jumprelu_encode",
    "sparse_decode",
    "topk_encode",
    "use_triton",
]
