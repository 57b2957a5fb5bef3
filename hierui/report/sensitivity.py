"""The "Sensitivity" section of `hierui report`: a `hierui sensitivity --out` folder (sensitivity.parquet,
sensitivity.json) as one section of the page, or a page of its own for a folder holding nothing else.

    section    the units ranked by damage (the mean KLD of perturbing each alone, its bootstrap interval, the tail,
               top-1 agreement, the perplexity change), a reading naming the most damaging unit, and a heatmap per
               level: layer × sublayer (or × matrix, or one column for whole layers) of the mean KLD
    page       render_html(folder): the page with this section alone
"""

from __future__ import annotations

import json
from pathlib import Path

from engine.errors import HieruiError
from hierui.format import MISSING, count, metric, num, pct
from hierui.tokentext import escape

SECTION_ID = "sensitivity"
TABLE, MANIFEST = "sensitivity.parquet", "sensitivity.json"
SHOWN = 20  # the most damaging rows in the table


def has_sensitivity(folder: str | Path) -> bool:
    return (Path(folder) / TABLE).is_file()


def load(folder: str | Path) -> tuple[list[dict], dict]:
    """(the table's rows, sensitivity.json) of a sensitivity folder; one line where either is unreadable."""
    import pyarrow.parquet as pq

    folder = Path(folder)
    try:
        rows = pq.read_table(folder / TABLE).to_pylist()
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise HieruiError(f"{folder / TABLE} is unreadable ({type(e).__name__}); rerun hierui sensitivity") from None
    if rows and not {"unit", "layer", "level", "kl_mean"} <= set(rows[0]):
        raise HieruiError(f"{folder / TABLE} is not a hierui sensitivity table; rerun hierui sensitivity")
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        manifest = {}
    return rows, manifest if isinstance(manifest, dict) else {}


def part_of(row: dict) -> str:
    """A row's column in the heatmap: its matrix, its sublayer, or 'layer'."""
    return row.get("matrix") or row.get("sublayer") or "layer"


def grids(rows: list[dict]) -> list[dict]:
    """Per level, the layer × part grid of mean KLD (chart_sensitivity_heatmap's input)."""
    out = []
    for level in dict.fromkeys(r["level"] for r in rows):
        mine = [r for r in rows if r["level"] == level]
        layers = sorted({int(r["layer"]) for r in mine})
        parts = list(dict.fromkeys(part_of(r) for r in mine))
        cell = {(int(r["layer"]), part_of(r)): r["kl_mean"] for r in mine}
        values = [[cell.get((layer, p)) for p in parts] for layer in layers]
        out.append({"level": escape(level), "layers": layers, "parts": [escape(p) for p in parts], "values": values})
    return out


def table(rows: list[dict]) -> dict:
    ranked = sorted(rows, key=lambda r: -(r.get("kl_mean") or 0.0))[:SHOWN]
    return {
        "head": ["unit", "level", "weights", "mean KLD [95% CI]", "KLD median", "KLD p99", "same top", "ΔPPL"],
        "rows": [
            [
                escape(r["unit"]),
                escape(r["level"]),
                count(r.get("weights")),
                f"{metric('kl', r.get('kl_mean'))} [{metric('kl', r.get('kl_mean_lo'))}, "
                f"{metric('kl', r.get('kl_mean_hi'))}]",
                metric("kl", r.get("kl_median")),
                metric("kl", r.get("kl_p99")),
                pct(r.get("same_top")),
                num(r.get("ppl_delta")),
            ]
            for r in ranked
        ],
    }


def reading(rows: list[dict]) -> dict | None:
    """Which unit hurts most, and by how much more than the median unit, per level."""
    said = []
    for level in dict.fromkeys(r["level"] for r in rows):
        mine = sorted((r for r in rows if r["level"] == level), key=lambda r: -(r.get("kl_mean") or 0.0))
        if not mine:
            continue
        median = mine[len(mine) // 2].get("kl_mean") or 0.0
        top = mine[0]
        times = f", {top['kl_mean'] / median:.1f}× the median unit's" if median > 0 else ""
        said.append(
            f"at {escape(level)} the most damaging unit is {escape(top['unit'])} (mean KLD "
            f"{metric('kl', top['kl_mean'])}{times})"
        )
    if not said:
        return None
    return {"verdict": "Perturbed alone, " + "; ".join(said) + ".", "details": "", "holds": None}


def section(rows: list[dict], manifest: dict, number: int | None = None) -> dict:
    from markupsafe import Markup

    from hierui.report import charts as C

    where = (
        f"{escape(manifest.get('model') or MISSING)} on {escape(manifest.get('corpus') or MISSING)}, ctx "
        f"{count(manifest.get('ctx'))}, --unit {escape(manifest.get('unit') or MISSING)}"
    )
    chart = C.chart_sensitivity_heatmap(grids(rows)) if rows else None
    return {
        "id": SECTION_ID,
        "title": (f"{number}. " if number is not None else "") + "Sensitivity: one unit perturbed at a time",
        "guide": f"hierui sensitivity ({where}): each unit (a layer, its attention or MLP, or one matrix) takes the "
        "perturbed model's weights while everything else stays dense, and the corpus KLD against the dense model is "
        "measured as hierui kld measures it. Higher: that unit matters more; prune it less.",
        "readings": [x for x in (reading(rows),) if x is not None],
        "note": f"The {SHOWN} most damaging rows; every row is in sensitivity.parquet. Brackets: 95% bootstrap "
        "interval of the mean KLD, whole windows resampled. The heatmap: mean KLD per layer and part, log scale.",
        "table": table(rows) if rows else None,
        "tables": [],
        "chart": Markup(chart) if chart else None,
        "chart2": None,
        "figures": [],
        "nodata": None if rows else "The sensitivity table holds no rows yet: rerun hierui sensitivity into it.",
    }


def render_html(folder: str | Path, stamp: str | None = None) -> str:
    """The page of a sensitivity folder alone."""
    from hierui.report.render import environment

    rows, manifest = load(folder)
    return (
        environment()
        .get_template("report.html.j2")
        .render(
            title=f"hierui report — sensitivity: {escape(manifest.get('model') or MISSING)}",
            model=escape(manifest.get("model") or MISSING),
            meta=[f"spec {escape(manifest.get('spec') or MISSING)}", f"{len(rows)} rows"],
            description=None,
            claim=False,
            sections=[section(rows, manifest)],
            summary=[],
            source=str(folder),
            stamp=stamp,
            files=[TABLE, MANIFEST],
        )
    )
