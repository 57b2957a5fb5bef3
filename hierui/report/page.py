"""`hierui report RUN_DIR`: a `hierui batch` output as one self-contained HTML page, the paper's argument.

    data       engine.results.runs (load_run, spec_rows, cum_kl_curves, first_divergences, choice_rows)
    page       templates/report.html.j2, rendered by Jinja2 with autoescape: the claim under test, what this
               sweep shows of it, then one section per step of the argument (ids SECTION_IDS), each with a
               one-line reading guide, what the run's numbers say, a table and an inline SVG chart
               (hierui.report.charts); a part without data says so
    sections   hierui.report.generation (1–5), choices (6), breaks (7), and hierui.report.kld's section 8 when a
               `hierui kld --out` went into the same folder; their tables through hierui.report.tables
    readings   every sentence that states a pattern is decided from the run's own numbers by the small pure
               functions of hierui.report.readings (*_check: one spec's row → Check; reading: the checks → the
               sentences), so a run that contradicts the expected pattern is told so, spec by spec
    numbers    hierui.format.metric, the same digits as the explorer and `hierui show`; steps counted from 1
               (hierui.format.step_label), as everywhere on screen (the tables keep them 0-based)

The page is the same, byte for byte, for the same run folder: it carries no wall-clock time unless asked
(`stamp`, `hierui report --stamp`). Torch is never imported: the report reads files only.
"""

from __future__ import annotations

import time
from pathlib import Path

from engine.errors import HieruiError
from engine.record.architecture import summary as architecture_summary
from engine.record.paths import atomic_write
from engine.results.localization import basis_mode
from engine.results.runs import RunData, choice_rows, load_run, spec_rows
from hierui.format import MISSING
from hierui.report import generation as G
from hierui.report.breaks import where_it_breaks
from hierui.report.choices import choice_section
from hierui.report.readings import readings
from hierui.report.render import environment
from hierui.tokentext import escape

SECTION_IDS = (
    "hierarchy",
    "kl-theory",
    "amplification",
    "accumulation",
    "first-divergence",
    "multiple-choice",
    "where-it-breaks",
)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' * (n != 1)}"


def _meta(run: RunData) -> list[str]:
    m = run.manifest
    settings = m.get("settings") or {}
    calib = m.get("calibration") or {}

    def value(d: dict, key: str) -> str:
        return escape(d[key]) if d.get(key) is not None else MISSING

    parts = [
        *([escape(architecture_summary(m["architecture"]))] if m.get("architecture") else []),
        _plural(run.prompt_count, "generation prompt"),
        _plural(run.item_count, "multiple-choice item"),
        _plural(len(run.specs), "spec"),
        "modes " + (", ".join(m.get("modes") or run.modes) or MISSING),
        f"{value(settings, 'max_new_tokens')} new tokens, T = {value(settings, 'temperature')}, "
        f"{'sampled' if settings.get('sample') else 'greedy'}",
        _calibration(calib),
    ]
    if m.get("created"):
        parts.append(f"recorded {escape(m['created'])}")
    return parts


def _calibration(calib: dict) -> str:
    """The manifest's calibration: per spec that calibrates (engine.record.settings.calibrations), grouped by size;
    a manifest of an earlier version holds one flat dict for all specs."""
    if "samples" in calib or "length" in calib:
        calib = {"": calib}
    sizes: dict[str, list[str]] = {}
    for spec, c in calib.items():
        c = c if isinstance(c, dict) else {}
        size = "×".join(escape(c[k]) if c.get(k) is not None else MISSING for k in ("samples", "length"))
        sizes.setdefault(size, []).append(escape(spec))
    if not sizes:
        return "no calibration"
    if len(sizes) == 1:
        return f"calibration {next(iter(sizes))} tokens"
    return "calibration " + ", ".join(f"{size} ({', '.join(specs)})" for size, specs in sizes.items()) + " tokens"


