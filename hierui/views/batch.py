"""`hierui show RUN_DIR` for a `hierui batch` output: the report's per-spec table (engine.results.runs.spec_rows)
in the terminal, with plotext charts of the accumulated KL over steps and of multiple-choice accuracy.
Reads files only: no torch, no transformers.

Each table's title is a line of text above it (a rich table title wraps inside the table's width, and a
narrow table broke a long title into a column of fragments). Steps are shown counted from 1
(hierui.format.step_label); the tables keep them 0-based. The bars while `hierui batch` runs: hierui.views.bars.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from engine.record.architecture import summary as architecture_summary
from engine.results import runs as R
from hierui.format import MISSING, metric, step_label
from hierui.output import console
from hierui.tokentext import escape


def is_batch_output(path: Path) -> bool:
    return (path / "batch.json").is_file() and (path / "summary.parquet").is_file()


# fields that are steps (0-based in the tables): shown counted from 1
STEP_FIELDS = frozenset({"first_div", "first_divergence"})


def value_text(key: str, value) -> str:
    """One table value as `show` prints it: a step counted from 1, anything else through hierui.format."""
    return step_label(value) if key in STEP_FIELDS else metric(key, value)


def titled(title: str, table: Table, *notes: str) -> Group:
    """A table with its title (and notes) as lines of text above it, wrapped at the console's width."""
    lines = [Text(title, style="italic")] + [Text(note, style="dim") for note in notes if note]
    return Group(*lines, table)


# the report's per-spec rows as two tables that fit 80 columns: (title, notes, [(field, heading)])
TABLES = (
    (
        "the hierarchy, per spec ({basis} mode means over steps and prompts)",
        (),
        [
            ("spec", "spec"),
            ("sparsity", "sparsity"),
            ("emb_cos", "hidden\ncos"),
            ("logit_cos", "logit\ncos"),
            ("prob_cos", "prob\ncos"),
            ("kl", "KL"),
            ("kl_est", "KL\nest"),
            ("amp", "amp"),
            ("top1", "top-1\nagree"),
        ],
    ),
    (
        "accumulation, first divergence and multiple choice, per spec",
        (  # (the fields a note is about, the note): shown when one of them is
            (
                ("cum_kl_shared", "cum_kl_free"),
                "cum KL: the mean final accumulated KL over runs, per mode (where the chart of every run ends)",
            ),
            (
                ("first_div",),
                "1st div: the median step at which the free-mode texts split (step 1 = the first generated token)",
            ),
        ),
        [
            ("spec", "spec"),
            ("cum_kl_shared", "cum KL\nshared"),
            ("cum_kl_free", "cum KL\nfree"),
            ("first_div", "1st div\nmedian"),
            ("mc_items", "MC\nitems"),
            ("mc_acc_d", "MC acc\ndense"),
            ("mc_acc_p", "MC acc\npert"),
            ("mc_agree", "MC\nagree"),
            ("mc_sub_kl", "MC KL\nchoices"),
        ],
    ),
    (
        "flips, noise and recovery, per spec",
        (
            (
                ("flip_rate", "near_ties", "floor_flip_rate"),
                "flip rate: top-1 flips per compared step ({basis} mode); near ties: flips at a dense top-1/top-2 "
                "margin within the noise; noise: the flip rate of the dense model against itself (hierui noise)",
            ),
            (
                ("recovery_rate",),
                "recovered: free runs whose texts split and that follow the dense text to the end once fed the dense "
                "token at the split (--counterfactual)",
            ),
        ),
        [
            ("spec", "spec"),
            ("flip_rate", "flip\nrate"),
            ("near_ties", "near\nties"),
            ("floor_flip_rate", "noise\nflip rate"),
            ("recovery_rate", "recovered"),
        ],
    ),
)


def _table(**style) -> Table:
    from rich import box

    return Table(box=box.SIMPLE_HEAD, pad_edge=False, **style)


def _width(table: Table) -> int:
    from rich.measure import Measurement

    return Measurement.get(console, console.options.update_width(10_000), table).maximum


def _spec_table(rows: list[dict], shown: list[tuple[str, str]]) -> Table:
    table = _table(padding=(0, 1), collapse_padding=True)
    for key, heading in shown:
        table.add_column(heading, justify="left" if key == "spec" else "right", no_wrap=True)
    for r in rows:
        table.add_row(*[Text(escape(r["spec"])) if k == "spec" else value_text(k, r.get(k)) for k, _ in shown])
    return table


