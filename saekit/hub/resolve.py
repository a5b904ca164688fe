"""Local path or Hub repository: the one place that decides where a source the user typed lives.

A source is a local path first (diffusers' order). A path that does not exist goes to the Hub only
when it can be nothing but a repository id: ``owner/name`` with exactly one slash, the Hub's
characters, no file suffix (``pk/c.pt`` is a file name), and no local folder called ``owner``
(``runs/my-sae`` with ``runs/`` present is a run that is missing, not a repository). Anything else
is named as a missing local path in one line: sending it to the Hub would leak the user's local
path names and, offline, end in a connection traceback instead of saying what is wrong.
"""

from __future__ import annotations

import re
from pathlib import Path

from .errors import NotAvailableError

# The Hub's repository ids (huggingface_hub's validate_repo_id): letters, digits, ``-``, ``_``,
# ``.``; neither end is punctuation; at most 96 characters a part; no ``--`` or ``..``.
_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
_REPO_ID = re.compile(rf"^{_PART}/{_PART}$")

# Endings that make a name a file, never a repository (repository names may hold dots: "Llama-3.1").
FILE_SUFFIXES = frozenset(
    {
        ".pt",
        ".pth",
        ".bin",
        ".ckpt",
        ".safetensors",
        ".gguf",
        ".npy",
        ".npz",
        ".pkl",
        ".json",
        ".jsonl",
        ".yaml",
        ".yml",
        ".txt",
        ".git",
    }
)


def hub_repo_id(source: str) -> str:
    """``source`` as a Hub repository id, or a one-line error naming it as a missing local path.

    Call only for a source that exists neither locally nor as a release name.
    """
    reason = _not_a_repo_id(source)
    if reason:
        raise NotAvailableError(
            f"{source!r} is not a local folder, a known release, or a Hub repository id "
            f"(owner/name): {reason}. Check the path; known releases: saekit pull --list"
        )
    return source


def _not_a_repo_id(source: str) -> str | None:
    """Why ``source`` cannot be a repository id (None when it is one)."""
    if source.startswith(("/", "~", ".")) or "\\" in source:
        return "there is no such path"
    if source.count("/") != 1:
        return "there is no such path, and a repository id has exactly one slash"
    owner, name = source.split("/")
    suffix = Path(name).suffix.lower()
    if suffix in FILE_SUFFIXES:
        return f"there is no such file, and a name ending in {suffix} is a file, not a repository"
    if Path(owner).is_dir():
        return f"{owner}/ is a folder here and has no {name}"
    if not _REPO_ID.match(source) or "--" in source or ".." in source:
        return "there is no such path, and it holds characters a repository id cannot have"
    return None
