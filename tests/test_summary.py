"""engine.record.summary against numpy: percentiles, means, the perplexity ratio and the per-run summary."""

import math

import numpy as np
import pytest

from engine.record.summary import mean, percentile, summarize


@pytest.mark.parametrize("n", [1, 2, 7, 100])
@pytest.mark.parametrize("q", [0, 1, 50, 90, 99, 100])
def test_percentile_is_numpys_linear_percentile(n, q):
    values = np.random.default_rng(n).lognormal(size=n).tolist()
    assert percentile(values, q) == pytest.approx(np.percentile(values, q), rel=1e-12)


def test_missing_values_are_left_out_and_none_means_no_value():
    values = [0.5, None, float("nan"), 2.0, 1.0]
    assert mean(values) == pytest.approx(np.nanmean([0.5, np.nan, 2.0, 1.0]))
    assert percentile(values, 50) == pytest.approx(np.nanpercentile([0.5, np.nan, 2.0, 1.0], 50))
    assert mean([None, float("nan")]) is None and percentile([], 50) is None and percentile([None], 90) is None


def _steps(rng, n, free=True):
    steps, cum, div = [], 0.0, None
    for i in range(n):
        kl = float(rng.exponential(0.2))
        cum += kl
        same = bool(rng.random() < 0.7)
        div = i if div is None and not same else div
        steps.append(
            {
                "step": i,
                "kl": kl,
                "tv": float(rng.random() / 2),
                "kl_est": kl * 0.9,
                "top1_agree": same,
                "emb_cos": [1.0, float(rng.uniform(0.9, 1)), float(rng.uniform(0.8, 1))],
                "logit_cos": float(rng.uniform(0.9, 1)),
                "prob_cos": float(rng.uniform(0.5, 1)),
                "prob_cos_est": 0.9,
                "js": kl / 4,
                "amp": float(rng.uniform(1, 5)),
                "nll_d": float(rng.exponential(2)),
                "nll_p": float(rng.exponential(2.5)),
                "cum_kl": cum,
                "cum_nll_gap": 0.0,
                "same_token": same,
                **({"first_divergence": div} if free else {}),
            }
        )
    return steps


def test_summarize_equals_a_direct_numpy_computation():
    steps = _steps(np.random.default_rng(3), 40)
    out = summarize(steps, "free")
    col = lambda name: np.array([s[name] for s in steps], dtype=float)  # noqa: E731
    assert out["steps"] == 40
    for name in ("kl", "tv"):
        assert out[f"{name}_mean"] == pytest.approx(col(name).mean())
        for q in (50, 90, 99):
            assert out[f"{name}_p{q}"] == pytest.approx(np.percentile(col(name), q))
    assert out["same_top1_rate"] == pytest.approx(col("top1_agree").mean())
    assert out["emb_cos_final_mean"] == pytest.approx(np.mean([s["emb_cos"][-1] for s in steps]))
    gap = (col("nll_p") - col("nll_d")).mean()
    assert out["ln_ppl_ratio"] == pytest.approx(gap)
    # the perplexity ratio: exp(mean NLL_p) / exp(mean NLL_d)
    assert out["ppl_ratio"] == pytest.approx(math.exp(col("nll_p").mean()) / math.exp(col("nll_d").mean()))
    assert out["cum_kl"] == pytest.approx(col("kl").sum())
    assert out["first_divergence"] == steps[-1]["first_divergence"]
    assert out["same_token_rate"] == pytest.approx(col("same_token").mean())
    assert "sub_kl_mean" not in out


def test_shared_mode_summary_has_no_free_mode_fields():
    out = summarize(_steps(np.random.default_rng(4), 5, free=False), "shared")
    assert "first_divergence" not in out and "same_token_rate" not in out
    assert summarize([], "shared") == {"steps": 0}
