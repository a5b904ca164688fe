"""A folder of a Hugging Face Hub repository, read through ``huggingface_hub``'s own client.

The revision is resolved to a commit once, so every file of a dictionary comes from the same
commit, and that commit is recorded with the dictionary. Files are fetched one by one with
``hf_hub_download`` into the usual cache, so nothing outside the dictionary's folder is
downloaded, a second load reads the cache, and ``HF_HUB_OFFLINE=1`` works from the cache alone.
Tokens come from where the client looks for them (``HF_TOKEN``, the token store of
``hf auth login``); saekit never reads, prints or writes one.
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

from .._optional import require
from .errors import FormatError, NotAvailableError
from .safety import check_name

_COMMIT = re.compile(r"^[0-9a-f]{40}$")
REPO_TYPE = "model"


@functools.cache
def hub() -> SimpleNamespace:
    """The parts of ``huggingface_hub`` used here, imported on first use (it is an optional extra)."""
    require("huggingface_hub", "dictionaries on the Hugging Face Hub")
    from huggingface_hub import CommitOperationAdd, HfApi, constants, errors, hf_hub_download
    from huggingface_hub.file_download import repo_folder_name
    from huggingface_hub.hf_api import RepoFolder
    from huggingface_hub.utils import validate_repo_id

    return SimpleNamespace(
        CommitOperationAdd=CommitOperationAdd,
        HfApi=HfApi,
        constants=constants,
        errors=errors,
        hf_hub_download=hf_hub_download,
        repo_folder_name=repo_folder_name,
        RepoFolder=RepoFolder,
        validate_repo_id=validate_repo_id,
    )


def offline() -> bool:
    constants = hub().constants
    is_offline = getattr(constants, "is_offline_mode", None)  # a function since huggingface_hub 1.x
    return bool(is_offline() if is_offline else constants.HF_HUB_OFFLINE)


def check_repo_id(repo_id: str) -> str:
    """``owner/name`` as the Hub accepts it, or a clear error."""
    try:
        hub().validate_repo_id(repo_id)
    except Exception as err:  # HFValidationError
        raise FormatError(f"{repo_id!r} is not a Hub repository id (owner/name): {err}") from err
    if repo_id.count("/") != 1:
        raise FormatError(f"{repo_id!r} is not a Hub repository id: expected owner/name")
    return repo_id


class HubFolder:
    """The folder ``prefix`` of ``repo_id`` at ``revision`` (a branch, tag or commit)."""

    def __init__(
        self,
        repo_id: str,
        prefix: str = "",
        revision: str | None = None,
        cache_dir: str | Path | None = None,
    ) -> None:
        self.repo_id = check_repo_id(repo_id)
        self.prefix = check_name(prefix, "folder") if prefix else ""
        self.revision = revision or "main"
        self.cache_dir = Path(cache_dir or hub().constants.HF_HUB_CACHE)
        self._commit: str | None = None
        self._listing: tuple[dict[str, int | None], list[str]] | None = None

    @property
    def listing_complete(self) -> bool:
        return not offline()  # offline, the listing is what the cache holds

    def describe(self) -> str:
        where = f"{self.repo_id}@{self.revision}"
        return f"{where}/{self.prefix}" if self.prefix else where

    def revision_id(self) -> str | None:
        return self.commit

    def path(self) -> str:
        return self.prefix

    # ------------------------------------------------------------------ resolution and listing

    @property
    def commit(self) -> str:
        """The commit the revision points to (from the Hub, or from the cache when offline)."""
        if self._commit is None:
            if _COMMIT.match(self.revision):
                self._commit = self.revision
            elif offline():
                ref = self._storage() / "refs" / self.revision
                if not ref.is_file():
                    raise NotAvailableError(self._offline_message(f"revision {self.revision!r}"))
                self._commit = ref.read_text().strip()
            else:
                with self._errors():
                    info = (
                        hub()
                        .HfApi()
                        .repo_info(self.repo_id, revision=self.revision, repo_type=REPO_TYPE)
                    )
                self._commit = str(info.sha)
        return self._commit

    def _storage(self) -> Path:
        return self.cache_dir / hub().repo_folder_name(repo_id=self.repo_id, repo_type=REPO_TYPE)

    def _list(self) -> tuple[dict[str, int | None], list[str]]:
        if self._listing is None:
            files: dict[str, int | None] = {}
            folders: list[str] = []
            if offline():
                snapshot = self._storage() / "snapshots" / self.commit
                local = snapshot.joinpath(*self.prefix.split("/")) if self.prefix else snapshot
                if not local.is_dir():
                    folder = f"folder {self.prefix}" if self.prefix else "the repository"
                    raise NotAvailableError(
                        self._offline_message(f"{folder} (revision {self.revision})")
                    )
                for entry in sorted(local.iterdir()):
                    if entry.is_dir():
                        folders.append(entry.name)
                    else:
                        files[entry.name] = entry.stat().st_size
            else:
                api = hub().HfApi()
                with self._errors():
                    for entry in api.list_repo_tree(
                        self.repo_id,
                        path_in_repo=self.prefix or None,
                        revision=self.commit,
                        repo_type=REPO_TYPE,
                    ):
                        name = entry.path.rsplit("/", 1)[-1]
                        if isinstance(entry, hub().RepoFolder):
                            folders.append(name)
                        else:
                            files[name] = entry.size
            self._listing = files, folders
        return self._listing

    def files(self) -> dict[str, int | None]:
        return self._list()[0]

    def subfolders(self) -> list[str]:
        return self._list()[1]

    # ------------------------------------------------------------------ download

    def fetch(self, name: str) -> Path:
        check_name(name, "file name")
        with self._errors(name):
            # By revision name, not commit, so that the cache records the branch for offline use;
            # the commit the file came from is then checked against the one listed.
            path = Path(
                hub().hf_hub_download(
                    self.repo_id,
                    name,
                    subfolder=self.prefix or None,
                    revision=self.revision,
                    repo_type=REPO_TYPE,
                    cache_dir=self.cache_dir,
                )
            )
        if self.commit not in path.parts:
            raise NotAvailableError(
                f"{self.repo_id}@{self.revision} moved to a new commit while its files were being "
                "downloaded; run the command again"
            )
        return path

    def _offline_message(self, what: str) -> str:
        return (
            f"{what} of {self.repo_id} is not in the local Hugging Face cache ({self.cache_dir}), "
            "and HF_HUB_OFFLINE is set, so it cannot be downloaded. Run "
            "the same command once with network access (unset HF_HUB_OFFLINE) to cache it, or copy "
            "the dictionary's files to a folder and load that folder instead."
        )

    def _errors(self, name: str | None = None) -> contextlib.AbstractContextManager[None]:
        what = (
            f"{self.prefix}/{name}"
            if name and self.prefix
            else (name or self.prefix or "repository")
        )
        offline_message = (
            self._offline_message(f"file {what} (revision {self.revision})") if name else None
        )
        return hub_errors(self.repo_id, self.revision, what, offline_message, self.cache_dir)


@contextlib.contextmanager
def hub_errors(
    repo_id: str,
    revision: str | None,
    what: str,
    offline_message: str | None = None,
    cache_dir: Path | None = None,
) -> Iterator[None]:
    """Turn the client's exceptions into saekit errors that say what to do."""
    errors = hub().errors
    try:
        yield
    except errors.GatedRepoError as err:
        raise NotAvailableError(
            f"{repo_id} is gated: accept its conditions on the Hub, then log in "
            "(`hf auth login` or HF_TOKEN) with the account that did"
        ) from err
    except errors.RepositoryNotFoundError as err:
        raise NotAvailableError(
            f"no model repository {repo_id} on the Hub, or no access to it (if it is private, "
            "log in with `hf auth login` or set HF_TOKEN)"
        ) from err
    except errors.RevisionNotFoundError as err:
        raise NotAvailableError(f"{repo_id} has no revision {revision!r}") from err
    # LocalEntryNotFoundError is an EntryNotFoundError too: it goes first.
    except errors.LocalEntryNotFoundError as err:
        if offline() and offline_message:
            raise NotAvailableError(offline_message) from err
        raise NotAvailableError(
            f"could not reach the Hub for {what} of {repo_id}, and it is not in the local cache"
            f"{f' ({cache_dir})' if cache_dir else ''}: check the network connection and try again"
        ) from err
    except errors.EntryNotFoundError as err:
        raise NotAvailableError(f"{repo_id}@{revision or 'main'} has no {what}") from err
    except errors.HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else None
        advice = (
            ": log in with `hf auth login` or set HF_TOKEN to a token that may write to it"
            if status in (401, 403)
            else ""
        )
        raise NotAvailableError(
            f"the Hub answered HTTP {status} for {what} of {repo_id}{advice} "
            f"({str(err).splitlines()[0]})"
        ) from err
    except unreachable() as err:  # no answer at all: DNS, refused connection, timeout
        detail = (str(err).splitlines() or [type(err).__name__])[0]
        raise NotAvailableError(
            f"could not reach the Hugging Face Hub to look up {repo_id} ({detail}): check the "
            "network connection, or set HF_HUB_OFFLINE=1 to use only the local cache"
        ) from err


def unreachable() -> tuple[type[BaseException], ...]:
    """The client's transport failures: the HTTP library's base error (httpx's, or requests' in
    older clients; huggingface_hub re-exports it as ``errors.HTTPError``) and the builtin ones."""
    found: list[type[BaseException]] = [ConnectionError, TimeoutError]
    base = getattr(hub().errors, "HTTPError", None)
    if isinstance(base, type) and issubclass(base, BaseException):
        found.append(base)
    try:
        from requests import RequestException
    except ImportError:
        pass
    else:
        found.append(RequestException)
    return tuple(found)