def _split(rows: list[dict], shown: list[tuple[str, str]], width: int | None) -> list[list[tuple[str, str]]]:
    """The columns `shown` (spec first) as the fewest tables of about equal size that fit `width`."""
    spec, rest = shown[0], shown[1:]
    for k in range(1, len(rest) + 1):
        size = -(-len(rest) // k)
        parts = [[spec, *rest[i : i + size]] for i in range(0, len(rest), size)]
        if not width or all(_width(_spec_table(rows, part)) <= width for part in parts):
            return parts
    return [[spec, column] for column in rest]


def spec_tables(rows: list[dict], basis: str | None = "shared", width: int | None = None) -> list[Group]:
    """engine.results.runs.spec_rows as rich tables, each under its title; columns without any value are left out.
    A table wider than `width` is cut into several of fewer columns (each keeps the spec column), so that
    no value is cut short."""
    tables = []
    for title, notes, fields in TABLES:
        shown = [(k, h) for k, h in fields if k == "spec" or any(r.get(k) is not None for r in rows)]
        if len(shown) < 2:
            continue
        parts = _split(rows, shown, width)
        for i, part in enumerate(parts):
            keys = {k for k, _ in part}
            kept = [note.format(basis=basis or "shared") for about, note in notes if keys.intersection(about)]
            heading = title.format(basis=basis or "shared") + (f" ({i + 1}/{len(parts)})" if len(parts) > 1 else "")
            tables.append(titled(heading, _spec_table(rows, part), *kept))
    return tables


def _plot(build, width: int, height: int) -> Text:
    import plotext as plt

    plt.clear_figure()
    plt.plotsize(width, height)
    plt.theme("pro")
    build(plt)
    text = plt.build()
    plt.clear_figure()
    return Text.from_ansi(text)


def step_ticks(last: int, most: int = 8) -> list[int]:
    """Whole steps 1 … last for an axis, at most about `most` of them (1, 2, 5, 10, 20, 50 … apart)."""
    gap = 1
    while last / gap > most:
        gap = gap * 5 // 2 if str(gap).startswith("2") else gap * 2
    return [1] + [t for t in range(gap, last + 1, gap) if t > 1]


def cum_kl_charts(run: R.RunData, width: int) -> list[tuple[str, Text]]:
    """The accumulated KL over steps (x: step counted from 1), as (what is drawn, chart) pairs.

    Runs stop at different steps (end of sequence): the first chart is the mean over every run, a run that
    stopped keeping its final value (it ends at the table's mean final cum KL); the second the mean over
    the runs still generating at each step, with how many they are in the legend (n first → last step).
    When every run generated every step the two are the same and one chart says so.
    """
    curves = R.cum_kl_curves(run)
    if not curves:
        return []

    def chart(values, label) -> Text:
        def build(plt):
            for c in curves.values():
                plt.plot(
                    [step + 1 for step in c.steps],
                    values(c),
                    label=label(c),
                    marker="braille" if c.mode == "shared" else "dot",
                )
            plt.xticks(step_ticks(max(c.steps[-1] for c in curves.values()) + 1))
            plt.xlabel("step")

        return _plot(build, width, 16)

    runs = sorted({c.runs for c in curves.values()})
    every = f"{runs[0]}" if len(runs) == 1 else f"{runs[0]}–{runs[-1]}"
    if not any(c.varies for c in curves.values()):
        lengths = sorted({c.lengths[1] for c in curves.values()})
        return [
            (
                f"accumulated KL over generation steps, mean over the {every} runs per line (each generated "
                f"all {'/'.join(map(str, lengths))} steps)",
                chart(lambda c: c.carried, lambda c: f"{c.spec} {c.mode}"),
            )
        ]
    return [
        (
            f"accumulated KL over generation steps, mean over all {every} runs per line: a run that stopped "
            "keeps its final value, so the curves end at the table's cum KL",
            chart(lambda c: c.carried, lambda c: f"{c.spec} {c.mode}"),
        ),
        (
            "accumulated KL over generation steps, mean over only the runs still generating (both models) at "
            "each step: n in the legend falls from the first step to the last",
            chart(lambda c: c.generating, lambda c: f"{c.spec} {c.mode} n {c.n[0]}→{c.n[-1]}"),
        ),
    ]


def choice_chart(run: R.RunData, width: int) -> Text | None:
    rows = [r for r in R.choice_rows(run) if r["acc_d"] is not None]
    if not rows:
        return None

    def build(plt):
        plt.multiple_bar(
            [r["spec"] for r in rows],
            [[r["acc_d"] for r in rows], [r["acc_p"] for r in rows]],
            labels=["dense", "perturbed"],
        )
        plt.ylim(0, 1)

    return _plot(build, width, 14)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' * (n != 1)}"


def show_batch(path: Path, console: Console) -> None:
    run = R.load_run(path)
    rows = R.spec_rows(run)
    name = run.recipe.get("name")
    # text from the folder's files is escaped and printed as plain text (no markup, no control characters)
    console.print(Text(f"batch output {path}" + (f" (recipe {escape(name)})" if name else ""), style="italic"))
    n_runs, n_mc = len(run.summary), len({r.get("item_id") for r in run.mc})
    console.print(
        Text(
            f"model {escape(run.manifest.get('model') or MISSING)}"
            + (f" ({escape(architecture_summary(arch))})" if (arch := run.manifest.get("architecture")) else "")
            + f" · {_plural(len(run.specs), 'spec')} · "
            f"{_plural(n_runs, 'generation run')}" + (f" · {_plural(n_mc, 'multiple-choice item')}" if n_mc else "")
        ),
        highlight=False,
    )
    for table in spec_tables(rows, R.basis_mode(run), console.width):
        console.print()
        console.print(table)
    width = max(40, min(console.width, 120))
    charts = cum_kl_charts(run, width)
    mc = choice_chart(run, width)
    if mc is not None:
        charts.append(("multiple-choice accuracy per spec, dense and perturbed", mc))
    for title, chart in charts:
        console.print()
        console.print(Text(title, style="italic"))
        console.print(chart, soft_wrap=True)
    paired = R.choice_paired_rows(run)
    for table in flip_tables(paired):
        console.print()
        console.print(table)
    if run.mc_summary:
        console.print(f"multiple choice per item: {path / 'mc.parquet'}", highlight=False)
    for table in worker_tables(path):
        console.print()
        console.print(table)
    console.print(
        f"per run: {path / 'summary.csv'} · sessions: hierui show {path / 'sessions'} · HTML: hierui report {path}",
        highlight=False,
        soft_wrap=True,
    )


# ------------------------------------------------------------------ a sweep run on Ray (hierui batch --ray)

RUNS_LISTED = 24  # `show` lists each run's worker and time up to this many runs


def worker_tables(path: Path) -> list[Group]:
    """Who ran what, from OUT/workers.jsonl (engine.sweep.distributed; none for a local sweep): a row per worker (its
    runs, specs, mean time per run, pruning time), whether every worker pruned each spec identically (the mask
    hashes), and, for a small sweep, a row per run."""
    from engine.sweep.distributed import mask_agreement, read_workers

    lines = read_workers(path)
    if not lines:
        return []
    workers: dict[str, dict] = {}
    for line in lines:
        w = workers.setdefault(str(line.get("worker")), {"runs": [], "specs": [], "prune": 0.0, "cached": 0})
        if line.get("kind") == "run":
            w["runs"].append(line)
        elif line.get("kind") == "prune":
            w["specs"].append(str(line.get("spec")))
            w["prune"] += float(line.get("seconds") or 0)
            w["cached"] += bool(line.get("from_cache"))
    table = _table(collapse_padding=True)
    for name, justify in (("worker", "left"), ("runs", "right"), ("specs held", "left"), ("s/run", "right")):
        table.add_column(name, justify=justify, no_wrap=name != "specs held")
    table.add_column("perturbing", justify="right", no_wrap=True)
    for name, w in workers.items():
        timed = [float(r["seconds"]) for r in w["runs"] if r.get("seconds") is not None]
        shown = "finished by a worker that died" if name == "None" else name
        table.add_row(
            Text(escape(shown)),
            str(len(w["runs"])),
            Text(escape(", ".join(dict.fromkeys(w["specs"])) or MISSING)),
            f"{sum(timed) / len(timed):.2f}" if timed else MISSING,
            f"{w['prune']:.1f} s" + (f" ({w['cached']} from cache)" if w["cached"] else "") if w["specs"] else MISSING,
        )
    hashes = mask_agreement(lines)
    differ = [spec for spec, found in hashes.items() if len(found) > 1]
    agreement = (
        f"pruned differently on different workers (mask hashes differ): {', '.join(differ)}"
        if differ
        else "every worker that perturbed a spec found the same mask (hash)"
        if hashes
        else ""
    )
    retried = [r for w in workers.values() for r in w["runs"] if (r.get("attempt") or 1) > 1]
    notes = [
        "s/run: a run's time from the start of its batch (runs are stepped together) to its end",
        agreement,
        f"{len(retried)} run(s) recorded on a later attempt, after a worker died" if retried else "",
    ]
    groups = [titled(f"Ray: {len(workers)} workers ({path / 'workers.jsonl'})", table, *notes)]
    runs = [r for w in workers.values() for r in w["runs"]]
    if 0 < len(runs) <= RUNS_LISTED:
        per_run = _table(collapse_padding=True)
        for name, justify in (("run", "left"), ("worker", "left"), ("seconds", "right"), ("attempt", "right")):
            per_run.add_column(name, justify=justify, no_wrap=True)
        for r in sorted(runs, key=lambda r: str(r.get("run_id"))):
            seconds = r.get("seconds")
            per_run.add_row(
                Text(escape(str(r.get("run_id")))),
                Text(escape(str(r.get("worker") or MISSING))),
                MISSING if seconds is None else f"{float(seconds):.2f}",
                str(r.get("attempt") or MISSING),
            )
        groups.append(titled("Ray: who ran each run", per_run))
    return groups


# ------------------------------------------------------------------ multiple choice, and the means of `hierui batch`


def choice_table(rows: list[dict]) -> Group:
    """Multiple-choice items per spec: accuracy of both models, agreement, subspace vs full-vocabulary KL."""
    table = _table()
    for name, justify in (
        ("spec", "left"),
        ("items", "right"),
        ("acc d", "right"),
        ("acc p", "right"),
        ("agree", "right"),
        ("sub KL", "right"),
        ("KL", "right"),
    ):
        table.add_column(name, justify=justify, no_wrap=True)
    for r in rows:
        table.add_row(
            Text(escape(r["spec"])),
            *[metric(k, r.get(k)) for k in ("items", "acc_d", "acc_p", "agree_rate", "sub_kl_mean", "kl_mean")],
        )
    return titled("multiple choice (scored, no generation), per spec", table)


def _ci(name: str, row: dict, key: str) -> str:
    """row[key] over its 95% interval, on two lines: "0.500" then "[0.250, 0.750]"."""
    low, high = row.get(f"{key}_lo"), row.get(f"{key}_hi")
    text = metric(name, row.get(key))
    return text if low is None or high is None else f"{text}\n[{metric(name, low)}, {metric(name, high)}]"


def flip_tables(rows: list[dict]) -> list[Group]:
    """Multiple choice per spec (engine.results.runs.choice_paired_rows) as two narrow tables: the flips of correctness
    with McNemar's exact p; the perturbed accuracy, its change and the KL at the answer over their 95%
    bootstrap intervals."""
    flips = _table(collapse_padding=True)
    for name in ("spec", "items", "right→\nwrong", "wrong→\nright", "both\nright", "both\nwrong", "McNemar\np"):
        flips.add_column(name, justify="left" if name == "spec" else "right", no_wrap=True)
    keys = ("items", "right_to_wrong", "wrong_to_right", "both_right", "both_wrong", "mcnemar_p")
    for r in rows:
        flips.add_row(Text(escape(r["spec"])), *[metric(k, r.get(k)) for k in keys])
    intervals = _table(collapse_padding=True)
    for name in ("spec", "acc perturbed", "Δ acc (p − d)", "KL at answer"):
        intervals.add_column(name, justify="left" if name == "spec" else "right", no_wrap=True)
    for r in rows:
        intervals.add_row(
            Text(escape(r["spec"])), _ci("acc", r, "acc_p"), _ci("acc", r, "acc_diff"), _ci("kl", r, "kl")
        )
    return [
        titled(
            "multiple choice: flips of correctness and McNemar's exact test, per spec",
            flips,
            "right→wrong: items the dense model gets right and the perturbed one wrong (wrong→right the reverse); "
            "McNemar p: the exact test that both directions are equally likely",
        ),
        titled(
            "multiple choice: means with their 95% intervals, per spec",
            intervals,
            "[low, high]: percentile bootstrap over the items (2000 resamples, seed 0); Δ acc: perturbed − dense",
        ),
    ]


def batch_table(groups: list[dict], fields: dict, width: int) -> Group:
    """Means per (spec, mode): a row per group, or, where that is wider than `width`, a column per group."""
    from rich.measure import Measurement

    shown = [name for name in fields if any(g[name] is not None for g in groups)]
    title = "mean over runs, per spec and mode"
    note = "1st div: the step at which the free-mode texts split, counted from 1" if "first_divergence" in shown else ""
    table = _table(collapse_padding=True)
    for name in ("spec", "mode", "runs", *shown):
        table.add_column(fields.get(name, name), justify="left" if name in ("spec", "mode") else "right", no_wrap=True)
    for g in groups:
        table.add_row(Text(g["spec"]), g["mode"], str(g["runs"]), *[value_text(name, g[name]) for name in shown])
    if Measurement.get(console, console.options.update_width(10_000), table).maximum <= width:
        return titled(title, table, note)
    table = _table(collapse_padding=True)
    table.add_column("")
    for g in groups:
        table.add_column(f"{g['spec']}\n{g['mode']}", justify="right", no_wrap=True)
    table.add_row("runs", *[str(g["runs"]) for g in groups])
    for name in shown:
        table.add_row(fields[name], *[value_text(name, g[name]) for g in groups])
    return titled(title, table, note)
