"""The report's charts: matplotlib figures as inline <svg> text (Agg/SVG, no pyplot state), one per section.

Each function takes the rows of engine.results.runs and returns the <svg> element, or None when there is nothing
to draw. The SVG is the same for the same rows: no date, a fixed hash salt, ids prefixed per chart so that
the charts of one page never share one.
"""

from __future__ import annotations

import io
import re

LAYER_SPREAD = 0.005  # chart_layer_sparsity draws when some spec's layer sparsities differ by more
COLORS = {"emb": "#4C72B0", "logit": "#DD8452", "prob": "#C44E52", "dense": "#55A868", "pert": "#8172B2"}


def _label(spec: str) -> str:
    """A spec as a chart names it: an allocation file by its name alone (wanda:0.6@alloc.json), since a path can
    be longer than the chart is wide; the tables beside the chart give it whole."""
    head, at, allocation = spec.partition("@")
    if at and ("/" in allocation or "\\" in allocation):
        return f"{head}@{allocation.replace(chr(92), '/').rsplit('/', 1)[-1]}"
    return spec


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
    text = re.sub(r"\s*<metadata>.*?</metadata>", "", text[text.index("<svg") :], count=1, flags=re.S)
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
    series = [
        ("emb_cos", "hidden state (final layer)", COLORS["emb"]),
        ("logit_cos", "logits", COLORS["logit"]),
        ("prob_cos", "probabilities", COLORS["prob"]),
    ]
    gaps = [[None if r[k] is None else max(1.0 - r[k], 0.0) for r in rows] for k, _, _ in series]
    for i, ((_, label, color), vals) in enumerate(zip(series, gaps)):
        heights = [v if v is not None and v > 0 else np.nan for v in vals]
        ax.bar(x + (i - 1) * 0.27, heights, 0.27, label=label, color=color)
    if _positive([v for vals in gaps for v in vals]):
        ax.set_yscale("log")
    for i in range(len(rows)):  # nothing to draw: say why
        if all(vals[i] == 0 for vals in gaps):
            ax.annotate(
                "identical",
                (i, 0),
                xycoords=("data", "axes fraction"),
                xytext=(0, 4),
                textcoords="offset points",
                ha="center",
                fontsize=7,
                color="#666",
            )
    ax.set_xticks(x, [_label(r["spec"]) for r in rows], rotation=40, ha="right", fontsize=8)
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
        ax.annotate(_label(r["spec"]), (xv, yv), fontsize=7, xytext=(4, 3), textcoords="offset points")
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
    ax.set_xticks(range(len(rows)), [_label(r["spec"]) for r in rows], rotation=40, ha="right", fontsize=8)
    ax.set_ylabel("amp = (1 − cos p) / (1 − cos z)")
    _style(ax)
    return _svg(fig, "amplification")


