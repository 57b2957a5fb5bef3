"""THE number formatting of hierui: the explorer's panels, `hierui show`, the batch tables and the HTML report
all print numbers through here, so that one metric reads the same everywhere.

    num(value, digits=4)   `digits` significant digits, trailing zeros kept (0.5000, 0.01230, 1.234e-05);
                           an int as it is; a bool yes/no; None MISSING (—); nan, inf, -inf as those words
    pct(value)             a fraction as a percentage with two decimals (0.5 → 50.00%)
    prob(value)            a probability in a table column: three decimals (0.042)
    metric(name, value)    num() with the digits of the metric's kind, read from its name (KINDS):
                           similarities (…cos…) 5 digits, since they sit near 1 and differ in the 3rd–5th
                           (the layer panel's precision); rates and accuracies 3; Δp (dp) 2, a coarse hint
                           beside its rank shift; sparsity a percentage; steps and counts whole numbers (one
                           decimal for a mean or median between two); everything else (KL, TV, JS, amp,
                           accumulated KL, NLL gap, temperature, …) 4
"""

from __future__ import annotations

import math
import numbers
import re

MISSING = "—"
DEFAULT_DIGITS = 4
PCT, COUNT = "pct", "count"

# (words of a metric's name, its kind: significant digits, PCT or COUNT); the first kind that shares a word
# with the name wins. Names are split at anything but letters and digits: emb_cos[L] → emb, cos, l.
KINDS: tuple[tuple[frozenset[str], int | str], ...] = (
    (frozenset({"sparsity"}), PCT),
    (
        frozenset(
            {"runs", "steps", "step", "items", "diverged", "div", "divergence", "median", "min", "max", "shift", "ties"}
        ),
        COUNT,
    ),
    (frozenset({"cos"}), 5),
    (frozenset({"rate", "acc", "agree", "top1", "overlap", "share"}), 3),
    (frozenset({"dp"}), 2),
)


def _special(value) -> str | None:
    """The text for a value that is not a finite number to format, or None when it is one."""
    if value is None:
        return MISSING
    if isinstance(value, bool) or type(value).__name__ in ("bool", "bool_"):  # numpy's bool too
        return "yes" if value else "no"
    if isinstance(value, str):
        return value
    if not isinstance(value, numbers.Real):
        return str(value)
    if isinstance(value, numbers.Integral):
        return str(int(value))
    x = float(value)
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return None


def num(value, digits: int = DEFAULT_DIGITS) -> str:
    """A number with `digits` significant digits (trailing zeros kept, so a column's precision shows)."""
    special = _special(value)
    if special is not None:
        return special
    x = float(value) or 0.0  # no -0
    text = f"{x:#.{max(int(digits), 1)}g}"
    return re.sub(r"\.(?=e|$)", "", text)  # '#' keeps a bare point: 1234. → 1234, 1.e+05 → 1e+05


def pct(value, decimals: int = 2) -> str:
    """A fraction as a percentage: 0.5 → 50.00%."""
    special = _special(value)
    if special is not None and not (isinstance(value, numbers.Integral) and not isinstance(value, bool)):
        return special
    return f"{float(value):.{decimals}%}"


def prob(value, decimals: int = 3) -> str:
    """A probability in a table column, fixed decimals so the column lines up: 0.0417 → 0.042."""
    special = _special(value)
    if special is not None and not (isinstance(value, numbers.Integral) and not isinstance(value, bool)):
        return special
    return f"{float(value):.{decimals}f}"


def count(value) -> str:
    """A step or a count: whole numbers as such, a mean or median between two with one decimal."""
    special = _special(value)
    if special is not None:
        return special
    x = float(value)
    return str(int(x)) if x.is_integer() else f"{x:.1f}"


def kind(name: str) -> int | str:
    """The kind of the metric called `name`: its significant digits, PCT or COUNT."""
    words = set(re.split(r"[^a-z0-9]+", str(name).lower()))
    for names, found in KINDS:
        if words & names:
            return found
    return DEFAULT_DIGITS


def metric(name: str, value) -> str:
    """`value` printed as the metric `name` always is (KINDS)."""
    found = kind(name)
    if found == PCT:
        return pct(value)
    if found == COUNT:
        return count(value)
    return num(value, found)


def step_label(index) -> str:
    """A step as people read it: counted from 1 (session files and tables count `step` from 0). A mean or
    median of steps (a float) shifts the same way and prints as count() does: 3.5 → 4.5, 3.0 → 4."""
    if index is None or isinstance(index, bool) or not isinstance(index, numbers.Real):
        return MISSING if index is None else str(index)
    if isinstance(index, numbers.Integral):
        return str(int(index) + 1)
    return count(float(index) + 1) if math.isfinite(index) else count(index)


def ended_note(record: dict | None) -> str | None:
    """Why a free-mode step compares nothing: a model had ended before it (`end_d`/`end_p`), else None."""
    if not record:
        return None
    for side, name in (("d", "dense"), ("p", "perturbed")):
        end = record.get(f"end_{side}")
        if isinstance(end, int) and not isinstance(end, bool) and end < record.get("step", -1):
            return f"{name} ended at step {step_label(end)}: nothing to compare"
    return None


OUT_OF_RANGE = "n/a"  # a cosine's second-order estimate outside [−1, 1]: the approximation no longer holds


def cos_estimate(value, measured) -> str:
    """A cosine's second-order estimate as shown: OUT_OF_RANGE where it left [−1, 1] (recorded as null beside a
    measurement, or out of range in an older session), MISSING where nothing was measured either."""
    if value is None:
        return OUT_OF_RANGE if measured is not None else MISSING
    if not -1.0 <= value <= 1.0:
        return OUT_OF_RANGE
    return metric("cos_est", value)