def _sections(run: RunData) -> tuple[list[dict], list[dict]]:
    """The page's sections, and the summary of what this sweep shows (one verdict per claim)."""
    rows = spec_rows(run)
    mc = choice_rows(run)
    said = readings(rows, mc)
    sections = [
        G.hierarchy_section(rows, said, basis_mode(run)),
        G.kl_theory_section(rows, said),
        G.amplification_section(rows, said),
        G.accumulation_section(run, rows, said),
        G.first_divergence_section(run),
        choice_section(run, mc, said),
        where_it_breaks(run),
    ]
    assert tuple(s["id"] for s in sections) == SECTION_IDS
    labels = {
        "hierarchy": "The hierarchy",
        "kl-theory": "The theory",
        "amplification": "Amplification",
        "accumulation": "Accumulation",
        "multiple-choice": "Multiple choice",
        "multiple-choice-kl": "The choices' KL",
    }
    summary = [{"label": labels[k], **r} for k, r in said.items() if r is not None]
    for s in sections:
        s["readings"] = [r for r in s["readings"] if r is not None]
    return [
        {"note": None, "table": None, "tables": [], "chart": None, "chart2": None, "figures": [], "nodata": None, **s}
        for s in sections
    ], summary


def render_html(run: RunData, stamp: str | None = None) -> str:
    """The page for `run`; `stamp` (a time, as text) goes into the footer when given."""
    title = f"hierui report — {run.recipe.get('name') or run.path.name}"
    files = ["batch.json", "summary.parquet", "steps.parquet"] + (["mc_summary.parquet"] if run.mc_summary else [])
    sections, summary = _sections(run)
    from hierui.report import kld as report_kld

    if report_kld.has_kld(run.path):  # `hierui kld --out` into the same folder: section 8, after the argument's
        kld = report_kld.load_kld(run.path)
        sections.append(report_kld.section(kld, len(sections) + 1))
        files += kld.files
    from hierui.report import sensitivity as report_sensitivity

    if report_sensitivity.has_sensitivity(run.path):  # `hierui sensitivity --out` into the same folder
        rows, manifest = report_sensitivity.load(run.path)
        sections.append(report_sensitivity.section(rows, manifest, len(sections) + 1))
        files += [report_sensitivity.TABLE]
    return (
        environment()
        .get_template("report.html.j2")
        .render(
            title=title,
            model=escape(run.manifest.get("model") or MISSING),
            meta=_meta(run),
            description=run.recipe.get("description"),
            claim=True,
            sections=sections,
            summary=summary,
            source=str(run.path),
            stamp=stamp,
            files=files,
        )
    )


def write_report(run_dir: str | Path, out: str | Path | None = None, stamp: bool = False) -> Path:
    """Read RUN_DIR and write its report (default RUN_DIR/report.html), whole or not at all; return its path.
    RUN_DIR: a batch output (and a `hierui kld --out` into it: section 8), or a kld output alone (a page of
    that section, hierui.report.kld). With `stamp`, the footer says when the page was made (and the page then
    differs from run to run)."""
    from hierui.report import kld as report_kld
    from hierui.report import sensitivity as report_sensitivity

    folder = Path(run_dir)
    kld_only = folder.is_dir() and not (folder / "batch.json").is_file()
    sensitivity_only = kld_only and not report_kld.has_kld(folder) and report_sensitivity.has_sensitivity(folder)
    if kld_only and not report_kld.has_kld(folder) and not sensitivity_only:
        raise HieruiError(
            f"{folder} is not a hierui batch output (no batch.json), nor a hierui kld output (no "
            f"{report_kld.SUMMARY}) or sensitivity output (no {report_sensitivity.TABLE}): run hierui batch --out "
            f"{folder}, hierui kld --out {folder} or hierui sensitivity --out {folder} first"
        )
    from engine.record.paths import check_output_file

    if not folder.is_dir():
        load_run(run_dir)  # says in one line what RUN_DIR is instead
    target = Path(out).expanduser() if out is not None else folder / "report.html"
    if target.is_dir():
        target = target / "report.html"
    # before reading the run: not a FIFO at its name, a file can be made in its folder (a probe: holds for root)
    check_output_file(target, f"--out {target}" if out is not None else f"the report {target}")
    if sensitivity_only:  # a `hierui sensitivity --out` folder: its section alone
        run, render = folder, report_sensitivity.render_html
    else:
        run = report_kld.load_kld(folder) if kld_only else load_run(run_dir)
        render = report_kld.render_html if kld_only else render_html
    from engine.record.lock import lock_file

    with lock_file(target):  # one writer per report file: a second one is refused, naming the first
        page = render(run, time.strftime("%Y-%m-%d %H:%M") if stamp else None)
        return atomic_write(target, page)
