"""Paired statistics: flips, McNemar's exact test and seeded bootstrap intervals, for two models on the same items.

    mcnemar_exact(b, c)          two-sided exact McNemar p-value from the discordant pairs b, c
    flips(correct_d, correct_p)  right → wrong, wrong → right, both right, both wrong, n, McNemar's p
    bootstrap_ci(values, …)      (estimate, low, high): percentile bootstrap, resampling groups with replacement
    paired_bootstrap_diff(a, b)  (diff, low, high, p): a − b on aligned items, resampled jointly
    choice_spec_rows(rows, …)    OUT/mc_paired's rows: per spec, flips + McNemar + intervals (from mc.parquet rows)
    choice_pair_rows(rows, …)    OUT/mc_pairs's rows: per pair of specs, accuracy and KL differences

A resampling unit is an item, a prompt or a corpus window: `groups` gives each value's unit, and a unit's values
are resampled together (every value its own unit without `groups`). The generator is numpy's PCG64 seeded with
`seed`, so the same input gives the same interval, bit for bit. An interval of nothing is (nan, nan, nan).
numpy only (no torch, no UI): the sweeps, `hierui kld` and the faces call it.
"""

from __future__ import annotations

import math
from fractions import Fraction
from itertools import combinations

import numpy as np

SILENT_KL = 0.01  # nats: a mean KL below this (or below the noise floor's) reads as "no change"
SIGNIFICANT = 0.05  # McNemar's p below this: the flips are not chance


def silent_limit(floor_kl=None) -> float:
    """The mean KL under which a spec "looks unchanged": the noise floor's mean KL where `hierui noise` measured
    one above SILENT_KL, else SILENT_KL."""
    return max(SILENT_KL, floor_kl or 0.0)


def is_silent(kl_mean, mcnemar_p, floor_kl=None) -> bool:
    """A "silent" failure: a mean KL below `silent_limit` while the flips of correctness are significant."""
    if kl_mean is None or mcnemar_p is None:
        return False
    return kl_mean < silent_limit(floor_kl) and mcnemar_p < SIGNIFICANT


N_BOOT = 2000
SEED = 0
LEVEL = 0.95


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: the binomial test of b successes in b + c trials at p = ½, as
    min(1, 2·P(X ≤ min(b, c))); 1 when b + c = 0. Exact rational arithmetic, so no rounding below 1e-300."""
    b, c = int(b), int(c)
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be non-negative, got {b}, {c}")
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = Fraction(sum(math.comb(n, i) for i in range(k + 1)), 2**n)
    return float(min(Fraction(1), 2 * tail))


def flips(correct_d, correct_p) -> dict:
    """Per-item correctness of the dense and the perturbed model (aligned) → the 2×2 counts and McNemar's p:
    right_to_wrong (dense right, perturbed wrong), wrong_to_right, both_right, both_wrong, n, mcnemar_p."""
    d = np.asarray(correct_d, dtype=bool)
    p = np.asarray(correct_p, dtype=bool)
    if d.shape != p.shape:
        raise ValueError(f"correct_d and correct_p differ in length ({d.size} vs {p.size})")
    b, c = int(np.sum(d & ~p)), int(np.sum(~d & p))
    return {
        "right_to_wrong": b,
        "wrong_to_right": c,
        "both_right": int(np.sum(d & p)),
        "both_wrong": int(np.sum(~d & ~p)),
        "n": int(d.size),
        "mcnemar_p": mcnemar_exact(b, c),
    }


def _units(n: int, groups) -> tuple[np.ndarray, int]:
    """Each value's unit index 0..G−1 (in order of first appearance) and G."""
    if groups is None:
        return np.arange(n), n
    groups = list(groups)
    if len(groups) != n:
        raise ValueError(f"groups has {len(groups)} entries for {n} values")
    index: dict = {}
    return np.array([index.setdefault(g, len(index)) for g in groups], dtype=np.int64), len(index)


def _draws(units: int, n_boot: int, seed: int):
    """Yields (rows, units) arrays, n_boot rows in all: how often each unit is drawn in each resample (units
    drawn with replacement), in chunks of about 4M cells so that many units need little memory."""
    rng = np.random.default_rng(seed)
    chunk = max(1, (1 << 22) // max(units, 1))
    for start in range(0, n_boot, chunk):
        rows = min(chunk, n_boot - start)
        picks = rng.integers(0, units, size=(rows, units)) + (np.arange(rows) * units)[:, None]
        yield np.bincount(picks.ravel(), minlength=rows * units).reshape(rows, units)


def _resampled(values: np.ndarray, unit: np.ndarray, draws, stat) -> np.ndarray:
    """`stat` of each resample: a weighted mean for np.mean, else stat over the drawn units' values."""
    units = int(unit.max()) + 1
    if stat is np.mean:
        sums = np.bincount(unit, weights=values, minlength=units)
        sizes = np.bincount(unit, minlength=units).astype(np.float64)
        return np.concatenate([(counts @ sums) / (counts @ sizes) for counts in draws])
    members = [np.flatnonzero(unit == g) for g in range(units)]
    out = []
    for counts in draws:
        for row in counts:
            idx = np.concatenate([np.repeat(members[g], k) for g, k in enumerate(row) if k])
            out.append(stat(values[idx]))
    return np.asarray(out, dtype=np.float64)


def _interval(boot: np.ndarray, level: float) -> tuple[float, float]:
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(boot, [alpha, 1.0 - alpha])
    return float(low), float(high)


def _clean(values) -> np.ndarray:
    return np.asarray([np.nan if v is None else v for v in values], dtype=np.float64).ravel()


def bootstrap_ci(
    values, groups=None, n_boot: int = N_BOOT, seed: int = SEED, level: float = LEVEL, stat=np.mean
) -> tuple[float, float, float]:
    """(stat(values), low, high): the percentile bootstrap interval at `level`, resampling the units
    (`groups`, else each value) with replacement, `n_boot` times, from numpy's generator seeded with `seed`.
    Bools count as 0/1. (nan, nan, nan) for no values."""
    x = _clean(values)
    if not x.size:
        return (math.nan, math.nan, math.nan)
    unit, units = _units(x.size, groups)
    boot = _resampled(x, unit, _draws(units, n_boot, seed), stat)
    return (float(stat(x)), *_interval(boot, level))


def paired_bootstrap_diff(
    a, b, groups=None, n_boot: int = N_BOOT, seed: int = SEED, level: float = LEVEL, stat=np.mean
) -> tuple[float, float, float, float]:
    """(stat(a) − stat(b), low, high, p): a and b aligned (the same items under two conditions), resampled
    jointly; p is the two-sided bootstrap p-value of a zero difference, min(1, 2·min(P*(Δ ≤ 0), P*(Δ ≥ 0))).
    Identical a and b give (0, 0, 0, 1). (nan, nan, nan, nan) for no values."""
    x, y = _clean(a), _clean(b)
    if x.shape != y.shape:
        raise ValueError(f"a and b differ in length ({x.size} vs {y.size})")
    if not x.size:
        return (math.nan, math.nan, math.nan, math.nan)
    unit, units = _units(x.size, groups)
    if stat is np.mean:  # the mean of differences: exactly 0 where a = b
        boot = _resampled(x - y, unit, _draws(units, n_boot, seed), stat)
        diff = float(np.mean(x - y))
    else:  # the same draws for both (the same seed)
        boot = _resampled(x, unit, _draws(units, n_boot, seed), stat) - _resampled(
            y, unit, _draws(units, n_boot, seed), stat
        )
        diff = float(stat(x) - stat(y))
    p = min(1.0, 2.0 * min(float(np.mean(boot <= 0)), float(np.mean(boot >= 0))))
    return (diff, *_interval(boot, level), p)


# ------------------------------------------------------------------ multiple choice: OUT/mc.parquet's rows → tables


def _none(x: float) -> float | None:
    return None if x is None or math.isnan(x) else x


def _by_spec(rows: list[dict], specs) -> dict[str, dict[str, dict]]:
    """spec → item_id → row, specs in `specs` order (then any others, in order of appearance)."""
    order = list(dict.fromkeys([*(str(s) for s in specs or []), *(r["spec"] for r in rows)]))
    found: dict[str, dict[str, dict]] = {s: {} for s in order}
    for r in rows:
        found[r["spec"]][r["item_id"]] = r
    return {s: items for s, items in found.items() if items}


def _ci(prefix: str, values, n_boot: int, seed: int) -> dict:
    kept = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    est, low, high = bootstrap_ci(kept, n_boot=n_boot, seed=seed)
    return {prefix: _none(est), f"{prefix}_lo": _none(low), f"{prefix}_hi": _none(high)}


def choice_spec_rows(rows: list[dict], specs=None, n_boot: int = N_BOOT, seed: int = SEED) -> list[dict]:
    """Per spec (in `specs` order): the flips of correctness dense → perturbed with McNemar's exact p, and
    bootstrap intervals (resampling items) of the dense and perturbed accuracy, of their difference
    (perturbed − dense, with its bootstrap p), of the mean full KL and subspace KL at the answer, and of the
    rate at which both models pick the same choice. `rows`: OUT/mc.parquet's rows."""
    out = []
    for spec, items in _by_spec(rows, specs).items():
        ordered = [items[k] for k in sorted(items)]
        d = [bool(r["correct_d"]) for r in ordered]
        p = [bool(r["correct_p"]) for r in ordered]
        f = flips(d, p)
        diff, low, high, pval = paired_bootstrap_diff(p, d, n_boot=n_boot, seed=seed)
        out.append(
            {
                "spec": spec,
                "items": f["n"],
                **{k: f[k] for k in ("right_to_wrong", "wrong_to_right", "both_right", "both_wrong", "mcnemar_p")},
                **_ci("acc_d", d, n_boot, seed),
                **_ci("acc_p", p, n_boot, seed),
                "acc_diff": diff,
                "acc_diff_lo": low,
                "acc_diff_hi": high,
                "acc_diff_p": pval,
                **_ci("kl", [r.get("kl") for r in ordered], n_boot, seed),
                **_ci("sub_kl", [r.get("sub_kl") for r in ordered], n_boot, seed),
                **_ci("agree", [r.get("agree") for r in ordered], n_boot, seed),
            }
        )
    return out


def choice_pair_rows(rows: list[dict], specs=None, n_boot: int = N_BOOT, seed: int = SEED) -> list[dict]:
    """Per pair of specs (a before b in `specs` order), on the items both scored: the perturbed accuracy of
    each, its difference a − b with a paired bootstrap interval and p, McNemar's exact p on the items where
    the two disagree in correctness (a_only: a right, b wrong; b_only: the reverse), and the mean full KL
    at the answer of each with the difference's interval. `rows`: OUT/mc.parquet's rows."""
    per = _by_spec(rows, specs)
    out = []
    for sa, sb in combinations(per, 2):
        common = sorted(set(per[sa]) & set(per[sb]))
        ra, rb = [per[sa][k] for k in common], [per[sb][k] for k in common]
        ca, cb = [bool(r["correct_p"]) for r in ra], [bool(r["correct_p"]) for r in rb]
        f = flips(ca, cb)
        acc = paired_bootstrap_diff(ca, cb, n_boot=n_boot, seed=seed)
        both = [
            (x.get("kl"), y.get("kl")) for x, y in zip(ra, rb) if x.get("kl") is not None and y.get("kl") is not None
        ]
        kl = paired_bootstrap_diff([x for x, _ in both], [y for _, y in both], n_boot=n_boot, seed=seed)
        out.append(
            {
                "spec_a": sa,
                "spec_b": sb,
                "items": len(common),
                "acc_a": float(np.mean(ca)) if ca else None,
                "acc_b": float(np.mean(cb)) if cb else None,
                "a_only": f["right_to_wrong"],
                "b_only": f["wrong_to_right"],
                "mcnemar_p": f["mcnemar_p"],
                "acc_diff": _none(acc[0]),
                "acc_diff_lo": _none(acc[1]),
                "acc_diff_hi": _none(acc[2]),
                "acc_diff_p": _none(acc[3]),
                "kl_a": float(np.mean([x for x, _ in both])) if both else None,
                "kl_b": float(np.mean([y for _, y in both])) if both else None,
                "kl_diff": _none(kl[0]),
                "kl_diff_lo": _none(kl[1]),
                "kl_diff_hi": _none(kl[2]),
                "kl_diff_p": _none(kl[3]),
            }
        )
    return out
