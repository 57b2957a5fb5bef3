"""The statistics of a corpus KLD (engine.kld.corpus): llama.cpp's, the confidence buckets, the flips of top-1
correctness, and engine.results.paired's intervals and paired differences over whole windows."""

from __future__ import annotations

import math

import numpy as np

CONF_BUCKETS = 10  # deciles of the dense top-1 probability

# (summary suffix, fraction) of llama.cpp's KLD report, top to bottom
KL_PERCENTILES = (
    ("p99_9", 0.999),
    ("p99", 0.99),
    ("p95", 0.95),
    ("p90", 0.90),
    ("median", 0.5),
    ("p10", 0.10),
    ("p5", 0.05),
    ("p1", 0.01),
    ("p0_1", 0.001),
)
# and of its Δp report (which adds the quartiles)
DP_PERCENTILES = (
    ("p99_9", 0.999),
    ("p99", 0.99),
    ("p95", 0.95),
    ("p90", 0.90),
    ("p75", 0.75),
    ("median", 0.5),
    ("p25", 0.25),
    ("p10", 0.10),
    ("p5", 0.05),
    ("p1", 0.01),
    ("p0_1", 0.001),
)


def mean_and_uncertainty(values) -> tuple[float, float]:
    """llama.cpp's: the mean and sqrt(var/(n − 1)) with var the population variance; 0 for n ≤ 10."""
    x = np.asarray(values, dtype=np.float64)
    n = x.size
    if n < 1:
        return 0.0, 0.0
    f = x.sum() / n
    df = (x * x).sum() / n - f * f
    return float(f), float(math.sqrt(df / (n - 1))) if df > 0 and n > 10 else 0.0


