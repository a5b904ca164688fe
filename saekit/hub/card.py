"""Model cards: ``MODEL_CARD.md`` filled in for the dictionaries of one repository.

The template is ``MODEL_CARD.md`` (at the repository root, and shipped in the package beside this
module so an installed saekit renders the same card). Its ``${name}`` placeholders are filled
with Python's ``string.Template``: the model and revision, each dictionary's hookpoint and capture
target, the training data and configuration from the run's records, and the metrics from training
and from ``saekit eval``'s report; ``library_name: saekit`` goes in the YAML front matter, which the
Hub reads.
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import yaml

from ..dictionaries import SAEConfig

TEMPLATE_FILE = "MODEL_CARD.md"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
CAPTURES = {
    "output": "the module's output",
    "input": "the module's input",
    "update": "the module's update to its input (output - input)",
}


@dataclass(frozen=True)
class CardEntry:
    """One dictionary as the card shows it."""

    folder: str
    cfg: SAEConfig
    training: Mapping[str, Any] = field(default_factory=dict)
    """The ``training`` record of its cfg.json (the trainer's settings, steps, tokens, or where an
    imported dictionary came from)."""
    metrics: Mapping[str, Any] = field(default_factory=dict)
    """The metrics of its cfg.json (end of training) and of the eval report, by name."""


def template() -> str:
    return resources.files(__package__).joinpath(TEMPLATE_FILE).read_text()


def _cell(value: Any) -> str:
    text = f"{value:.4g}" if isinstance(value, float) else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: Iterable[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _scalars(record: Mapping[str, Any], prefix: str = "", depth: int = 2) -> dict[str, Any]:
    """The numbers of a (nested) metrics record, as ``a.b`` -> value; lists (histograms) are left out."""
    out: dict[str, Any] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, (int, float)):
            out[name] = value
        elif isinstance(value, Mapping) and depth > 1:
            out |= _scalars(value, f"{name}.", depth - 1)
    return out


def _yaml_block(record: Mapping[str, Any]) -> str:
    return "```yaml\n" + yaml.safe_dump(dict(record), sort_keys=False, width=100).rstrip() + "\n```"


def render_card(
    repo_id: str,
    entries: list[CardEntry],
    data: Mapping[str, Any] | None = None,
    text: str | None = None,
) -> str:
    """The README of a repository holding ``entries``; ``data`` is the run's data settings."""
    if not entries:
        raise ValueError("a model card needs at least one dictionary")
    models = list(dict.fromkeys(e.cfg.model or "an unrecorded model" for e in entries))
    front = {
        "library_name": "saekit",
        "tags": ["saekit", "sparse-autoencoder", "interpretability"],
    }
    base_models = [m for m in models if _HUB_ID.match(m)]
    if base_models:
        front["base_model"] = base_models
    first = entries[0]

    dictionaries = _table(
        ["folder", "architecture", "d_in", "latents", "k", "hookpoint", "capture"],
        (
            [
                e.folder,
                e.cfg.architecture
                + (f" (trained as {e.cfg.trained_as})" if e.cfg.trained_as else ""),
                e.cfg.d_in,
                e.cfg.d_sae,
                e.cfg.k if e.cfg.architecture == "topk" else "-",
                f"`{e.cfg.hookpoint}`" if e.cfg.hookpoint else "not recorded",
                e.cfg.capture,
            ]
            for e in entries
        ),
    )

    model_lines = []
    for model in models:
        group = [e for e in entries if (e.cfg.model or "an unrecorded model") == model]
        revisions = sorted({e.cfg.model_revision or "not recorded" for e in group})
        model_lines.append(f"- Model: `{model}`, revision: {', '.join(revisions)}")
        for e in group:
            where = (
                f"`{e.cfg.hookpoint}`" if e.cfg.hookpoint else "a hookpoint that was not recorded"
            )
            model_lines.append(
                f"  - `{e.folder}` reads {where}: {CAPTURES[e.cfg.capture]}, one row per token or position"
            )

    data_block = _yaml_block({k: v for k, v in data.items() if v is not None}) if data else ""
    data_lines = []
    for e in entries:
        imported = e.training.get("imported")
        if isinstance(imported, Mapping):
            origin = imported.get("repo_id") or imported.get("source")
            at = f" at commit {imported['revision']}" if imported.get("revision") else ""
            data_lines.append(
                f"- `{e.folder}` was imported from {imported.get('library', 'another library')} "
                f"(`{origin}`{at}); its training data is documented by that release."
            )
        elif "tokens" in e.training:
            data_lines.append(
                f"- `{e.folder}`: {e.training['tokens']} activation rows, {e.training.get('steps')} steps"
            )
    data_section = (
        "\n\n".join(p for p in (data_block, "\n".join(data_lines)) if p) or "Not recorded."
    )

    training_lines = []
    for e in entries:
        settings = {k: v for k, v in e.training.items() if k != "imported"}
        if settings:
            training_lines.append(f"`{e.folder}`:\n\n{_yaml_block(settings)}")
    training_section = (
        "\n\n".join(training_lines) or "Not recorded (the dictionaries were not trained by saekit)."
    )

    metric_rows = [
        [e.folder, name, value] for e in entries for name, value in _scalars(e.metrics).items()
    ]
    metrics_section = (
        _table(["folder", "metric", "value"], metric_rows)
        if metric_rows
        else "No metrics recorded. Run `saekit eval` and push again with `--eval_report`."
    )

    title = (
        f"Sparse autoencoders for {models[0]}"
        if len(models) == 1
        else f"Sparse autoencoders: {repo_id}"
    )
    return string.Template(text if text is not None else template()).substitute(
        front_matter=yaml.safe_dump(front, sort_keys=False).rstrip(),
        title=title,
        model=", ".join(models),
        repo_id=repo_id,
        first_folder=first.folder,
        first_d_in=first.cfg.d_in,
        dictionaries=dictionaries,
        model_section="\n".join(model_lines),
        data_section=data_section,
        training_section=training_section,
        metrics_section=metrics_section,
    )
