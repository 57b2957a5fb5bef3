"""`hierui report RUN_DIR`: a `hierui batch` output as one self-contained HTML page, the paper's argument.

    data       engine.runs (load_run, spec_rows, cum_kl_curves, first_divergences, choice_rows)
    page       templates/report.html.j2, rendered by Jinja2 with autoescape: the claim in three sentences,
               then one section per step of the argument (ids SECTION_IDS), each with a one-line reading
               guide, a table and an inline SVG chart (hierui.report_charts); a part without data says so
    numbers    hierui.format.metric, the same digits as the explorer and `hierui show`

The page is the same, byte for byte, for the same run folder: it carries no wall-clock time unless asked
(`stamp`, `hierui report --stamp`). Torch is never imported: the report reads files only.
"""

from __future__ import annotations

import time
from functools import cache
from pathlib import Path

from engine.errors import HieruiError
from engine.paths import atomic_write
from engine.runs import RunData, basis_mode, choice_rows, cum_kl_curves, first_divergences, load_run, spec_rows
from hierui.format import MISSING, metric
from hierui.tokentext import escape

SECTION_IDS = ("hierarchy", "kl-theory", "amplification", "accumulation", "first-divergence", "multiple-choice")

# engine.runs.spec_rows()'s fields and their short headings
ROW_FIELDS = {
    "spec": "spec",
    "sparsity": "sparsity",
    "runs": "runs",
    "emb_cos": "hidden cos",
    "logit_cos": "logit cos",
    "prob_cos": "prob cos",
    "kl": "KL",
    "kl_est": "KL est",
    "amp": "amp",
    "top1": "top-1",
    "cum_kl_shared": "cum KL shared",
    "cum_kl_free": "cum KL free",
    "first_div": "1st div",
    "mc_acc_d": "MC acc dense",
    "mc_acc_p": "MC acc pert",
    "mc_sub_kl": "MC sub KL",
}

TEXT_FIELDS = ("spec",)  # printed as text (escaped by hierui.tokentext), every other field by hierui.format


@cache
def environment():
    import jinja2

    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
        autoescape=True,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
    )


def cell(key: str, value) -> str:
    """One value of a table as the page prints it."""
    return escape(value) if key in TEXT_FIELDS else metric(key, value)


def table(columns: list[tuple[str, str]], rows: list[dict]) -> dict:
    """(field, heading) columns over rows → the template's {head, rows} of text."""
    return {
        "head": [title for _, title in columns],
        "rows": [[cell(key, row.get(key)) for key, _ in columns] for row in rows],
    }


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' * (n != 1)}"


def _meta(run: RunData) -> list[str]:
    m = run.manifest
    settings = m.get("settings") or {}
    calib = m.get("calibration") or {}

    def value(d: dict, key: str) -> str:
        return escape(d[key]) if d.get(key) is not None else MISSING

    parts = [
        _plural(run.prompt_count, "generation prompt"),
        _plural(run.item_count, "multiple-choice item"),
        _plural(len(run.specs), "spec"),
        "modes " + (", ".join(m.get("modes") or run.modes) or MISSING),
        f"{value(settings, 'max_new_tokens')} new tokens, T = {value(settings, 'temperature')}, "
        f"{'sampled' if settings.get('sample') else 'greedy'}",
        f"calibration {value(calib, 'samples')}×{value(calib, 'length')} tokens",
    ]
    if m.get("created"):
        parts.append(f"recorded {escape(m['created'])}")
    return parts


