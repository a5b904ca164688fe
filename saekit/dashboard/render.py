"""The dashboard's HTML: an index of latents and one page per latent, written as static files.

Everything a page needs is on disk beside it: the stylesheet and script are copied from the
package, the index's data is a script file (``data/index.js``, loaded with a ``<script>`` tag,
which browsers allow from ``file://`` where ``fetch`` is refused), thumbnails are PNG files, and
histograms are inline SVG. Nothing is fetched from the network.
"""

from __future__ import annotations

import html
import json
import math
import shutil
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from .._io import atomic_write_bytes

ASSETS = ("dashboard.css", "dashboard.js")
INDEX_COLUMNS = (
    "id",
    "thumb",
    "density",
    "max",
    "mean",
    "inputs",
    "best",
    "auroc",
    "words",
    "page",
)


@dataclass
class ExampleCard:
    """One input shown on a latent page."""

    sample: int
    value: float
    """The latent's activation on the input (max over its positions)."""
    text: str
    """The input's prompt, caption or file name."""
    thumb: str | None = None
    """Path of its thumbnail, relative to the site root."""
    heat: tuple[int, int, list[float]] | None = None
    """``(rows, columns, values)`` of the heatmap over the image."""
    tokens: list[tuple[str, float]] | None = None
    """``(token, activation)`` at each text position."""
    note: str = ""
    """Extra facts (the CLS token's activation, ...)."""


@dataclass
class SteeringView:
    prompt: str
    multipliers: list[float]
    strengths: list[float]
    seeds: list[int]
    images: list[list[str]]
    """``images[i][j]``: path (relative to the site root) at strength i and seed j."""


@dataclass
class LatentPage:
    """Everything one latent's page shows."""

    latent: int
    density: float
    fires: int
    inputs: int
    max_activation: float
    mean_activation: float
    histogram: tuple[list[float], list[int]]
    """(bin edges, counts) of a uniform sample of its activations."""
    top: list[ExampleCard] = field(default_factory=list)
    bands: list[tuple[float, float, list[ExampleCard]]] = field(default_factory=list)
    factors: list[tuple[str, float, float]] = field(default_factory=list)
    """(value name, AUROC, best F1), best first."""
    words: list[tuple[str, float]] = field(default_factory=list)
    steering: SteeringView | None = None


@dataclass
class SiteMeta:
    title: str
    facts: list[tuple[str, str]]
    """(label, value) pairs shown at the top of the index."""
    d_sae: int
    layout: str
    """What the heatmaps show (e.g. ``8 x 8 patch grid after a CLS token``)."""


def page_name(latent: int, d_sae: int) -> str:
    return f"latents/{latent:0{len(str(max(d_sae - 1, 1)))}d}.html"


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _number(value: float, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if value != 0 and abs(value) < 10**-digits:
        return f"{value:.2e}"
    return f"{value:.{digits}f}"


def _document(title: str, body: str, *, depth: int, scripts: tuple[str, ...] = ()) -> str:
    up = "../" * depth
    tags = "".join(f'<script src="{up}{s}"></script>' for s in (*scripts, "assets/dashboard.js"))
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title>"
        f'<link rel="stylesheet" href="{up}assets/dashboard.css">'
        f"{tags}</head><body>{body}</body></html>\n"
    )


def _histogram_svg(
    edges: list[float], counts: list[int], width: int = 380, height: int = 120
) -> str:
    if not counts or max(counts) == 0:
        return '<p class="muted">never active</p>'
    top = max(counts)
    bar = (width - 40) / len(counts)
    bars = []
    for i, count in enumerate(counts):
        h = (height - 28) * count / top
        bars.append(
            f'<rect x="{30 + i * bar:.1f}" y="{height - 18 - h:.1f}" width="{max(bar - 1, 1):.1f}" '
            f'height="{h:.1f}"><title>{_number(edges[i])}–{_number(edges[i + 1])}: {count}</title></rect>'
        )
    axis = (
        f'<text x="30" y="{height - 4}">{_number(edges[0], 2)}</text>'
        f'<text x="{width - 10}" y="{height - 4}" text-anchor="end">{_number(edges[-1], 2)}</text>'
        f'<text x="26" y="12" text-anchor="end">{top}</text>'
    )
    return (
        f'<svg class="hist" width="{width}" height="{height}" role="img" '
        f'aria-label="activation histogram">{"".join(bars)}{axis}</svg>'
    )


