"""The registry of known multimodal dictionary releases (``releases.yaml``, shipped in the package).

A release names the repository, its format, the model and the adapter hookpoint each dictionary
belongs to, and what the hook captured, so that ``saekit pull <release> --hookpoint H`` yields a
dictionary whose config says which model and hookpoint it plugs into.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import resources
from typing import Literal

import yaml

from ..configuration import from_dict
from ..dictionaries.config import Capture
from .errors import FormatError
from .formats import FORMATS
from .safety import check_name

REGISTRY_FILE = "releases.yaml"


@dataclass(frozen=True)
class ReleaseDictionary:
    """One dictionary of a release."""

    hookpoint: str
    """The module path that saekit's adapter for the release's model hooks."""
    path: str
    """The folder of this dictionary inside the repository ("" for the repository's root)."""
    repo: str | None = None
    """The repository, when the release keeps each dictionary in its own."""
    d_in: int | None = None
    d_sae: int | None = None

    def __post_init__(self) -> None:
        if self.path:
            check_name(self.path, "release path")


@dataclass(frozen=True)
class Release:
    name: str
    description: str
    format: str
    family: Literal["clip", "diffusion", "vlm"]
    model: str
    capture: Capture
    normalisation: str
    dictionaries: tuple[ReleaseDictionary, ...]
    repo: str | None = None
    revision: str | None = None
    model_revision: str | None = None
    sources: tuple[str, ...] = ()
    unverified: tuple[str, ...] = ()
    """Fields that could not be checked against public material (see ``notes``)."""
    notes: str = ""

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise FormatError(f"release {self.name}: unknown format {self.format!r}")
        for entry in self.dictionaries:
            if not (entry.repo or self.repo):
                raise FormatError(
                    f"release {self.name}: dictionary {entry.hookpoint} has no repository"
                )

    @property
    def hookpoints(self) -> list[str]:
        return [entry.hookpoint for entry in self.dictionaries]

    def dictionary(self, hookpoint: str | None) -> ReleaseDictionary:
        """The dictionary at ``hookpoint`` (the adapter hookpoint or the folder in the repository)."""
        if hookpoint is None and len(self.dictionaries) == 1:
            return self.dictionaries[0]
        for entry in self.dictionaries:
            if hookpoint in (entry.hookpoint, entry.path):
                return entry
        asked = (
            "no hookpoint was given" if hookpoint is None else f"it has no hookpoint {hookpoint!r}"
        )
        raise FormatError(
            f"release {self.name} holds {len(self.dictionaries)} dictionaries and {asked}; pick one "
            f"with --hookpoint: {', '.join(self.hookpoints)}"
        )

    def repo_of(self, entry: ReleaseDictionary) -> str:
        repo = entry.repo or self.repo
        assert repo is not None  # checked in __post_init__
        return repo


@functools.cache
def releases() -> dict[str, Release]:
    """Every release in the shipped registry, by name."""
    text = resources.files(__package__).joinpath(REGISTRY_FILE).read_text()
    raw = yaml.safe_load(text)["releases"]
    return {
        name: from_dict(Release, {"name": name, **fields}, where=f"{REGISTRY_FILE}: {name}")
        for name, fields in raw.items()
    }


def find_release(name: str) -> Release | None:
    return releases().get(name)
