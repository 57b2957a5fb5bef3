"""`hierui show RUN_DIR` for a `hierui batch` output: the report's per-spec table (engine.runs.spec_rows)
in the terminal, with plotext charts of the accumulated KL over steps and of multiple-choice accuracy.
Reads files only: no torch, no transformers."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from engine import runs as R
from hierui.format import MISSING, metric
from hierui.output import console


def is_batch_output(path: Path) -> bool:
    return (path / "batch.json").is_file() and (path / "summary.parquet").is_file()


# the report's per-spec rows as two tables that fit 80 columns: (title, [(field, heading)])
TABLES = (
    (
        "the hierarchy, per spec ({basis} mode means over steps and prompts)",
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
)


def spec_tables(rows: list[dict], basis: str | None = "shared") -> list[Table]:
    """engine.runs.spec_rows as rich tables; columns without any value are left out."""
    from rich import box

    tables = []
    for title, fields in TABLES:
        shown = [(k, h) for k, h in fields if k == "spec" or any(r.get(k) is not None for r in rows)]
        if len(shown) < 2:
            continue
        table = Table(
            title=title.format(basis=basis or "shared"),
            title_justify="left",
            box=box.SIMPLE_HEAD,
            pad_edge=False,
            padding=(0, 1),
            collapse_padding=True,
        )
        for key, heading in shown:
            table.add_column(heading, justify="left" if key == "spec" else "right", no_wrap=True)
        for r in rows:
            table.add_row(*[Text(r["spec"]) if k == "spec" else metric(k, r.get(k)) for k, _ in shown])
        tables.append(table)
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


def cum_kl_chart(run: R.RunData, width: int) -> Text | None:
    curves = R.cum_kl_curves(run)
    if not curves:
        return None

    def build(plt):
        for (spec, mode), pts in curves.items():
            plt.plot(
                [p[0] for p in pts],
                [p[1] for p in pts],
                label=f"{spec} {mode}",
                marker="braille" if mode == "shared" else "dot",
            )
        plt.title("accumulated KL over generation steps (mean over prompts)")
        plt.xlabel("step")

    return _plot(build, width, 18)


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
        plt.title("multiple-choice accuracy per spec")

    return _plot(build, width, 14)


def show_batch(path: Path, console: Console) -> None:
    run = R.load_run(path)
    rows = R.spec_rows(run)
    name = run.recipe.get("name")
    console.print(Text(f"batch output {path}" + (f" (recipe {name})" if name else ""), style="italic"))
    n_runs, n_mc = len(run.summary), len({r.get("item_id") for r in run.mc})
    console.print(
        f"model {run.manifest.get('model', MISSING)} · {len(run.specs)} specs · {n_runs} generation runs"
        + (f" · {n_mc} multiple-choice items" if n_mc else ""),
        highlight=False,
    )
    for table in spec_tables(rows, R.basis_mode(run)):
        console.print(table)
    width = max(40, min(console.width, 120))
    for chart in (cum_kl_chart(run, width), choice_chart(run, width)):
        if chart is not None:
            console.print(chart, soft_wrap=True)
    if run.mc_summary:
        console.print(f"multiple choice per item: {path / 'mc.parquet'}", highlight=False)
    console.print(
        f"per run: {path / 'summary.csv'} · sessions: hierui show {path / 'sessions'} · HTML: hierui report {path}",
        highlight=False,
        soft_wrap=True,
    )


# ------------------------------------------------------------------ while `hierui batch` runs


class BatchBars:
    """The progress hooks of engine.sweep.run_sweep as rich bars on stderr: the runs of the sweep, the
    tokens of the current run, and the slow stages (calibrating, pruning) while they last."""

    def __init__(self, target: Console):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description:<28}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=target,
            transient=True,
        )
        self.runs = self.tokens = None
        self.stages: dict[str, int] = {}

    def sweep_started(self, total: int, done: int) -> None:
        self.progress.start()
        self.runs = self.progress.add_task("runs", total=total, completed=done)

    def message(self, text: str) -> None:
        self.progress.console.print(f"[dim]{text}[/]", highlight=False)

    def stage(self, stage: str, done: int, total: int) -> None:
        if total <= 0:
            self.message(stage)
            return
        if stage not in self.stages:
            self._clear_stages()  # a stage may stop short of its total (calibrating does): a new one ends it
            self.stages[stage] = self.progress.add_task(stage, total=total)
        self.progress.update(self.stages[stage], completed=done, total=total)
        if done >= total:
            self.progress.remove_task(self.stages.pop(stage))

    def _clear_stages(self) -> None:
        for task in self.stages.values():
            self.progress.remove_task(task)
        self.stages.clear()

    def run_started(self, run, max_tokens: int) -> None:
        self._clear_stages()
        if self.tokens is None:
            self.tokens = self.progress.add_task(run.run_id, total=max_tokens)
        self.progress.reset(self.tokens, total=max_tokens, description=run.run_id)

    def batch_started(self, runs, max_tokens: int) -> None:
        more = f" +{len(runs) - 1}" if len(runs) > 1 else ""
        self.run_started(runs[0], max_tokens)
        self.progress.update(self.tokens, description=f"{runs[0].run_id}{more}")

    def step(self, run, record: dict) -> None:
        self.progress.advance(self.tokens)

    def run_finished(self, run) -> None:
        self.progress.advance(self.runs)

    def close(self) -> None:
        self.progress.stop()


def choice_table(rows: list[dict]) -> Table:
    """Multiple-choice items per spec: accuracy of both models, agreement, subspace vs full-vocabulary KL."""
    from rich import box

    table = Table(
        title="multiple choice (scored, no generation), per spec",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
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
            r["spec"],
            *[metric(k, r.get(k)) for k in ("items", "acc_d", "acc_p", "agree_rate", "sub_kl_mean", "kl_mean")],
        )
    return table


def batch_table(groups: list[dict], fields: dict, width: int) -> Table:
    """Means per (spec, mode): a row per group, or, where that is wider than `width`, a column per group."""
    from rich import box
    from rich.measure import Measurement

    shown = [name for name in fields if any(g[name] is not None for g in groups)]
    style = dict(
        title="mean over runs, per spec and mode",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
    )
    table = Table(**style)
    for name in ("spec", "mode", "runs", *shown):
        table.add_column(fields.get(name, name), justify="left" if name in ("spec", "mode") else "right", no_wrap=True)
    for g in groups:
        table.add_row(g["spec"], g["mode"], str(g["runs"]), *[metric(name, g[name]) for name in shown])
    if Measurement.get(console, console.options.update_width(10_000), table).maximum <= width:
        return table
    table = Table(**style)
    table.add_column("")
    for g in groups:
        table.add_column(f"{g['spec']}\n{g['mode']}", justify="right", no_wrap=True)
    table.add_row("runs", *[str(g["runs"]) for g in groups])
    for name in shown:
        table.add_row(fields[name], *[metric(name, g[name]) for g in groups])
    return table
