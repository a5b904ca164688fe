"""Reading one dictionary from a folder, local or on the Hub, in any format saekit knows.

A folder answers three questions (which files and sub-folders it has, and a local path for one
file), so the same steps serve a local directory and a Hub repository: read the config, pick the
format, plan the files it needs, check their sizes against the config, fetch only those, convert.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .errors import FormatError
from .formats import CONFIG_FILES, Converted, DictionaryFormat, identify
from .safety import check_config_size, check_size, join_inside, read_config


class Folder(Protocol):
    @property
    def listing_complete(self) -> bool:
        """False when :meth:`files` may miss files that exist (a Hub folder read from the cache)."""
        ...

    def files(self) -> dict[str, int | None]:
        """Names of the files directly in the folder -> size in bytes (None when unknown)."""
        ...

    def subfolders(self) -> list[str]: ...

    def fetch(self, name: str) -> Path:
        """A local path of the file ``name`` of this folder (downloaded if needed)."""
        ...

    def describe(self) -> str: ...

    def revision_id(self) -> str | None:
        """The commit the files come from (None for a local folder)."""
        ...

    def path(self) -> str:
        """The folder, for provenance: inside its repository, or on disk."""
        ...


@dataclass(frozen=True)
class LocalFolder:
    root: Path
    listing_complete: bool = True

    def files(self) -> dict[str, int | None]:
        if not self.root.is_dir():
            raise FileNotFoundError(f"no dictionary folder at {self.root}")
        return {p.name: p.stat().st_size for p in sorted(self.root.iterdir()) if p.is_file()}

    def subfolders(self) -> list[str]:
        return sorted(
            p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")
        )

    def fetch(self, name: str) -> Path:
        return join_inside(self.root, name, "file name")

    def describe(self) -> str:
        return str(self.root)

    def revision_id(self) -> str | None:
        return None

    def path(self) -> str:
        return str(self.root)


def read_folder(
    folder: Folder,
    *,
    format: str | None = None,
    weights_file: str | None = None,
    allow_pickle: bool = False,
    hookpoint_hint: str = "hookpoint",
) -> tuple[Converted, DictionaryFormat]:
    """Convert the dictionary in ``folder``; only the files its format needs are fetched.

    ``hookpoint_hint`` names the argument that picks a sub-folder, for the message shown when the
    folder holds several dictionaries rather than one.
    """
    where = folder.describe()
    names = folder.files()
    configs, paths = {}, {}
    for name in CONFIG_FILES:
        if name in names:
            check_config_size(names[name], f"{where}/{name}")
            paths[name] = folder.fetch(name)
            configs[name] = read_config(paths[name])
    if not configs:
        subfolders = folder.subfolders()
        hint = (
            f" It has sub-folders, one per dictionary: pick one with {hookpoint_hint} "
            f"(one of: {', '.join(subfolders[:20])}{' ...' if len(subfolders) > 20 else ''})."
            if subfolders
            else ""
        )
        raise FormatError(
            f"{where} holds no dictionary config ({' or '.join(CONFIG_FILES)}).{hint}"
        )
    fmt = identify(configs, where, format)
    config = configs[fmt.config_file]
    plan = fmt.plan(config, names, weights_file)
    for name in plan.required:
        if name not in names:
            if folder.listing_complete:
                raise FormatError(
                    f"{where} has {fmt.config_file} of a {fmt.library} dictionary but no {name}"
                )
            folder.fetch(name)  # offline: says which file the cache lacks and what to do
    wanted = [name for name in plan.required if name != fmt.config_file]
    wanted += [name for name in plan.optional if name in names]
    for name in wanted:  # before downloading anything large
        check_size(names.get(name), plan.numel, f"{where}/{name}")
    paths = {fmt.config_file: paths[fmt.config_file]}
    for name in wanted:
        paths[name] = folder.fetch(name)
        check_size(paths[name].stat().st_size, plan.numel, str(paths[name]))
    return fmt.convert(config, paths, allow_pickle, where), fmt