def _sections(run: RunData) -> list[dict]:
    from markupsafe import Markup

    from hierui import report_charts as C

    def svg(text: str | None):
        return Markup(text) if text else None

    rows = spec_rows(run)
    basis = basis_mode(run)
    sections = []

    # 1. hierarchy
    s = {
        "id": "hierarchy",
        "title": "1. The hierarchy: hidden states, logits, probabilities",
        "guide": f"Mean cosine similarity dense vs perturbed per space ({basis or 'shared'} mode, mean over steps "
        "and prompts); in the chart lower bars are closer: read how 1 − cos grows from hidden states to "
        "logits to probabilities.",
    }
    if any(r["logit_cos"] is not None for r in rows):
        if basis not in (None, "shared"):
            s["note"] = (
                f"No shared-mode runs in this sweep: the figures come from the {basis}-mode runs, whose "
                "contexts differ once the texts split."
            )
        s["table"] = table(
            [
                ("spec", "spec"),
                ("sparsity", "measured sparsity"),
                ("emb_cos", "hidden cos (final layer)"),
                ("logit_cos", "logit cos"),
                ("prob_cos", "prob cos"),
                ("kl", "KL"),
                ("tv", "TV"),
                ("top1", "top-1 agree"),
            ],
            rows,
        )
        s["chart"] = svg(C.chart_hierarchy(rows))
    else:
        s["nodata"] = "No generation runs in this sweep: nothing to compare across the three spaces."
    sections.append(s)

    # 2. KL and its theory estimate
    s = {
        "id": "kl-theory",
        "title": "2. KL and its second-order estimate",
        "guide": "The measured KL(P_d ‖ P_p) beside the theory Var_{i~p}(Δz_i)/2T²: points near the diagonal mean "
        "the logit deviation alone explains the probability divergence.",
    }
    if any(r["kl"] is not None for r in rows):
        s["table"] = table(
            [
                ("spec", "spec"),
                ("kl", "KL measured"),
                ("kl_est", "KL est Var_p(Δz)/2T²"),
                ("prob_cos", "prob cos"),
                ("prob_cos_est", "prob cos est"),
            ],
            rows,
        )
        s["chart"] = svg(C.chart_kl_theory(rows))
    else:
        s["nodata"] = "No generation runs in this sweep: no KL to compare with its estimate."
    sections.append(s)

    # 3. amplification
    s = {
        "id": "amplification",
        "title": "3. Amplification by the softmax",
        "guide": "amp = (1 − cos p) / (1 − cos z) per step, averaged: how much larger the deviation is in "
        "probability space than in logit space (the dashed line is 1, no amplification).",
    }
    if any(r["amp"] is not None for r in rows):
        s["table"] = table(
            [("spec", "spec"), ("logit_cos", "logit cos"), ("prob_cos", "prob cos"), ("amp", "amp (mean per step)")],
            rows,
        )
        s["chart"] = svg(C.chart_amplification(rows))
    else:
        s["nodata"] = "No amplification factor recorded (no generation runs, or logits identical at every step)."
    sections.append(s)

    # 4. accumulation
    curves = cum_kl_curves(run)
    s = {
        "id": "accumulation",
        "title": "4. Divergence accumulates over generation steps",
        "guide": "Accumulated KL Σ KL(step) against the step, mean over prompts per spec: solid lines are shared "
        "mode (same context, the local effect), dashed free mode (each model its own text).",
    }
    if curves:
        s["table"] = table(
            [("spec", "spec"), ("cum_kl_shared", "cum KL, shared (final)"), ("cum_kl_free", "cum KL, free (final)")],
            rows,
        )
        s["chart"] = svg(C.chart_accumulation(curves, run.specs))
    else:
        s["nodata"] = "No generation steps in this sweep: nothing accumulates."
    sections.append(s)

    # 5. first divergence
    groups = first_divergences(run)
    s = {
        "id": "first-divergence",
        "title": "5. Where the generated texts split",
        "guide": "Free mode: the first step at which the perturbed model picks another token than the dense one, "
        "per run (box: quartiles; runs that never split are counted in the table).",
    }
    if groups:
        s["table"] = table(
            [
                ("spec", "spec"),
                ("runs", "free runs"),
                ("diverged", "texts split"),
                ("median", "median step"),
                ("min", "earliest"),
                ("max", "latest"),
            ],
            groups,
        )
        s["chart"] = svg(C.chart_first_divergence(groups))
        if s["chart"] is None:
            s["nodata"] = "In no free-mode run did the two texts differ within the recorded steps."
    else:
        s["nodata"] = "No free-mode runs in this sweep (add --mode free): no first-divergence step to show."
    sections.append(s)

    # 6. multiple choice
    mc = choice_rows(run)
    s = {
        "id": "multiple-choice",
        "title": "6. Multiple choice stays stable",
        "guide": "Accuracy of the dense and the perturbed model on the same items, and the divergence they see "
        "over the few candidate answers, beside the divergence of generation under the same spec.",
    }
    if mc:
        s["table"] = table(
            [
                ("spec", "spec"),
                ("items", "items"),
                ("acc_d", "acc dense"),
                ("acc_p", "acc perturbed"),
                ("agree", "same choice"),
                ("sub_kl", "KL over choices"),
                ("kl", "full KL at answer"),
                ("gen_kl", "generation KL/step"),
                ("gen_cum_kl", "generation cum KL"),
            ],
            mc,
        )
        s["chart"] = svg(C.chart_choices(mc))
    else:
        s["nodata"] = (
            'No multiple-choice items in this sweep (JSONL items with "choices" and "answer", e.g. '
            "suite:mc in a recipe): nothing to set against generation."
        )
    sections.append(s)

    assert tuple(s["id"] for s in sections) == SECTION_IDS
    return [{"note": None, "table": None, "chart": None, "nodata": None, **s} for s in sections]


def render_html(run: RunData, stamp: str | None = None) -> str:
    """The page for `run`; `stamp` (a time, as text) goes into the footer when given."""
    title = f"hierui report — {run.recipe.get('name') or run.path.name}"
    files = ["batch.json", "summary.parquet", "steps.parquet"] + (["mc_summary.parquet"] if run.mc_summary else [])
    return (
        environment()
        .get_template("report.html.j2")
        .render(
            title=title,
            model=escape(run.manifest.get("model") or MISSING),
            meta=_meta(run),
            description=run.recipe.get("description"),
            sections=_sections(run),
            source=str(run.path),
            stamp=stamp,
            files=files,
        )
    )


def write_report(run_dir: str | Path, out: str | Path | None = None, stamp: bool = False) -> Path:
    """Read RUN_DIR and write its report (default RUN_DIR/report.html), whole or not at all; return its path.
    With `stamp`, the footer says when the page was made (and the page then differs from run to run)."""
    run = load_run(run_dir)
    target = Path(out) if out is not None else run.path / "report.html"
    if target.is_dir():
        target = target / "report.html"
    if not target.parent.is_dir():
        raise HieruiError(f"--out {target}: folder {target.parent} does not exist")
    page = render_html(run, time.strftime("%Y-%m-%d %H:%M") if stamp else None)
    return atomic_write(target, page)