def chart_accumulation(curves: dict, specs: list[str]) -> str | None:
    """Accumulated KL over the steps (x counted from 1), per (spec, mode): engine.results.runs.Curve values.

    When the runs stop at different steps, three panels share the x axis: the mean over every run (a run that
    stopped keeps its final value: it ends at the table's mean final cum KL), the mean over the runs still
    generating at each step, and below it how many those are. Otherwise one panel: both means are the same.
    """
    if not curves:
        return None
    from matplotlib import colormaps
    from matplotlib.ticker import MaxNLocator

    cmap = colormaps["tab20" if len(specs) > 10 else "tab10"]
    color = {spec: cmap(i % cmap.N) for i, spec in enumerate(specs)}
    varies = any(c.varies for c in curves.values())
    width = 8.5 if len(curves) <= 8 else 11.0
    height = 4.2 if len(curves) <= 16 else 5.0
    fig = _figure(width, height * 2 + 1.4 if varies else height)
    if varies:
        every, generating, count = fig.subplots(3, 1, sharex=True, height_ratios=[3, 3, 1.2])
        generating.sharey(every)  # one scale: the two means can be compared by eye
        panels = [(every, "carried"), (generating, "generating")]
    else:
        every, generating, count = fig.add_subplot(), None, None
        panels = [(every, "carried")]
    for ax, field in panels:
        for (spec, mode), c in curves.items():
            ax.plot(
                [step + 1 for step in c.steps],
                getattr(c, field),
                linestyle="-" if mode == "shared" else "--",
                color=color.get(spec, "#444"),
                linewidth=1.4,
                label=f"{_label(spec)} · {mode}",
            )
        _style(ax)
    runs = sorted({c.runs for c in curves.values()})
    n = f"{runs[0]}" if len(runs) == 1 else f"{runs[0]}–{runs[-1]}"
    if varies:
        every.set_title(
            f"mean over all {n} runs per line; a run that stopped keeps its final value "
            "(ends at the table's mean final cum KL)",
            fontsize=9,
            loc="left",
        )
        generating.set_title(
            "mean over only the runs still generating at each step (how many: below)", fontsize=9, loc="left"
        )
        generating.set_ylabel("accumulated KL, nats")
        for (spec, mode), c in curves.items():
            count.plot(
                [step + 1 for step in c.steps],
                c.n,
                drawstyle="steps-mid",
                marker="o",
                markersize=2.5,
                linestyle="-" if mode == "shared" else "--",
                color=color.get(spec, "#444"),
                linewidth=1.2,
            )
        count.set_ylabel("runs still\ngenerating", fontsize=8)
        count.set_ylim(bottom=0)
        count.yaxis.set_major_locator(MaxNLocator(integer=True))
        _style(count)
        bottom = count
    else:
        every.set_title(f"mean over the {n} runs per line (every run generated every step)", fontsize=9, loc="left")
        bottom = every
    every.set_ylabel("accumulated KL, nats")
    bottom.set_xlabel("generation step (1 = the first generated token)")
    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
    every.legend(
        fontsize=7, frameon=False, ncol=2 if len(curves) > 8 else 1, loc="upper left", bbox_to_anchor=(1.01, 1.0)
    )
    return _svg(fig, "accumulation")


def chart_first_divergence(groups: list[dict]) -> str | None:
    """The first-divergence steps of the free runs per spec (engine.results.runs.first_divergences: 0-based), drawn
    counted from 1."""
    groups = [g for g in groups if g["steps"]]
    if not groups:
        return None
    fig = _figure(_chart_width(len(groups)), 3.4)
    ax = fig.add_subplot()
    steps = [[step + 1 for step in g["steps"]] for g in groups]  # counted from 1, as on screen
    ax.boxplot(steps, positions=range(len(groups)), widths=0.5, showfliers=False)
    for i, g in enumerate(groups):
        n = len(g["steps"])
        jitter = [i + (k - (n - 1) / 2) * min(0.3 / max(n, 1), 0.05) for k in range(n)]
        ax.scatter(jitter, steps[i], s=10, color=COLORS["pert"], alpha=0.6, zorder=3)
    ax.set_xticks(range(len(groups)), [_label(g["spec"]) for g in groups], rotation=40, ha="right", fontsize=8)
    ax.set_ylabel("first step where the texts differ\n(1 = the first generated token)")
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
    left.set_xticks(x, [_label(r["spec"]) for r in rows], rotation=40, ha="right", fontsize=8)
    left.legend(fontsize=8, frameon=False)
    _style(left)
    series = [
        ("sub_kl", "MC: KL over the choices", COLORS["dense"]),
        ("kl", "MC: full-vocabulary KL at the answer", COLORS["logit"]),
        ("gen_kl", "generation: KL per step", COLORS["prob"]),
    ]
    values = [[r[k] if r[k] is not None and r[k] > 0 else np.nan for r in rows] for k, _, _ in series]
    for i, ((_, label, color), vals) in enumerate(zip(series, values)):
        right.bar(x + (i - 1) * 0.27, vals, 0.27, label=label, color=color)
    if _positive([r[k] for r in rows for k, _, _ in series]):
        right.set_yscale("log")
    right.set_ylabel("KL, nats")
    right.set_xticks(x, [_label(r["spec"]) for r in rows], rotation=40, ha="right", fontsize=8)
    right.legend(fontsize=7, frameon=False)
    _style(right)
    return _svg(fig, "multiple-choice")


