"""``saekit push``: publish a folder of saekit dictionaries to a Hub repository.

Everything to upload is first staged in a temporary folder: one folder per dictionary (its
``cfg.json`` and ``sae.safetensors`` byte for byte, plus ``latent_stats.safetensors`` and
``eval.json`` when present), an ``index.json`` listing exactly those, and a ``README.md`` rendered
from ``MODEL_CARD.md``. A dry run copies that staging folder to the path asked for; a real push
uploads the same files in one commit with ``HfApi.create_commit``. Each dictionary is loaded (and so
fully validated) before anything is staged, so a broken file is never published. The token is
whatever ``huggingface_hub`` finds (``HF_TOKEN`` or ``hf auth login``'s store); saekit never reads,
prints or writes it.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._io import read_json
from ..dictionaries import read_index, write_index
from ..dictionaries.io import CONFIG_FILE, INDEX_FILE, WEIGHTS_FILE
from .card import CardEntry, render_card
from .errors import FormatError, HubError, NotAvailableError
from .formats.native import LATENT_STATS_FILE
from .load import load_pretrained
from .safety import check_name

README_FILE = "README.md"
EVAL_FILE = "eval.json"
RUN_FILE = "run.json"  # written by `saekit train` at the root of its output folder


@dataclass(frozen=True)
class PushResult:
    repo_id: str
    files: tuple[str, ...]
    """The paths in the repository that were (or, for a dry run, would be) uploaded."""
    commit_url: str | None = None
    dry_run_dir: Path | None = None


def dictionary_folders(source: Path) -> dict[str, Path]:
    """The dictionaries of ``source``: itself if it is one, else those its index lists."""
    if (source / CONFIG_FILE).is_file():
        return {check_name(source.resolve().name, "dictionary folder"): source}
    if (source / INDEX_FILE).is_file():
        try:
            entries = read_index(source)
        except ValueError as err:
            raise FormatError(str(err)) from err
        return {check_name(e["path"], "dictionary folder"): source / e["path"] for e in entries}
    raise FormatError(
        f"{source} holds no saekit dictionary (no {CONFIG_FILE}, no {INDEX_FILE}); push the folder "
        "that `saekit train` or `saekit pull` wrote"
    )


def _read_record(path: Path, what: str) -> Any:
    try:
        return read_json(path, what=what)
    except ValueError as err:  # not JSON: say which file
        raise FormatError(str(err)) from err


def _eval_metrics(report: Mapping[str, Any] | None, folder: str, count: int) -> dict[str, Any]:
    """The part of an eval report about ``folder``: its own entry if the report is keyed by
    dictionary, else the whole report when it covers a single dictionary."""
    if not report:
        return {}
    for table in (report, report.get("dictionaries") or {}):
        if isinstance(table, Mapping) and isinstance(table.get(folder), Mapping):
            return dict(table[folder])
    return dict(report) if count == 1 else {}


def stage(
    source: str | Path, repo_id: str, staging: Path, *, eval_report: str | Path | None = None
) -> tuple[str, ...]:
    """Write into ``staging`` exactly the files to upload; return their paths in the repository."""
    source = Path(source)
    folders = dictionary_folders(source)
    report = _read_record(Path(eval_report), "eval report") if eval_report else None
    run = _read_record(source / RUN_FILE, "run record") if (source / RUN_FILE).is_file() else {}
    entries, configs = [], {}
    for name, folder in folders.items():
        try:  # every check saekit's loader makes (latent statistics too), before anything is staged
            pretrained = load_pretrained(folder, format="saekit")
        except HubError as err:
            raise FormatError(f"refusing to publish {folder}: {err}") from err
        cfg, records = pretrained.sae.cfg, pretrained.records
        out = staging / name
        out.mkdir(parents=True)
        for file in (CONFIG_FILE, WEIGHTS_FILE, LATENT_STATS_FILE, EVAL_FILE):
            if (folder / file).is_file():
                shutil.copyfile(folder / file, out / file)
        local_eval = (
            _read_record(folder / EVAL_FILE, "eval report")
            if (folder / EVAL_FILE).is_file()
            else None
        )
        metrics = {
            **(records.get("metrics") or {}),
            **_eval_metrics(local_eval, name, 1),
            **_eval_metrics(report, name, len(folders)),
        }
        entries.append(CardEntry(name, cfg, records.get("training") or {}, metrics))
        configs[name] = cfg
    write_index(staging, configs)
    data = (run.get("config") or {}).get("data") if isinstance(run, dict) else None
    (staging / README_FILE).write_text(render_card(repo_id, entries, data))
    return tuple(
        sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file())
    )


def _count(files: tuple[str, ...]) -> int:
    return len({name.split("/")[0] for name in files if "/" in name})


def push(
    source: str | Path,
    repo_id: str,
    *,
    dry_run: str | Path | None = None,
    revision: str | None = None,
    private: bool = False,
    commit_message: str | None = None,
    eval_report: str | Path | None = None,
) -> PushResult:
    """Publish the dictionaries of ``source`` to ``repo_id`` (or, with ``dry_run``, write there the
    exact files that would be uploaded and upload nothing)."""
    from .remote import check_repo_id, hub, hub_errors, offline

    check_repo_id(repo_id)
    with tempfile.TemporaryDirectory(prefix="saekit-push-") as tmp:
        staging = Path(tmp) / "repo"
        staging.mkdir()
        files = stage(source, repo_id, staging, eval_report=eval_report)
        if dry_run is not None:
            target = Path(dry_run)
            if target.exists() and any(target.iterdir()):
                raise FileExistsError(
                    f"{target} is not empty; choose an empty or new folder for --dry_run"
                )
            shutil.copytree(staging, target, dirs_exist_ok=True)
            return PushResult(repo_id, files, dry_run_dir=target)
        if offline():
            raise NotAvailableError(
                "HF_HUB_OFFLINE is set, so nothing can be uploaded; unset it to push, or pass "
                "--dry_run DIR to see the files that would be uploaded"
            )
        client = hub()
        api = client.HfApi()
        operations = [
            client.CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(staging / name))
            for name in files
        ]
        with hub_errors(repo_id, revision, "the upload"):
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            info = api.create_commit(
                repo_id,
                operations,
                commit_message=commit_message or f"Upload {_count(files)} saekit dictionaries",
                revision=revision,
                repo_type="model",
            )
    return PushResult(repo_id, files, commit_url=str(info.commit_url))