def _card(card: ExampleCard, up: str) -> str:
    caption = f"<figcaption><b>{_number(card.value)}</b> · #{card.sample}"
    caption += f" · {_e(card.text)}" if card.text else ""
    caption += f" · {_e(card.note)}" if card.note else ""
    caption += "</figcaption>"
    if card.tokens is not None:
        top = max((v for _, v in card.tokens), default=0.0) or 1.0
        spans = "".join(
            f'<span style="background: rgba(217, 72, 15, {min(1.0, max(0.0, v / top)) * 0.85:.2f})"'
            f' title="{_number(v)}">{_e(token)}</span> '
            for token, v in card.tokens
        )
        return f'<figure class="card text"><p class="tokens">{spans}</p>{caption}</figure>'
    inner = ""
    if card.thumb:
        inner += f'<img src="{up}{_e(card.thumb)}" alt="input {card.sample}">'
    if card.heat is not None:
        rows, cols, values = card.heat
        inner += (
            f'<canvas class="heat" data-h="{rows}" data-w="{cols}" '
            f'data-v="{",".join(f"{v:g}" for v in values)}"></canvas>'
        )
    klass = "thumb" if card.thumb else "thumb plain"
    return f'<figure class="card"><div class="{klass}">{inner}</div>{caption}</figure>'


def latent_html(page: LatentPage, meta: SiteMeta) -> str:
    up = "../"
    prev_link = (
        f'<a href="{up}{page_name(page.latent - 1, meta.d_sae)}">← {page.latent - 1}</a>'
        if page.latent > 0
        else ""
    )
    next_link = (
        f'<a href="{up}{page_name(page.latent + 1, meta.d_sae)}">{page.latent + 1} →</a>'
        if page.latent + 1 < meta.d_sae
        else ""
    )
    stats = "".join(
        f'<div class="stat"><div class="label">{label}</div><div class="value">{value}</div></div>'
        for label, value in (
            ("density", f"{page.density:.3e}"),
            ("rows active", f"{page.fires:,}"),
            ("inputs active", f"{page.inputs:,}"),
            ("max activation", _number(page.max_activation)),
            ("mean when active", _number(page.mean_activation)),
        )
    )
    factors = (
        '<table class="plain"><tr><th>value</th><th class="num">AUROC</th>'
        '<th class="num">best F1</th></tr>'
        + "".join(
            f'<tr><td>{_e(n)}</td><td class="num">{_number(a)}</td>'
            f'<td class="num">{_number(f)}</td></tr>'
            for n, a, f in page.factors
        )
        + "</table>"
        if page.factors
        else '<p class="muted">no factor labels</p>'
    )
    words = (
        '<div class="words">'
        + "".join(f"<span>{_e(w)}<small>{c:.2f}</small></span>" for w, c in page.words)
        + "</div>"
        if page.words
        else '<p class="muted">no vocabulary (CLIP models only)</p>'
    )
    top = "".join(_card(c, up) for c in page.top) or '<p class="muted">never active</p>'
    bands = "".join(
        f'<h3 class="band">activation {_number(lo)} – {_number(hi)}</h3><div class="cards">'
        + "".join(_card(c, up) for c in cards)
        + "</div>"
        for lo, hi, cards in page.bands
    )
    steering = ""
    if page.steering is not None:
        s = page.steering
        head = "<tr><th></th>" + "".join(f"<th>seed {seed}</th>" for seed in s.seeds) + "</tr>"
        rows = "".join(
            f"<tr><th>×{m:g} ({_number(strength, 2)})</th>"
            + "".join(
                f'<td><img src="{up}{_e(path)}" alt="strength {m:g}, seed {seed}"></td>'
                for path, seed in zip(paths, s.seeds, strict=True)
            )
            + "</tr>"
            for m, strength, paths in zip(s.multipliers, s.strengths, s.images, strict=True)
        )
        steering = (
            '<section class="panel" id="steering"><h2>Steering preview</h2>'
            f'<p class="muted">“{_e(s.prompt)}” with the decoder direction added at the hookpoint, '
            "in multiples of the latent's max activation</p>"
            f'<table class="steer">{head}{rows}</table></section>'
        )
    body = (
        f'<header class="top"><h1>Latent {page.latent}</h1>'
        f'<span class="sub">{_e(meta.title)}</span>'
        f'<a href="{up}index.html">index</a>{prev_link}{next_link}</header><main>'
        f'<section class="panel"><div class="stats">{stats}</div></section>'
        '<div class="columns">'
        f'<section class="panel"><h2>Activation histogram</h2>'
        f"{_histogram_svg(*page.histogram)}</section>"
        f'<section class="panel"><h2>Factors</h2>{factors}</section>'
        f'<section class="panel"><h2>Nearest words</h2>{words}</section>'
        "</div>"
        f'<section class="panel" id="top"><h2>Top activations</h2>'
        f'<p class="muted">{_e(meta.layout)}</p><div class="cards">{top}</div></section>'
        f'<section class="panel" id="quantiles"><h2>Across activation quantiles</h2>'
        f"{bands or '<p class=muted>never active</p>'}</section>"
        f"{steering}</main>"
    )
    return _document(f"Latent {page.latent} · {meta.title}", body, depth=1)