def chart_lens_heatmaps(grids) -> str | None:
    """One layer × step heatmap per spec of the mean lens_kl (log colour scale, shared by all specs): where in
    depth, and when in the generation, the perturbed model's read-out departs from the dense one's."""
    import numpy as np
    from matplotlib.colors import LogNorm
    from matplotlib.ticker import MaxNLocator

    grids = [g for g in grids if g.layers and g.steps]
    if not grids:
        return None
    arrays = [np.array([[np.nan if v is None else v for v in row] for row in g.values], dtype=float) for g in grids]
    positive = np.concatenate([a[np.isfinite(a) & (a > 0)] for a in arrays])
    if positive.size == 0:
        return None
    low, high = max(float(positive.min()), float(positive.max()) * 1e-6), float(positive.max())
    columns = min(len(grids), 3)
    rows = (len(grids) + columns - 1) // columns
    fig = _figure(3.4 * columns + 0.8, 2.9 * rows)
    image = None
    for i, (grid, values) in enumerate(zip(grids, arrays)):
        ax = fig.add_subplot(rows, columns, i + 1)
        shown = np.where(np.isfinite(values) & (values > 0), np.clip(values, low, high), np.nan)
        image = ax.imshow(
            shown,
            origin="lower",
            aspect="auto",
            interpolation="nearest",
            norm=LogNorm(vmin=low, vmax=high),
            cmap="magma",
            extent=(0.5, grid.steps + 0.5, 0.5, grid.layers + 0.5),
        )
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"{_label(grid.spec)} ({grid.runs} run{'s' * (grid.runs != 1)})", fontsize=8)
        ax.set_xlabel("step", fontsize=8)
        if i % columns == 0:
            ax.set_ylabel("layer ℓ", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.colorbar(image, ax=fig.axes, shrink=0.85, label="mean lens KL (nats)")
    return _svg(fig, "lens-heatmap")


def chart_flip_layers(counts: dict) -> str | None:
    """Per spec, how many attributed flips each layer's attention or MLP ranks first for (stacked bars)."""
    import numpy as np

    specs = [s for s, c in counts.items() if sum(c["attn"].values()) + sum(c["mlp"].values())]
    if not specs:
        return None
    layers = 1 + max(max(list(c["attn"]) + list(c["mlp"]) or [0]) for c in counts.values())
    fig = _figure(max(5.0, min(11.0, 0.18 * layers * len(specs) + 3)), 2.4 * len(specs))
    x = np.arange(layers)
    for i, spec in enumerate(specs):
        ax = fig.add_subplot(len(specs), 1, i + 1)
        attn = [counts[spec]["attn"].get(layer, 0) for layer in range(layers)]
        mlp = [counts[spec]["mlp"].get(layer, 0) for layer in range(layers)]
        ax.bar(x, attn, 0.8, label="attention", color=COLORS["emb"])
        ax.bar(x, mlp, 0.8, bottom=attn, label="MLP", color=COLORS["logit"])
        ax.set_title(_label(spec), fontsize=8, loc="left")
        ax.set_ylabel("flips", fontsize=8)
        ax.tick_params(labelsize=7)
        if i == 0:
            ax.legend(fontsize=7, frameon=False)
        _style(ax)
    fig.axes[-1].set_xlabel("layer (0-based, as in the unit names)", fontsize=8)
    return _svg(fig, "flip-layers")


COS_NOISE = 1e-6  # a 1 − cos below this is float noise: the two states are the same


def _log_y(ax) -> None:
    """A log y axis (set after plotting) labelled as numbers (0.3, 0.001, 1e-05); its minor ticks labelled too
    when it spans less than a decade, where there may be no major tick at all."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    ax.set_yscale("log")
    plain = FuncFormatter(lambda value, _pos: f"{value:.3g}")
    ax.yaxis.set_major_formatter(plain)
    low, high = ax.get_ylim()
    ax.yaxis.set_minor_formatter(plain if high < 10 * low else NullFormatter())


def _spec_colors(specs: list[str]) -> dict:
    from matplotlib import colormaps

    cmap = colormaps["tab20" if len(specs) > 10 else "tab10"]
    return {spec: cmap(i % cmap.N) for i, spec in enumerate(specs)}


def chart_kld_confidence(rows: list[dict]) -> str | None:
    """Corpus KLD (engine.record.schema.KLD_SUMMARY rows): the mean KLD per decile of the dense top-1 probability, one
    line per spec (log scale), over grey bars of how many tokens fall in each decile (the dense model's, the same
    for every spec)."""
    import numpy as np

    color = _spec_colors([r["spec"] for r in rows])  # a spec's colour is the same in both charts
    rows = [r for r in rows if r.get("conf_kl_mean") and any(v is not None and v > 0 for v in r["conf_kl_mean"])]
    if not rows:
        return None
    buckets = len(rows[0]["conf_kl_mean"])
    x = np.arange(buckets)
    fig = _figure(8.5, 3.8)
    ax = fig.add_subplot()
    counts = ax.twinx()
    counts.bar(x, rows[0].get("conf_count") or [0] * buckets, 0.8, color="#000", alpha=0.08, zorder=0)
    counts.set_ylabel("scored tokens (bars)", fontsize=8, color="#777")
    counts.tick_params(labelsize=7, colors="#777")
    counts.spines[["top"]].set_visible(False)
    ax.set_zorder(counts.get_zorder() + 1)  # the lines above the bars
    ax.patch.set_visible(False)
    for r in rows:
        ys = [v if v is not None and v > 0 else np.nan for v in r["conf_kl_mean"]]
        ax.plot(x, ys, marker="o", markersize=3.5, linewidth=1.4, color=color[r["spec"]], label=_label(r["spec"]))
    _log_y(ax)
    ax.set_xticks(x, [f"{i / buckets:.1f}–{(i + 1) / buckets:.1f}" for i in x], fontsize=7)
    ax.set_xlabel("dense top-1 probability")
    ax.set_ylabel("mean KLD per token, nats")
    ax.legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.08, 1.0))
    _style(ax)
    return _svg(fig, "kld-confidence")


def _line_per_spec(ax, rows: list[dict], values, color: dict) -> None:
    """One line per row over the layers 0 … n − 1, `values(row)` its points (nan: not drawn), in the spec's
    colour (_spec_colors) and named as the charts name it (_label)."""
    for r in rows:
        ys = values(r)
        ax.plot(
            range(len(ys)), ys, marker="o", markersize=3, linewidth=1.4, color=color[r["spec"]], label=_label(r["spec"])
        )


def chart_kld_hidden(rows: list[dict]) -> str | None:
    """Corpus KLD: the hidden-state 1 − cos per layer (0 = the token embeddings), mean over the scored tokens, one
    line per spec (log scale); None when no spec has them (a base file) or none deviates."""
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    def gaps(row: dict) -> list[float]:
        return [np.nan if c is None or 1 - c <= COS_NOISE else 1 - c for c in row["hidden_cos"]]

    color = _spec_colors([r["spec"] for r in rows])
    rows = [r for r in rows if r.get("hidden_cos") and np.isfinite(gaps(r)).any()]
    if not rows:
        return None
    fig = _figure(8.5, 3.6)
    ax = fig.add_subplot()
    _line_per_spec(ax, rows, gaps, color)
    _log_y(ax)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(
        f"layer ℓ (0 = token embeddings; a layer whose 1 − cos is below {COS_NOISE:g}, float noise, is not drawn)"
    )
    ax.set_ylabel("1 − cos(h_d, h_p)")
    ax.legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    _style(ax)
    return _svg(fig, "kld-hidden")


def chart_layer_sparsity(rows: list[dict]) -> str | None:
    """The zero weights' fraction per decoder layer, one line per spec that recorded it (`layer_sparsity`); None
    unless some spec's layers differ by more than LAYER_SPREAD (a layer allocation, a spec that spares layers): a
    uniform sweep's flat lines say nothing the tables do not."""
    from matplotlib.ticker import MaxNLocator, PercentFormatter

    color = _spec_colors([r["spec"] for r in rows])
    rows = [r for r in rows if r.get("layer_sparsity") and any(v is not None for v in r["layer_sparsity"])]
    spread = [
        max(v for v in r["layer_sparsity"] if v is not None) - min(v for v in r["layer_sparsity"] if v is not None)
        for r in rows
    ]
    if not rows or max(spread) <= LAYER_SPREAD:
        return None
    columns = min(3, len(rows))  # the legend below the axes, in columns: a long spec keeps a third of the width
    fig = _figure(8.5, 3.0 + 0.2 * -(-len(rows) // columns))
    ax = fig.add_subplot()
    _line_per_spec(ax, rows, lambda r: [float("nan") if v is None else v for v in r["layer_sparsity"]], color)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
    ax.set_xlabel("decoder layer ℓ")
    ax.set_ylabel("zero weights")
    # below the axes: a spec naming its allocation file can be longer than a legend beside them leaves room for
    ax.legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(0.0, -0.2), ncols=columns)
    _style(ax)
    return _svg(fig, "layer-sparsity")


def chart_kld_size(sized: list[dict]) -> str | None:
    """The quant-choosing chart: mean KLD (log scale) against file size, one point per GGUF candidate
    (engine.results.sizes.candidates_by_size), the Pareto front joined and drawn as diamonds."""
    points = [r for r in sized if r.get("kl_mean") is not None and r["kl_mean"] > 0]
    if not points:
        return None
    fig = _figure(8.5, 3.6)
    ax = fig.add_subplot()
    front = [r for r in points if r["front"]]
    ax.plot([r["file_size"] / 2**20 for r in front], [r["kl_mean"] for r in front], color=COLORS["pert"],
            linewidth=1.2, zorder=1)  # fmt: skip
    for r in points:
        ax.scatter(r["file_size"] / 2**20, r["kl_mean"], marker="D" if r["front"] else "o", s=28,
                   color=COLORS["pert"] if r["front"] else "#999", zorder=2)  # fmt: skip
        ax.annotate(r["name"], (r["file_size"] / 2**20, r["kl_mean"]), fontsize=7, xytext=(4, 3),
                    textcoords="offset points")  # fmt: skip
    _log_y(ax)
    ax.set_xlabel("file size, MiB")
    ax.set_ylabel("mean KLD, nats")
    ax.set_title("◆ the Pareto front: no other candidate is smaller with a lower mean KLD", fontsize=8, loc="left")
    _style(ax)
    return _svg(fig, "kld-size")


def chart_sensitivity_heatmap(grids: list[dict]) -> str | None:
    """`hierui sensitivity`: per level, a layer × part heatmap of the mean KLD of perturbing that part alone (log
    colour scale shared by the levels). `grids`: {level, layers: [ℓ …], parts: [column names], values: [[kl or None
    per part] per layer]}; None when nothing is above 0."""
    import numpy as np
    from matplotlib.colors import LogNorm

    arrays = [np.array([[np.nan if v is None else v for v in row] for row in g["values"]], dtype=float) for g in grids]
    positive = np.concatenate([a[np.isfinite(a) & (a > 0)] for a in arrays]) if arrays else np.array([])
    if positive.size == 0:
        return None
    low, high = max(float(positive.min()), float(positive.max()) * 1e-6), float(positive.max())
    columns = min(len(grids), 3)
    rows = (len(grids) + columns - 1) // columns
    width = max(len(g["parts"]) for g in grids)
    height = min(9.0, 1.4 + 0.16 * len(grids[0]["layers"]))
    fig = _figure(min(11.0, (1.2 + 0.45 * width) * columns + 1.0), height * rows)
    image = None
    for i, (grid, values) in enumerate(zip(grids, arrays)):
        ax = fig.add_subplot(rows, columns, i + 1)
        shown = np.where(np.isfinite(values) & (values > 0), np.clip(values, low, high), np.nan)
        image = ax.imshow(
            shown, origin="lower", aspect="auto", interpolation="nearest", norm=LogNorm(vmin=low, vmax=high),
            cmap="magma",
        )  # fmt: skip
        turned = width > 2
        ax.set_xticks(
            range(len(grid["parts"])),
            grid["parts"],
            fontsize=7,
            rotation=45 if turned else 0,
            ha="right" if turned else "center",
        )
        step = max(1, len(grid["layers"]) // 16)
        ax.set_yticks(range(0, len(grid["layers"]), step), [str(x) for x in grid["layers"]][::step], fontsize=7)
        ax.set_title(str(grid["level"]), fontsize=8)
        if i % columns == 0:
            ax.set_ylabel("layer ℓ", fontsize=8)
    fig.colorbar(image, ax=fig.axes, shrink=0.85, label="mean KLD (nats)")
    return _svg(fig, "sensitivity-heatmap")
