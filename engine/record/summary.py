"""Per-run summaries of step records: what `hierui batch` tabulates and a session's closing line holds.

The statistics llama.cpp's KL-divergence report uses (mean and percentiles of KL, same-top-1 rate,
perplexity ratio) plus the hierarchy ones (similarity in each space, amplification, first divergence).

Means and rates are over the steps where a value exists (None is skipped): in free mode, the steps after one
model has ended hold no comparison, so they count for neither. `cum_kl` and `cum_nll_gap` are the last step's,
which stop accumulating when a model has ended (their total over the compared steps). `end_d`/`end_p`: the step
at which each model emitted end-of-sequence (None: it ran to the token limit). `prob_cos_est_oor_rate` and
`emb_cos_est_oor_rate`: how often a theory estimate left [−1, 1] (recorded as null, so `prob_cos_est_mean`
leaves those steps out).
"""

from __future__ import annotations

import math

PERCENTILES = (50, 90, 99)


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolation percentile (numpy's default) of the values that are not None or NaN; None when
    there are none."""
    vals = sorted(float(v) for v in values if v is not None and not math.isnan(v))
    if not vals:
        return None
    pos = (len(vals) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return vals[lo] + (vals[hi] - vals[lo]) * (pos - lo)


def mean(values) -> float | None:
    """Mean of the values that are not None or NaN; None when there are none."""
    vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(vals) / len(vals) if vals else None


def _flag(value) -> float | None:
    """A yes/no field as 1.0/0.0 (a list: whether any entry is true); None where the step has no value."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return float(any(bool(v) for v in value))
    return float(bool(value))


def summarize(steps: list[dict], mode: str | None = None) -> dict:
    """Summary of one run's step records (see the module docstring)."""
    out: dict = {"steps": len(steps)}
    if not steps:
        return out
    for name in ("kl", "tv"):
        vals = [s.get(name) for s in steps]
        out[f"{name}_mean"] = mean(vals)
        for q in PERCENTILES:
            out[f"{name}_p{q}"] = percentile(vals, q)
    out["kl_est_mean"] = mean(s.get("kl_est") for s in steps)
    out["same_top1_rate"] = mean(s.get("top1_agree") for s in steps)
    compared = [s for s in steps if s.get("top1_agree") is not None]
    out["compared_steps"] = len(compared)  # steps comparing both models (free mode: not after one ended)
    out["flips"] = sum(1 for s in compared if not s["top1_agree"])  # steps whose top-1 tokens differ
    if any("near_tie" in s for s in compared):  # … of which at a dense margin within the noise (near ties)
        out["near_tie_flips"] = sum(1 for s in compared if s.get("near_tie"))
    out["emb_cos_final_mean"] = mean((s.get("emb_cos") or [None])[-1] for s in steps)
    for name in ("logit_cos", "prob_cos", "prob_cos_est", "js", "amp"):
        out[f"{name}_mean"] = mean(s.get(name) for s in steps)
    out["prob_cos_est_oor_rate"] = mean(_flag(s.get("prob_cos_est_oor")) for s in steps)
    out["emb_cos_est_oor_rate"] = mean(_flag(s.get("emb_cos_est_oor")) for s in steps)
    out["cum_kl"] = steps[-1].get("cum_kl")
    out["cum_nll_gap"] = steps[-1].get("cum_nll_gap")
    gap = mean((s["nll_p"] - s["nll_d"]) for s in steps if s.get("nll_p") is not None and s.get("nll_d") is not None)
    out["ln_ppl_ratio"] = gap
    out["ppl_ratio"] = math.exp(gap) if gap is not None else None
    if mode == "free" or "first_divergence" in steps[-1]:
        out["first_divergence"] = steps[-1].get("first_divergence")
        out["same_token_rate"] = mean(_flag(s.get("same_token")) for s in steps)
    out["end_d"] = steps[-1].get("end_d")
    out["end_p"] = steps[-1].get("end_p")
    if "sub_kl" in steps[0]:
        out["sub_kl_mean"] = mean(s.get("sub_kl") for s in steps)
        out["sub_agree_rate"] = mean(s.get("sub_agree") for s in steps)
    return out
