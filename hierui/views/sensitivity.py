"""The terminal table of `hierui sensitivity`: one row per (unit, level), sorted by damage (mean KLD, highest first),
with a bar per unit scaled to the worst one. Three significant digits, to fit a terminal; the Parquet table has every
column at full precision (the median among them)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table
from rich.text import Text

from hierui.format import num, pct
from hierui.tokentext import escape

BAR = 12  # characters of the longest bar
NARROW = 110  # below this terminal width: units without their 'layers.' prefix, no interval column, a shorter bar


def bar(value: float | None, worst: float, width: int = BAR) -> str:
    """`value` as a bar of up to `width` eighths-resolution blocks, the worst value the full width."""
    if value is None or not worst > 0 or not value > 0:
        return ""
    eighths = round(min(value / worst, 1.0) * width * 8)
    return "█" * (eighths // 8) + ("", "▏", "▎", "▍", "▌", "▋", "▊", "▉")[eighths % 8]


def sensitivity_table(rows: list[dict], limit: int | None = None, width: int | None = None) -> Table:
    """The table; `width`: the terminal's columns (narrower than NARROW: the compact form, every column readable
    at 80 columns; the interval stays in the Parquet table)."""
    narrow = width is not None and width < NARROW
    ranked = sorted(rows, key=lambda r: -(r.get("kl_mean") or 0.0))
    shown = ranked[:limit] if limit else ranked
    worst = max((r.get("kl_mean") or 0.0 for r in ranked), default=0.0)
    levels = len({r["level"] for r in rows})
    by_sparsity = levels > 1 and all(r.get("sparsity") is not None for r in rows)  # wanda:0.3, wanda:0.6: 0.3, 0.6
    from rich import box

    table = Table(
        title=f"per-unit damage, each unit perturbed alone ({len(rows)} rows, highest mean KLD first)",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        padding=(0, 1),
        collapse_padding=True,
    )
    table.add_column("unit", no_wrap=True)
    if levels > 1:
        table.add_column(
            "sparsity" if by_sparsity else "level", no_wrap=True, justify="right" if by_sparsity else "left"
        )
    wide = ("KLD mean", "95% interval", "KLD p99", "same top", "ΔPPL")
    headings = ("KLD", "p99", "top-1", "ΔPPL") if narrow else wide
    for heading in headings:
        table.add_column(heading, justify="right", no_wrap=True)
    table.add_column("", no_wrap=True, style="red")
    for r in shown:
        unit = r["unit"].removeprefix("layers.") if narrow else r["unit"]
        cells = [Text(escape(unit))]
        if levels > 1:
            cells.append(f"{r['sparsity']:g}" if by_sparsity else Text(escape(r["level"])))
        interval = [] if narrow else [f"{num(r['kl_mean_lo'], 3)} … {num(r['kl_mean_hi'], 3)}"]
        cells += [
            num(r["kl_mean"], 3),
            *interval,
            num(r["kl_p99"], 3),
            pct(r["same_top"], 1),
            num(r["ppl_delta"], 3),
            bar(r["kl_mean"], worst, BAR // 2 if narrow else BAR),
        ]
        table.add_row(*cells)
    return table


def print_table(console: Console, rows: list[dict], out, limit: int | None = None, allocation=None) -> None:
    """The table, where the tables are, and the allocation written (if any)."""
    if rows and len({r["level"] for r in rows}) > 1:
        console.print(f"levels: {', '.join(dict.fromkeys(r['level'] for r in rows))}", highlight=False, markup=False)
    console.print(sensitivity_table(rows, limit, console.width))
    if limit and len(rows) > limit:
        console.print(f"… {len(rows) - limit} more rows in the table", style="dim", highlight=False)
    console.print(
        f"tables: {out}/sensitivity.parquet, {out}/sensitivity.csv", highlight=False, markup=False, soft_wrap=True
    )
    if allocation is not None:
        console.print(
            f"allocation: {out}/allocation.json ({allocation['method']}:{allocation['target']:g}, predicted mean KLD "
            f"{num(allocation.get('predicted_kl'))}); prune with --prune {allocation['method']}:"
            f"{allocation['target']:g}@{out}/allocation.json",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )
