"""How the checks compare numbers: a field as numbers, the deviation of two fields, a magnitude, a relative
difference of two tensors, and the verdict of a check made of several (measure, deviation, tolerance) parts."""

from __future__ import annotations

import math

import torch

from engine.check.result import CheckResult


def verdict(spec: str, check: str, parts: list[tuple[str, float, float]], note: str = "") -> CheckResult:
    """A check made of (measure, deviation, tolerance) parts: the one furthest beyond its tolerance decides."""

    def ratio(part):
        _, dev, tol = part
        if math.isnan(dev):
            return math.inf
        if tol <= 0:
            return math.inf if dev > 0 else 0.0
        return dev / tol

    if not parts:
        return CheckResult(spec, check, "fail", reason="nothing was compared")
    measure, dev, tol = max(parts, key=ratio)
    ok = all(ratio(p) <= 1.0 for p in parts)
    reason = note or (f"worst: {measure}" if ok else f"{measure} deviates by {dev:.3g} (tolerance {tol:.3g})")
    return CheckResult(spec, check, "pass" if ok else "fail", dev, tol, reason, measure)


def as_numbers(value) -> list[float | None] | None:
    """A field as a flat list of numbers (None for null), or None when it is not numeric."""
    if value is None:
        return [None]
    if isinstance(value, (bool, int, float)):
        return [float(value)]
    if isinstance(value, list) and all(v is None or isinstance(v, (bool, int, float)) for v in value):
        return [None if v is None else float(v) for v in value]
    return None


def deviation(a, b) -> float:
    """Largest |a_i − b_i| of two fields; null against null is 0, null against a number or a shape change inf."""
    from engine.run.rerun import max_abs

    return max_abs(as_numbers(a), as_numbers(b))


def largest_magnitude(*values) -> float:
    """The largest finite |v| in some fields (0 if none)."""
    found = [abs(x) for v in values for x in (as_numbers(v) or []) if x is not None and math.isfinite(x)]
    return max(found, default=0.0)


def relative_error(a: torch.Tensor, b: torch.Tensor, scale: float) -> float:
    return float((a.float() - b.float()).abs().max()) / max(scale, 1e-30)