def index_html(meta: SiteMeta) -> str:
    facts = "".join(
        f'<div class="stat"><div class="label">{_e(k)}</div><div class="value">{_e(v)}</div></div>'
        for k, v in meta.facts
    )
    headers = (
        ("id", "latent", "num"),
        (None, "top input", ""),
        ("density", "density", "num"),
        ("max", "max act.", "num"),
        ("mean", "mean act.", "num"),
        ("inputs", "inputs", "num"),
        ("best", "best factor", ""),
        ("auroc", "AUROC", "num"),
        ("words", "nearest words", ""),
    )
    head = "".join(
        f'<th data-key="{key}" class="{klass}">{label}</th>' if key else f"<th>{label}</th>"
        for key, label, klass in headers
    )
    body = (
        f'<header class="top"><h1>{_e(meta.title)}</h1>'
        '<span class="sub">saekit dashboard</span></header><main>'
        f'<section class="panel"><div class="stats">{facts}</div></section>'
        '<section class="panel"><div class="controls">'
        '<input type="search" id="filter" placeholder="filter: latent, factor, word">'
        '<label><input type="checkbox" id="live-only"> live latents only</label>'
        '<nav class="pager"><button id="prev">previous</button><span id="page-info"></span>'
        '<button id="next">next</button></nav></div>'
        f'<table id="latents"><thead><tr>{head}</tr></thead><tbody></tbody></table>'
        "</section></main>"
    )
    return _document(meta.title, body, depth=0, scripts=("data/index.js",))


def index_script(rows: list[list[Any]], meta: SiteMeta) -> str:
    """``data/index.js``: the index's data as a script (JSON cannot be fetched from file://)."""

    def clean(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        return value

    payload = {
        "title": meta.title,
        "columns": list(INDEX_COLUMNS),
        "latents": [[clean(v) for v in row] for row in rows],
    }
    # </script> cannot appear in JSON text produced for our data, but escape "<" anyway.
    text = json.dumps(payload, separators=(",", ":")).replace("<", "\\u003c")
    return f"window.SAEKIT_INDEX = {text};\n"


def write_assets(root: Path) -> None:
    """Copy the stylesheet and script into ``root/assets``."""
    (root / "assets").mkdir(parents=True, exist_ok=True)
    package = resources.files(__package__).joinpath("assets")
    for name in ASSETS:
        with resources.as_file(package.joinpath(name)) as source:
            shutil.copyfile(source, root / "assets" / name)


def write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))
