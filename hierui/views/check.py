"""`hierui check` as text: the summary line, the spec × check table, the reasons of what failed or was skipped."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text

from engine.record.architecture import summary as architecture_summary
from hierui.format import num
from hierui.progress import duration

# n/a reasons that the table itself makes plain: not repeated under it
_OBVIOUS = ("only for none", "pruning specs only")
STYLE = {"pass": "green", "fail": "bold red", "n/a": "dim"}


def summary_line(report) -> str:
    arch = report.architecture or {}
    parts = [report.display, f"{report.device} {report.dtype}", architecture_summary(arch)]
    if arch.get("class") or arch.get("parameters"):
        parts.append(f"{arch.get('class') or '?'}, {(arch.get('parameters') or 0) / 1e6:.1f}M parameters")
    calib = report.calibration or {}
    parts.append(f"{report.steps} steps, calibration {calib.get('samples')}×{calib.get('length')}")
    return " · ".join(parts)


def cell(result) -> Text:
    if result.status == "n/a":
        return Text("n/a", style=STYLE["n/a"])
    label = "PASS" if result.status == "pass" else "FAIL"
    if result.check == "sharing" and result.measure:
        shown = result.measure.removesuffix(" shared")
    elif result.value is None:
        shown = ""
    else:
        shown = num(result.value, 2)
    return Text(label, style=STYLE[result.status]) + Text(f" {shown}" if shown else "")


def check_table(report) -> Table:
    from engine.check.selfcheck import CHECKS

    table = Table(title="hierui check: each check's status and the deviation it measured", title_justify="left")
    table.add_column("spec", no_wrap=True)
    for check in CHECKS:
        table.add_column(check, no_wrap=True)
    by = {(r.spec, r.check): r for r in report.results}
    for spec in report.specs:
        row = [by.get((spec, c)) for c in CHECKS]
        table.add_row(spec, *[cell(r) if r is not None else Text("") for r in row])
    return table


def notes(report) -> list[Text]:
    """One line per failure, and per spec for the n/a reasons the table does not explain."""
    lines = []
    for r in report.results:
        if r.status == "fail":
            lines.append(Text("FAIL ", style=STYLE["fail"]) + Text(f"{r.spec} · {r.check}: {r.reason}"))
    said = set()
    for r in report.results:
        if r.status == "n/a" and r.reason not in _OBVIOUS and (r.spec, r.reason) not in said:
            said.add((r.spec, r.reason))
            lines.append(Text("n/a  ", style=STYLE["n/a"]) + Text(f"{r.spec}: {r.reason}"))
    return lines


def print_check(console, report) -> None:
    from engine.check.selfcheck import tolerance_rule

    console.print(Text(summary_line(report)), highlight=False, soft_wrap=True)
    console.print(check_table(report))
    for line in notes(report):
        console.print(line, highlight=False, soft_wrap=True)
    console.print(Text(f"tolerances: {tolerance_rule(report.dtype)}", style="dim"), highlight=False, soft_wrap=True)
    counts = {s: sum(r.status == s for r in report.results) for s in ("pass", "fail", "n/a")}
    verdict = (
        f"{counts['fail']} check{'s' * (counts['fail'] != 1)} failed"
        if counts["fail"]
        else "every applicable check passed"
    )
    console.print(
        f"{verdict}: {counts['pass']} pass, {counts['fail']} fail, {counts['n/a']} n/a in {duration(report.seconds)}",
        highlight=False,
        soft_wrap=True,
    )
