"""`hierui report RUN_DIR`: a `hierui batch` output as one self-contained HTML page, the paper's argument.

    data     load_run() reads OUT/batch.json, summary.parquet, steps.parquet (the few columns needed) and,
             when the sweep scored multiple-choice items, mc.parquet and mc_summary.parquet.
    tables   spec_rows() — one dict per spec (the similarity in each space, KL and its estimate,
             amplification, accumulated KL, first divergence, multiple-choice accuracy) — is what the
             HTML page and `hierui show RUN_DIR` both print; cum_kl_curves(), first_divergences() and
             choice_rows() feed the other sections.
    html     render_html() writes the page: the claim in three sentences, then one section per step of the
             argument (ids SECTION_IDS), each with a one-line reading guide, a table and an inline SVG chart
             (matplotlib, imported only here, Agg/SVG, no pyplot state). A part without data says so.

Torch is never imported: the report reads files only.
"""

from __future__ import annotations

import html
import io
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from engine.errors import HieruiError
from engine.summary import mean, percentile


def median(values) -> float | None:
    return percentile(list(values), 50)

SECTION_IDS = ("hierarchy", "kl-theory", "amplification", "accumulation", "first-divergence", "multiple-choice")
STEP_COLUMNS = ("run_id", "spec", "mode", "prompt_id", "step", "cum_kl")

# spec_rows()'s fields and their headings (terminal and HTML)
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

CLAIM = (
    "Pruning (like the other perturbations here) leaves a language model's hidden states and logits nearly "
    "intact: their cosine similarity to the dense model stays close to 1. "
    "The softmax amplifies those small logit deviations into a visible change of the next-token "
    "distribution, and in generation the change accumulates step by step until the two texts split. "
    "Multiple-choice scoring, which reads only the probabilities of a few candidate answers, stays stable — "
    "so benchmarks of that kind hide what generation shows."
)


@dataclass
class RunData:
    path: Path
    manifest: dict
    summary: list[dict]
    steps: list[dict]
    mc: list[dict] = field(default_factory=list)
    mc_summary: list[dict] = field(default_factory=list)
    recipe: dict = field(default_factory=dict)  # name, description (OUT/recipe.toml from --recipe)
    specs: list[str] = field(default_factory=list)  # in sweep order

    @property
    def modes(self) -> list[str]:
        return list(dict.fromkeys(r["mode"] for r in self.summary))


# ------------------------------------------------------------------ data


def load_run(run_dir: str | Path) -> RunData:
    """Read a `hierui batch` output folder; a folder that is not one is a one-line HieruiError."""
    import pyarrow.parquet as pq

    path = Path(run_dir)
    if not path.exists():
        raise HieruiError(f"run folder not found: {path}")
    if not path.is_dir():
        raise HieruiError(f"{path} is not a folder: give the --out folder of a hierui batch run")
    missing = [n for n in ("batch.json", "summary.parquet") if not (path / n).is_file()]
    if missing:
        raise HieruiError(f"{path} is not a hierui batch output (no {' or '.join(missing)}): "
                          f"run hierui batch --out {path} first")
    try:
        manifest = json.loads((path / "batch.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise HieruiError(f"{path / 'batch.json'} is unreadable") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "hierui-batch":
        raise HieruiError(f"{path / 'batch.json'} is not a hierui batch manifest")

    def read(name: str, columns=None) -> list[dict]:
        file = path / name
        if not file.is_file():
            return []
        try:
            table = pq.read_table(file)
            if columns is not None:
                table = table.select([c for c in columns if c in table.column_names])
            return table.to_pylist()
        except Exception as e:  # pyarrow raises several types for a damaged file
            raise HieruiError(f"{file} is unreadable ({type(e).__name__}); rerun the sweep to rewrite it") from None

    run = RunData(path, manifest, read("summary.parquet"), read("steps.parquet", STEP_COLUMNS),
                  read("mc.parquet"), read("mc_summary.parquet"))
    recipe = path / "recipe.toml"
    if recipe.is_file():
        import tomllib

        try:
            data = tomllib.loads(recipe.read_text(encoding="utf-8"))
            run.recipe = {k: data[k] for k in ("name", "description") if isinstance(data.get(k), str)}
        except (OSError, ValueError):
            pass
    order = [str(s) for s in manifest.get("specs") or []]
    seen = order + [r.get("spec") for r in run.summary + run.mc_summary]
    run.specs = [s for s in dict.fromkeys(seen) if s]
    return run


def basis_mode(run: RunData) -> str | None:
    """The mode the hierarchy figures come from: shared (same context for both models) when recorded."""
    modes = run.modes
    return "shared" if "shared" in modes else (modes[0] if modes else None)


def spec_rows(run: RunData) -> list[dict]:
    """One row per spec, in sweep order (ROW_FIELDS): means over runs of the per-run summaries.

    Similarities, KL, its estimate, amplification and top-1 agreement come from the basis mode's runs
    (shared when recorded); cum_kl_* are the mean final accumulated KL per mode; first_div is the median
    first-divergence step of the free runs that diverged; mc_* come from mc_summary.
    """
    basis = basis_mode(run)
    mc = {r["spec"]: r for r in run.mc_summary}
    rows = []
    for spec in run.specs:
        mine = [r for r in run.summary if r.get("spec") == spec]
        base = [r for r in mine if r.get("mode") == basis]
        free = [r for r in mine if r.get("mode") == "free"]
        m = mc.get(spec, {})
        rows.append({
            "spec": spec,
            "sparsity": mean(r.get("measured_sparsity") for r in mine),
            "runs": len(mine),
            "emb_cos": mean(r.get("emb_cos_final_mean") for r in base),
            "logit_cos": mean(r.get("logit_cos_mean") for r in base),
            "prob_cos": mean(r.get("prob_cos_mean") for r in base),
            "prob_cos_est": mean(r.get("prob_cos_est_mean") for r in base),
            "kl": mean(r.get("kl_mean") for r in base),
            "kl_est": mean(r.get("kl_est_mean") for r in base),
            "tv": mean(r.get("tv_mean") for r in base),
            "amp": mean(r.get("amp_mean") for r in base),
            "top1": mean(r.get("same_top1_rate") for r in base),
            "cum_kl_shared": mean(r.get("cum_kl") for r in mine if r.get("mode") == "shared"),
            "cum_kl_free": mean(r.get("cum_kl") for r in free),
            "first_div": median(r.get("first_divergence") for r in free),
            "diverged": sum(r.get("first_divergence") is not None for r in free) if free else None,
            "free_runs": len(free),
            "mc_items": m.get("items"),
            "mc_acc_d": m.get("acc_d"),
            "mc_acc_p": m.get("acc_p"),
            "mc_agree": m.get("agree_rate"),
            "mc_sub_kl": m.get("sub_kl_mean"),
            "mc_kl": m.get("kl_mean"),
        })
    return rows


def cum_kl_curves(run: RunData) -> dict[tuple[str, str], list[tuple[int, float]]]:
    """(spec, mode) → [(step, mean cum_kl over the runs that reached that step)], in sweep order."""
    sums: dict[tuple[str, str], dict[int, list[float]]] = {}
    for s in run.steps:
        if s.get("cum_kl") is None or s.get("step") is None:
            continue
        sums.setdefault((s["spec"], s["mode"]), {}).setdefault(int(s["step"]), []).append(float(s["cum_kl"]))
    order = {spec: i for i, spec in enumerate(run.specs)}
    keys = sorted(sums, key=lambda k: (order.get(k[0], len(order)), k[1] != "shared"))
    return {k: [(step, sum(v) / len(v)) for step, v in sorted(sums[k].items())] for k in keys}


def first_divergences(run: RunData) -> list[dict]:
    """Per spec with free-mode runs: the first-divergence steps of the runs that split, and how many did not."""
    out = []
    for spec in run.specs:
        free = [r for r in run.summary if r.get("spec") == spec and r.get("mode") == "free"]
        if not free:
            continue
        steps = sorted(int(r["first_divergence"]) for r in free if r.get("first_divergence") is not None)
        out.append({"spec": spec, "runs": len(free), "steps": steps, "never": len(free) - len(steps),
                    "median": median(steps), "min": steps[0] if steps else None,
                    "max": steps[-1] if steps else None})
    return out


def choice_rows(run: RunData) -> list[dict]:
    """Per spec with multiple-choice results: accuracy dense/perturbed, agreement, subspace vs full KL at
    the answer position, beside the generation KL of the same spec."""
    gen = {r["spec"]: r for r in spec_rows(run)}
    rows = []
    for m in run.mc_summary:
        g = gen.get(m["spec"], {})
        rows.append({"spec": m["spec"], "items": m.get("items"), "acc_d": m.get("acc_d"), "acc_p": m.get("acc_p"),
                     "agree": m.get("agree_rate"), "sub_kl": m.get("sub_kl_mean"), "kl": m.get("kl_mean"),
                     "gen_kl": g.get("kl"), "gen_cum_kl": g.get("cum_kl_free") if g.get("cum_kl_free") is not None
                     else g.get("cum_kl_shared")})
    order = {spec: i for i, spec in enumerate(run.specs)}
    return sorted(rows, key=lambda r: order.get(r["spec"], len(order)))


def fmt(value, digits: int = 4) -> str:
    """A number as the report prints it (4 significant digits; — for none)."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, str)):
        return str(value)
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return str(value)
    return f"{value:.{digits}g}"


def pct(value) -> str:
    return "—" if value is None else f"{value:.1%}"


# ------------------------------------------------------------------ charts (matplotlib, SVG text)

COLORS = {"emb": "#4C72B0", "logit": "#DD8452", "prob": "#C44E52", "dense": "#55A868", "pert": "#8172B2"}


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    return fig


def _svg(fig, salt: str) -> str:
    """The figure as an <svg> element: text kept as text, ids unique per chart, no date."""
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": f"hierui-{salt}"}):
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": "hierui"})
    text = buf.getvalue()
    text = re.sub(r"\s*<metadata>.*?</metadata>", "", text[text.index("<svg"):], count=1, flags=re.S)
    # matplotlib numbers its element ids per figure (figure_1, axes_1, …): prefix them so that the
    # charts of one page never share an id, and keep the internal references (clip paths, markers)
    text = re.sub(r'\bid="([^"]+)"', rf'id="{salt}-\1"', text)
    return re.sub(r'(url\(#|href="#)([^")]+)', rf"\g<1>{salt}-\2", text)


def _style(ax) -> None:
    ax.spines[["top", "right"]].set_visible(False)
    ax.grid(axis="y", alpha=0.3, linewidth=0.6)
    ax.set_axisbelow(True)


def _positive(values) -> bool:
    return any(v is not None and v > 0 for v in values)


def _chart_width(n: int) -> float:
    return min(11.0, max(5.5, 1.6 + 0.55 * n))


def chart_hierarchy(rows: list[dict]) -> str | None:
    """Grouped bars of 1 − cos per spec in the three spaces (log scale): the hierarchy in one picture."""
    import numpy as np

    rows = [r for r in rows if any(r[k] is not None for k in ("emb_cos", "logit_cos", "prob_cos"))]
    if not rows:
        return None
    fig = _figure(_chart_width(len(rows)), 3.6)
    ax = fig.add_subplot()
    x = np.arange(len(rows))
    series = [("emb_cos", "hidden state (final layer)", COLORS["emb"]), ("logit_cos", "logits", COLORS["logit"]),
              ("prob_cos", "probabilities", COLORS["prob"])]
    gaps = [[None if r[k] is None else max(1.0 - r[k], 0.0) for r in rows] for k, _, _ in series]
    for i, ((_, label, color), vals) in enumerate(zip(series, gaps)):
        heights = [v if v is not None and v > 0 else np.nan for v in vals]
        ax.bar(x + (i - 1) * 0.27, heights, 0.27, label=label, color=color)
    if _positive([v for vals in gaps for v in vals]):
        ax.set_yscale("log")
    for i, r in enumerate(rows):  # nothing to draw: say why
        if all(vals[i] == 0 for vals in gaps):
            ax.annotate("identical", (i, 0), xycoords=("data", "axes fraction"), xytext=(0, 4),
                        textcoords="offset points", ha="center", fontsize=7, color="#666")
    ax.set_xticks(x, [r["spec"] for r in rows], rotation=40, ha="right", fontsize=8)
    ax.set_ylabel("1 − cosine (dense vs perturbed)")
    ax.legend(fontsize=8, frameon=False)
    _style(ax)
    return _svg(fig, "hierarchy")


def chart_kl_theory(rows: list[dict]) -> str | None:
    """Measured KL against its second-order estimate Var_p(Δz)/2T², one point per spec, with y = x."""
    pts = [r for r in rows if r["kl"] is not None and r["kl_est"] is not None and r["kl"] > 0 and r["kl_est"] > 0]
    if not pts:
        return None
    fig = _figure(5.8, 4.2)
    ax = fig.add_subplot()
    xs, ys = [r["kl"] for r in pts], [r["kl_est"] for r in pts]
    lo, hi = min(xs + ys) / 1.5, max(xs + ys) * 1.5
    ax.plot([lo, hi], [lo, hi], "--", color="#888", linewidth=1, label="estimate = measured")
    ax.scatter(xs, ys, color=COLORS["prob"], zorder=3)
    for r, xv, yv in zip(pts, xs, ys):
        ax.annotate(r["spec"], (xv, yv), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel("measured KL(P_d ‖ P_p), nats (mean per step)")
    ax.set_ylabel("theory Var_p(Δz) / 2T²")
    ax.legend(fontsize=8, frameon=False)
    _style(ax)
    return _svg(fig, "kl-theory")


def chart_amplification(rows: list[dict]) -> str | None:
    rows = [r for r in rows if r["amp"] is not None]
    if not rows:
        return None
    fig = _figure(_chart_width(len(rows)), 3.2)
    ax = fig.add_subplot()
    ax.bar(range(len(rows)), [r["amp"] for r in rows], color=COLORS["prob"])
    ax.axhline(1.0, color="#888", linestyle="--", linewidth=1)
    ax.set_xticks(range(len(rows)), [r["spec"] for r in rows], rotation=40, ha="right", fontsize=8)
    ax.set_ylabel("amp = (1 − cos p) / (1 − cos z)")
    _style(ax)
    return _svg(fig, "amplification")


def chart_accumulation(curves: dict, specs: list[str]) -> str | None:
    if not curves:
        return None
    from matplotlib import colormaps

    cmap = colormaps["tab20" if len(specs) > 10 else "tab10"]
    color = {spec: cmap(i % cmap.N) for i, spec in enumerate(specs)}
    fig = _figure(8.5 if len(curves) <= 8 else 11.0, 4.2 if len(curves) <= 16 else 5.0)
    ax = fig.add_subplot()
    for (spec, mode), pts in curves.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], linestyle="-" if mode == "shared" else "--",
                color=color.get(spec, "#444"), linewidth=1.4, label=f"{spec} · {mode}")
    ax.set_xlabel("generation step")
    ax.set_ylabel("accumulated KL, nats (mean over prompts)")
    ax.legend(fontsize=7, frameon=False, ncol=2 if len(curves) > 8 else 1, loc="upper left",
              bbox_to_anchor=(1.01, 1.0))
    _style(ax)
    return _svg(fig, "accumulation")


def chart_first_divergence(groups: list[dict]) -> str | None:
    groups = [g for g in groups if g["steps"]]
    if not groups:
        return None
    fig = _figure(_chart_width(len(groups)), 3.4)
    ax = fig.add_subplot()
    ax.boxplot([g["steps"] for g in groups], positions=range(len(groups)), widths=0.5, showfliers=False)
    for i, g in enumerate(groups):
        n = len(g["steps"])
        jitter = [i + (k - (n - 1) / 2) * min(0.3 / max(n, 1), 0.05) for k in range(n)]
        ax.scatter(jitter, g["steps"], s=10, color=COLORS["pert"], alpha=0.6, zorder=3)
    ax.set_xticks(range(len(groups)), [g["spec"] for g in groups], rotation=40, ha="right", fontsize=8)
    ax.set_ylabel("first step where the texts differ")
    from matplotlib.ticker import MaxNLocator

    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    _style(ax)
    return _svg(fig, "first-divergence")


def chart_choices(rows: list[dict]) -> str | None:
    import numpy as np

    rows = [r for r in rows if r["acc_d"] is not None]
    if not rows:
        return None
    fig = _figure(min(12.0, max(8.0, 2.0 + 0.9 * len(rows))), 3.8)
    left, right = fig.subplots(1, 2)
    x = np.arange(len(rows))
    left.bar(x - 0.2, [r["acc_d"] for r in rows], 0.4, label="dense", color=COLORS["dense"])
    left.bar(x + 0.2, [r["acc_p"] for r in rows], 0.4, label="perturbed", color=COLORS["pert"])
    left.set_ylim(0, 1.05)
    left.set_ylabel("multiple-choice accuracy")
    left.set_xticks(x, [r["spec"] for r in rows], rotation=40, ha="right", fontsize=8)
    left.legend(fontsize=8, frameon=False)
    _style(left)
    series = [("sub_kl", "MC: KL over the choices", COLORS["dense"]),
              ("kl", "MC: full-vocabulary KL at the answer", COLORS["logit"]),
              ("gen_kl", "generation: KL per step", COLORS["prob"])]
    values = [[r[k] if r[k] is not None and r[k] > 0 else np.nan for r in rows] for k, _, _ in series]
    for i, ((_, label, color), vals) in enumerate(zip(series, values)):
        right.bar(x + (i - 1) * 0.27, vals, 0.27, label=label, color=color)
    if _positive([r[k] for r in rows for k, _, _ in series]):
        right.set_yscale("log")
    right.set_ylabel("KL, nats")
    right.set_xticks(x, [r["spec"] for r in rows], rotation=40, ha="right", fontsize=8)
    right.legend(fontsize=7, frameon=False)
    _style(right)
    return _svg(fig, "multiple-choice")


# ------------------------------------------------------------------ HTML

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1100px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { font-size: 1.25em; margin-top: 2.2em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
.meta { color: #666; font-size: 0.9em; }
.claim { font-size: 1.08em; background: #f6f6f2; border-left: 4px solid #C44E52; padding: 0.8em 1em; }
.guide { color: #444; font-style: italic; }
.nodata { color: #8a6d3b; background: #fcf8e3; padding: 0.5em 0.8em; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.8em 0; }
th, td { padding: 0.25em 0.6em; border-bottom: 1px solid #e4e4e4; text-align: right; white-space: nowrap; }
th:first-child, td:first-child { text-align: left; }
th { background: #fafafa; }
svg { max-width: 100%; height: auto; }
code { background: #f2f2f2; padding: 0 0.25em; }
footer { margin-top: 3em; color: #888; font-size: 0.8em; }
"""


def _e(text) -> str:
    return html.escape(str(text), quote=True)


def _table_html(columns: list[tuple[str, str]], rows: list[dict], cell=None) -> str:
    cell = cell or (lambda key, row: fmt(row.get(key)))
    head = "".join(f"<th>{_e(title)}</th>" for _, title in columns)
    body = "".join("<tr>" + "".join(f"<td>{_e(cell(k, r))}</td>" for k, _ in columns) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _section(sid: str, title: str, guide: str, body: str) -> str:
    return (f'<section id="{sid}">\n<h2>{_e(title)}</h2>\n<p class="guide">{_e(guide)}</p>\n{body}\n</section>\n')


def _nodata(text: str) -> str:
    return f'<p class="nodata">{_e(text)}</p>'


def _chart(svg: str | None) -> str:
    return f'<figure>{svg}</figure>' if svg else ""


def _meta(run: RunData) -> str:
    m = run.manifest
    settings = m.get("settings") or {}
    calib = m.get("calibration") or {}
    n_mc = len({r.get("item_id") for r in run.mc})
    n_gen = len({r.get("prompt_id") for r in run.summary})
    parts = [f"model <code>{_e(m.get('model', '—'))}</code>",
             f"{n_gen} generation prompt{'s' * (n_gen != 1)}",
             f"{n_mc} multiple-choice item{'s' * (n_mc != 1)}",
             f"{len(run.specs)} spec{'s' * (len(run.specs) != 1)}",
             "modes " + _e(", ".join(m.get("modes") or run.modes) or "—"),
             f"{_e(settings.get('max_new_tokens', '—'))} new tokens, T = {_e(settings.get('temperature', '—'))}, "
             f"{'sampled' if settings.get('sample') else 'greedy'}",
             f"calibration {_e(calib.get('samples', '—'))}×{_e(calib.get('length', '—'))} tokens"]
    if m.get("created"):
        parts.append(f"recorded {_e(m['created'])}")
    return " · ".join(parts)


def render_html(run: RunData) -> str:
    rows = spec_rows(run)
    basis = basis_mode(run)
    title = f"hierui report — {run.recipe.get('name') or run.path.name}"
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f"<title>{_e(title)}</title><style>{CSS}</style></head><body>",
           f"<h1>{_e(title)}</h1>", f'<p class="meta">{_meta(run)}</p>']
    if run.recipe.get("description"):
        out.append(f'<p class="meta">{_e(run.recipe["description"])}</p>')
    out.append(f'<section id="claim"><p class="claim"><strong>The claim.</strong> {_e(CLAIM)}</p>'
               f"<p>The sections below are the evidence from this sweep, one step of the argument each: "
               f"the hierarchy of spaces, the theory behind the KL, the amplification by the softmax, the "
               f"accumulation over generation steps, where the texts split, and multiple choice.</p></section>")

    # 1. hierarchy
    has_sim = any(r["logit_cos"] is not None for r in rows)
    note = "" if basis in (None, "shared") else (
        f"<p>No shared-mode runs in this sweep: the figures come from the {basis}-mode runs, whose contexts "
        f"differ once the texts split.</p>")
    cols = [("spec", "spec"), ("sparsity", "measured sparsity"), ("emb_cos", "hidden cos (final layer)"),
            ("logit_cos", "logit cos"), ("prob_cos", "prob cos"), ("kl", "KL"), ("tv", "TV"), ("top1", "top-1 agree")]
    body = (note + _table_html(cols, rows, lambda k, r: pct(r[k]) if k == "sparsity" else fmt(r.get(k)))
            + _chart(chart_hierarchy(rows))) if has_sim else _nodata("No generation runs in this sweep: nothing to "
                                                                      "compare across the three spaces.")
    out.append(_section("hierarchy", "1. The hierarchy: hidden states, logits, probabilities",
                        f"Mean cosine similarity dense vs perturbed per space ({basis or 'shared'} mode, mean over "
                        "steps and prompts); in the chart lower bars are closer: read how 1 − cos grows from hidden "
                        "states to logits to probabilities.", body))

    # 2. KL and its theory estimate
    has_kl = any(r["kl"] is not None for r in rows)
    cols = [("spec", "spec"), ("kl", "KL measured"), ("kl_est", "KL est Var_p(Δz)/2T²"),
            ("prob_cos", "prob cos"), ("prob_cos_est", "prob cos est")]
    body = (_table_html(cols, rows) + _chart(chart_kl_theory(rows))) if has_kl else _nodata(
        "No generation runs in this sweep: no KL to compare with its estimate.")
    out.append(_section("kl-theory", "2. KL and its second-order estimate",
                        "The measured KL(P_d ‖ P_p) beside the theory Var_{i~p}(Δz_i)/2T²: points near the diagonal "
                        "mean the logit deviation alone explains the probability divergence.", body))

    # 3. amplification
    has_amp = any(r["amp"] is not None for r in rows)
    cols = [("spec", "spec"), ("logit_cos", "logit cos"), ("prob_cos", "prob cos"), ("amp", "amp (mean per step)")]
    body = (_table_html(cols, rows) + _chart(chart_amplification(rows))) if has_amp else _nodata(
        "No amplification factor recorded (no generation runs, or logits identical at every step).")
    out.append(_section("amplification", "3. Amplification by the softmax",
                        "amp = (1 − cos p) / (1 − cos z) per step, averaged: how much larger the deviation is in "
                        "probability space than in logit space (the dashed line is 1, no amplification).", body))

    # 4. accumulation
    curves = cum_kl_curves(run)
    cols = [("spec", "spec"), ("cum_kl_shared", "cum KL, shared (final)"), ("cum_kl_free", "cum KL, free (final)")]
    body = (_table_html(cols, rows) + _chart(chart_accumulation(curves, run.specs))) if curves else _nodata(
        "No generation steps in this sweep: nothing accumulates.")
    out.append(_section("accumulation", "4. Divergence accumulates over generation steps",
                        "Accumulated KL Σ KL(step) against the step, mean over prompts per spec: solid lines are "
                        "shared mode (same context, the local effect), dashed free mode (each model its own text).",
                        body))

    # 5. first divergence
    groups = first_divergences(run)
    if groups:
        body = _table_html([("spec", "spec"), ("runs", "free runs"), ("diverged", "texts split"),
                            ("median", "median step"), ("min", "earliest"), ("max", "latest")],
                           [{**g, "diverged": len(g["steps"])} for g in groups])
        chart = chart_first_divergence(groups)
        body += _chart(chart) if chart else _nodata("In no free-mode run did the two texts differ within the "
                                                    "recorded steps.")
    else:
        body = _nodata("No free-mode runs in this sweep (add --mode free): no first-divergence step to show.")
    out.append(_section("first-divergence", "5. Where the generated texts split",
                        "Free mode: the first step at which the perturbed model picks another token than the dense "
                        "one, per run (box: quartiles; runs that never split are counted in the table).", body))

    # 6. multiple choice
    mc = choice_rows(run)
    if mc:
        body = _table_html([("spec", "spec"), ("items", "items"), ("acc_d", "acc dense"), ("acc_p", "acc perturbed"),
                            ("agree", "same choice"), ("sub_kl", "KL over choices"),
                            ("kl", "full KL at answer"), ("gen_kl", "generation KL/step"),
                            ("gen_cum_kl", "generation cum KL")], mc) + _chart(chart_choices(mc))
    else:
        body = _nodata("No multiple-choice items in this sweep (JSONL items with \"choices\" and \"answer\", e.g. "
                       "suite:mc in a recipe): nothing to set against generation.")
    out.append(_section("multiple-choice", "6. Multiple choice stays stable",
                        "Accuracy of the dense and the perturbed model on the same items, and the divergence they "
                        "see over the few candidate answers, beside the divergence of generation under the same "
                        "spec.", body))

    out.append(f"<footer>Generated by hierui from {_e(run.path)} on {_e(time.strftime('%Y-%m-%d %H:%M'))}: "
               "batch.json, summary.parquet, steps.parquet" + (", mc_summary.parquet" if run.mc_summary else "")
               + ".</footer></body></html>")
    return "\n".join(out) + "\n"


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Read RUN_DIR and write its report (default RUN_DIR/report.html); return the file's path."""
    run = load_run(run_dir)
    target = Path(out) if out is not None else run.path / "report.html"
    if target.is_dir():
        target = target / "report.html"
    if not target.parent.is_dir():
        raise HieruiError(f"--out {target}: folder {target.parent} does not exist")
    page = render_html(run)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(target)
    return target