def covariance(a, b) -> float:
    """llama.cpp's covariance of two means: (mean(ab) − mean a · mean b)/(n − 1); 0 for n < 10."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    n = a.size
    if n < 10:
        return 0.0
    return float(((a * b).sum() / n - (a.sum() / n) * (b.sum() / n)) / (n - 1))


def percentiles(prefix: str, values, table) -> dict:
    x = np.sort(np.asarray(values, dtype=np.float64))
    out = {f"{prefix}_max": float(x[-1])}
    for name, q in table:
        out[f"{prefix}_{name}"] = float(np.percentile(x, 100 * q, method="linear"))
    out[f"{prefix}_min"] = float(x[0])
    return out


def summarize(tokens: dict) -> dict:
    """llama.cpp's statistics (and the confidence buckets) of one spec's per-token arrays."""
    nll_d = np.asarray(tokens["nll_d"], dtype=np.float64)
    nll_p = np.asarray(tokens["nll_p"], dtype=np.float64)
    n = nll_d.size
    out: dict = {"tokens": n}
    lp_d, u_d = mean_and_uncertainty(nll_d)
    lp_p, u_p = mean_and_uncertainty(nll_p)
    cov = covariance(nll_p, nll_d)
    out["ppl_d"], out["ppl_d_unc"] = math.exp(lp_d), math.exp(lp_d) * u_d
    out["ppl_p"], out["ppl_p_unc"] = math.exp(lp_p), math.exp(lp_p) * u_p
    out["ln_ppl_ratio"] = lp_p - lp_d
    out["ln_ppl_ratio_unc"] = math.sqrt(max(u_p * u_p + u_d * u_d - 2.0 * cov, 0.0))
    out["ppl_ratio"] = math.exp(out["ln_ppl_ratio"])
    out["ppl_ratio_unc"] = out["ppl_ratio"] * out["ln_ppl_ratio_unc"]
    out["ln_ppl_cor"] = cov / (u_p * u_d) if u_p > 0 and u_d > 0 else None
    for name in ("kl", "kl_rev"):
        values = np.asarray(tokens[name], dtype=np.float64)
        out[f"{name}_mean"], out[f"{name}_mean_unc"] = mean_and_uncertainty(values)
        out.update(percentiles(name, values, KL_PERCENTILES))
    dp = np.asarray(tokens["dp"], dtype=np.float64)
    out["dp_mean"], out["dp_mean_unc"] = mean_and_uncertainty(dp)
    out.update(percentiles("dp", dp, DP_PERCENTILES))
    mse, mse_unc = mean_and_uncertainty(dp * dp)
    out["dp_rms"] = math.sqrt(mse)
    out["dp_rms_unc"] = 0.5 / out["dp_rms"] * mse_unc if out["dp_rms"] > 0 else 0.0
    same = float(np.mean(np.asarray(tokens["same_top"], dtype=np.float64)))
    out["same_top"] = same
    out["same_top_unc"] = math.sqrt(same * (1 - same) / (n - 1)) if n > 1 else 0.0
    out["conf_count"], out["conf_kl_mean"] = confidence_buckets(tokens["conf_d"], tokens["kl"])
    return out


def confidence_buckets(conf, kl) -> tuple[list[int], list[float | None]]:
    """Tokens and mean KL per decile [0, 0.1), …, [0.9, 1] of the dense top-1 probability (None: empty)."""
    conf = np.asarray(conf, dtype=np.float64)
    kl = np.asarray(kl, dtype=np.float64)
    bucket = np.clip((conf * CONF_BUCKETS).astype(np.int64), 0, CONF_BUCKETS - 1)
    counts = np.bincount(bucket, minlength=CONF_BUCKETS)
    sums = np.bincount(bucket, weights=kl, minlength=CONF_BUCKETS)
    return [int(c) for c in counts], [float(s / c) if c else None for s, c in zip(sums, counts)]


def correctness(tokens: dict, targets) -> tuple[np.ndarray, np.ndarray]:
    """Per token, whether the dense and the perturbed top-1 is the actual next token (bool arrays)."""
    targets = np.asarray(targets)
    return np.asarray(tokens["top_d"]) == targets, np.asarray(tokens["top_p"]) == targets


def token_flips(tokens: dict, targets) -> dict:
    """The summary's flip columns: top-1 correctness dense → perturbed and McNemar's exact p (engine.results.paired)."""
    from engine.results.paired import flips

    f = flips(*correctness(tokens, targets))
    return {k: f[k] for k in ("right_to_wrong", "wrong_to_right", "mcnemar_p")}


def _nan_none(x: float) -> float | None:
    return None if x is None or math.isnan(x) else float(x)


def pair_rows(run, seed: int = 0) -> list[dict]:
    """OUT/kld_pairs's rows (engine.record.schema.KLD_PAIRS) of a KldRun: per pair of specs (a before b in the
    run's order) on the same tokens, the mean KL and same-top rate of each, their differences a − b with
    engine.results.paired's paired bootstrap interval and p (whole windows resampled, `seed`), and McNemar's exact p
    on the tokens where exactly one of the two perturbed models' top-1 is the actual next token. No rows with fewer
    than 2 specs."""
    from itertools import combinations

    from engine.results.paired import flips, paired_bootstrap_diff

    groups = np.asarray(run.window_of)
    rows = []
    for a, b in combinations(run.results, 2):
        kl_a = np.asarray(a.tokens["kl"], dtype=np.float64)
        kl_b = np.asarray(b.tokens["kl"], dtype=np.float64)
        top_a = np.asarray(a.tokens["same_top"], dtype=np.float64)
        top_b = np.asarray(b.tokens["same_top"], dtype=np.float64)
        kl = paired_bootstrap_diff(kl_a, kl_b, groups=groups, seed=seed)
        top = paired_bootstrap_diff(top_a, top_b, groups=groups, seed=seed)
        f = flips(correctness(a.tokens, run.targets)[1], correctness(b.tokens, run.targets)[1])
        row = {"spec_a": a.spec, "spec_b": b.spec, "tokens": int(kl_a.size), "windows": run.windows}
        row.update(kl_a=float(kl_a.mean()), kl_b=float(kl_b.mean()))
        row.update(zip(("kl_diff", "kl_diff_lo", "kl_diff_hi", "kl_diff_p"), map(_nan_none, kl)))
        row.update(same_top_a=float(top_a.mean()), same_top_b=float(top_b.mean()))
        row.update(
            zip(("same_top_diff", "same_top_diff_lo", "same_top_diff_hi", "same_top_diff_p"), map(_nan_none, top))
        )
        row.update(a_only=f["right_to_wrong"], b_only=f["wrong_to_right"], mcnemar_p=f["mcnemar_p"])
        rows.append(row)
    return rows


def kl_mean_interval(kl, window_of) -> dict:
    """engine.results.paired's percentile bootstrap interval of the mean KL, resampling whole windows (the tokens of a
    window share their context, so they are not independent)."""
    from engine.results.paired import bootstrap_ci

    _mean, lo, hi = bootstrap_ci(np.asarray(kl, dtype=np.float64), groups=np.asarray(window_of))
    return {"kl_mean_lo": lo, "kl_mean_hi": hi}
