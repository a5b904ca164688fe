"""Pretrained dictionaries: load the formats of other libraries, pull from and push to the Hub.

* :func:`load` / :func:`load_pretrained`: a dictionary from a local folder, a Hub repository or a
  known release, in saekit's, SAELens's, EleutherAI sparsify's (also SAeUron's and lmms-lab's),
  sdxl-unbox's or Prisma's format, converted exactly into saekit's layout.
* :func:`releases`: the registry of known multimodal releases (``releases.yaml``).
* :func:`pull`, :func:`push`, :func:`export_saelens`: what the ``saekit pull``, ``push`` and
  ``export`` commands run.

``huggingface_hub`` (the ``hub`` extra) is imported only when a Hub repository is used.
"""

from __future__ import annotations

from .errors import FormatError, HubError, NotAvailableError, UnsafeInputError
from .load import Origin, Pretrained, load, load_pretrained
from .registry import Release, ReleaseDictionary, find_release, releases

__all__ = [
    "FormatError",
    "HubError",
    "NotAvailableError",
    "Origin",
    "Pretrained",
    "Release",
    "ReleaseDictionary",
    "UnsafeInputError",
    "find_release",
    "load",
    "load_pretrained",
    "releases",
]
