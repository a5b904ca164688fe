"""The demo's report folder: PNG grids and one self-contained HTML page over ``report.json``.

The page only reads files next to it (no server, no scripts), so it opens from disk and can be
zipped and shared.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..testbed import world

SCALE = 3
"""Upscaling of the 32x32 world images in the grids (nearest neighbour: pixels stay crisp)."""


def save_grid(images: torch.Tensor, path: Path, *, ncols: int | None = None) -> str:
    """Tile ``(N, 3, H, W)`` images in [0, 1] into one PNG; returns its file name."""
    if images.shape[0] == 0:
        images = torch.ones(1, 3, world.IMAGE_SIZE, world.IMAGE_SIZE)
    big = F.interpolate(images.float(), scale_factor=SCALE, mode="nearest")
    grid = world.image_grid(big.clamp(0, 1), ncols=ncols, pad=2 * SCALE)  # (3, H', W')
    (image,) = world.to_pil(grid[None])
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path.name


def _e(value: Any) -> str:
    return html.escape(str(value))


def _number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return _e(value)


def _table(rows: list[dict[str, Any]], *, html_columns: tuple[str, ...] = ()) -> str:
    """An HTML table of ``rows``; values in ``html_columns`` are markup already, the rest are
    escaped (floats to 3 decimals)."""
    if not rows:
        return "<p>(none)</p>"
    head = "".join(f"<th>{_e(k)}</th>" for k in rows[0])
    body = "".join(
        "<tr>"
        + "".join(f"<td>{v if k in html_columns else _number(v)}</td>" for k, v in row.items())
        + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _figure(src: str, caption: str) -> str:
    return f'<figure><img src="{_e(src)}" alt="{_e(caption)}"><figcaption>{_e(caption)}</figcaption></figure>'


def _model_section(title: str, part: dict[str, Any]) -> str:
    recon = part["held_out"]
    factors = part["factors"]
    summary = _table(
        [
            {
                "hookpoint": part["hookpoint"],
                "training rows": part["train_rows"],
                "latents": part["d_sae"],
                "k": part["k"],
                "held-out FVU": recon["fvu"],
                "L0": recon["l0"],
                "dead": recon["dead_fraction"],
                "factor values with a latent at AUROC >= 0.95": f"{factors['values_covered']} / {factors['values_total']}",
            }
        ]
    )
    rows = []
    for name, best in part["best_latents"].items():
        thumbs = best.get("top_inputs_png")
        rows.append(
            {
                "factor value": name,
                "latent": best["latent"],
                "AUROC": best["auroc"],
                "best F1": best["f1"],
                "top inputs": f'<img class="strip" src="{_e(thumbs)}">'
                if thumbs
                else _e("; ".join(best.get("top_prompts", []))),
            }
        )
    figures = "".join(_figure(src, caption) for src, caption in part.get("figures", []))
    return (
        f"<h2>{_e(title)}</h2>{summary}<div class='figs'>{figures}</div>"
        f"<h3>Best-aligned latent per factor value (held-out inputs)</h3>"
        + _table(rows, html_columns=("top inputs",))
    )


STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; vertical-align: middle; }
th { background: #f3f3f3; }
img { image-rendering: pixelated; }
img.strip { height: 40px; }
figure { display: inline-block; margin: 0 1em 1em 0; }
figure img { max-width: 520px; }
code { background: #f5f5f5; padding: 0 3px; }
"""


def write_html(report: dict[str, Any], path: Path) -> Path:
    """``report.html`` next to ``report.json`` and the PNGs it shows."""
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>saekit demo</title><style>{STYLE}</style></head><body>",
        "<h1>saekit demo: sparse autoencoders on the ground-truth testbed</h1>",
        f"<p>{_e(report['machine'])}; {report['seconds']:.0f} s in all. Every figure is in "
        "<code>report.json</code>. The world's factors (shape, colour, size, position, "
        "background) are known for every input, so each latent is scored against each factor "
        "value by AUROC.</p>",
    ]
    inputs = report["inputs"]
    parts.append("<h2>Inputs</h2>")
    parts.append(
        _figure(inputs["grid_png"], "held-out world images (the CLIP image tower's inputs)")
    )
    generation = report.get("generation")
    if generation:
        parts.append(
            _figure(
                generation["grid_png"],
                "the text-to-image model's samples of held-out captions",
            )
        )
        parts.append(
            "<p>Oracle accuracy of those samples (does the image show the prompted value?):</p>"
        )
        parts.append(_table([generation["oracle_accuracy"]]))
    for key, title in (
        ("clip", "Contrastive model (CLIP image tower)"),
        ("denoiser", "Denoiser (UNet mid block)"),
    ):
        if key in report["models"]:
            parts.append(_model_section(title, report["models"][key]))
    steering = report.get("steering")
    if steering:
        parts.append("<h2>Steering and unlearning</h2>")
        for item in steering.get("grids", []):
            parts.append(_figure(item["png"], item["caption"]))
        if steering.get("tables"):
            for name, rows in steering["tables"].items():
                parts.append(f"<h3>{_e(name)}</h3>{_table(rows)}")
    parts.append("</body></html>")
    path.write_text("\n".join(parts))
    return path
