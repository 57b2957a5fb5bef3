"""The pieces the report's template takes: a table's cells as text, a value with its interval, a chart as markup."""

from __future__ import annotations

from hierui.format import metric, step_label
from hierui.tokentext import escape

TEXT_FIELDS = ("spec", "pair", "len_shared", "len_free")  # printed as text (escaped by hierui.tokentext) …
STEP_FIELDS = ("first_div", "first_divergence")  # … steps (0-based in the tables) counted from 1 …
# … every other field by hierui.format


def cell(key: str, value, steps: tuple[str, ...] = ()) -> str:
    """One value of a table as the page prints it (`steps`: more fields that hold a step)."""
    if key in TEXT_FIELDS:
        return escape(value)
    if key in STEP_FIELDS or key in steps:
        return step_label(value)
    return metric(key, value)


def table(columns: list[tuple[str, str]], rows: list[dict], steps: tuple[str, ...] = ()) -> dict:
    """(field, heading) columns over rows → the template's {head, rows} of text."""
    return {
        "head": [title for _, title in columns],
        "rows": [[cell(key, row.get(key), steps) for key, _ in columns] for row in rows],
    }


def interval(name: str, low, high) -> str | None:
    """A 95% interval as printed beside its mean: "[1.050, 1.370]" in the digits of the metric `name`."""
    if low is None or high is None:
        return None
    return f"[{metric(name, low)}, {metric(name, high)}]"


def with_interval(name: str, row: dict, key: str) -> str | None:
    """row[key] and its interval row[key_lo]..row[key_hi] as one text: "1.200 [1.050, 1.370]"."""
    if row.get(key) is None:
        return None
    ci = interval(name, row.get(f"{key}_lo"), row.get(f"{key}_hi"))
    return metric(name, row[key]) + (f" {ci}" if ci else "")


def svg(text: str | None):
    """A chart's SVG text (hierui.report.charts) as markup the template inserts unescaped; None when no chart."""
    from markupsafe import Markup

    return Markup(text) if text else None


def names(specs: list[str]) -> str:
    """Specs as a sentence lists them: "a", "a and b", "a, b and c"."""
    return ", ".join(specs[:-1]) + f" and {specs[-1]}" if len(specs) > 1 else specs[0]
