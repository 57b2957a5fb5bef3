"""Paired statistics (engine.results.paired): McNemar's exact test, seeded bootstrap intervals, flips; and the
multiple-choice tables, report and show that use them on a real tiny sweep."""

import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from engine.results import paired as P
from engine.results import runs as R
from hierui.cli import app
from hierui.report import page as HR
from hierui.report import readings as RD
from hierui.report import tables as T

# ------------------------------------------------------------------ McNemar


def _binom_two_sided(b, c):
    """By hand: 2 · P(X ≤ min(b, c)) for X ~ Binomial(b + c, ½), capped at 1."""
    n, k = b + c, min(b, c)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)


def test_mcnemar_exact_against_hand_computed_values():
    assert P.mcnemar_exact(0, 0) == 1.0
    assert P.mcnemar_exact(5, 0) == pytest.approx(2 / 32)  # 2 · (½)^5
    assert P.mcnemar_exact(0, 5) == P.mcnemar_exact(5, 0)
    assert P.mcnemar_exact(3, 7) == pytest.approx(2 * 176 / 1024)  # C(10, 0..3) = 1 + 10 + 45 + 120
    assert P.mcnemar_exact(10, 10) == 1.0 and P.mcnemar_exact(1, 0) == 1.0
    assert P.mcnemar_exact(1000, 0) == pytest.approx(2.0**-999, rel=1e-12)  # no underflow to 0 before 1e-300
    for b, c in [(0, 1), (2, 9), (12, 30), (40, 41), (17, 3)]:
        assert P.mcnemar_exact(b, c) == pytest.approx(_binom_two_sided(b, c), rel=1e-12)
    with pytest.raises(ValueError):
        P.mcnemar_exact(-1, 2)


def test_mcnemar_exact_matches_scipy_when_installed():
    stats = pytest.importorskip("scipy.stats")
    for b, c in [(0, 1), (2, 9), (12, 30), (40, 41), (17, 3), (0, 20)]:
        expected = stats.binomtest(b, b + c, 0.5).pvalue
        assert P.mcnemar_exact(b, c) == pytest.approx(expected, rel=1e-9)


def test_flips_counts_the_two_by_two_table():
    d = [True, True, True, False, False, True]
    p = [True, False, False, True, False, True]
    f = P.flips(d, p)
    assert f == {
        "right_to_wrong": 2,
        "wrong_to_right": 1,
        "both_right": 2,
        "both_wrong": 1,
        "n": 6,
        "mcnemar_p": P.mcnemar_exact(2, 1),
    }
    with pytest.raises(ValueError):
        P.flips([True], [True, False])


# ------------------------------------------------------------------ bootstrap


def test_bootstrap_ci_is_seeded_covers_the_mean_and_narrows_with_n():
    rng = np.random.default_rng(7)
    small, large = rng.normal(1.0, 1.0, 40), rng.normal(1.0, 1.0, 4000)
    first = P.bootstrap_ci(small, seed=3)
    assert first == P.bootstrap_ci(small, seed=3)  # deterministic, bit for bit
    assert first != P.bootstrap_ci(small, seed=4)
    est, low, high = first
    assert est == pytest.approx(small.mean()) and low < est < high
    _, low_l, high_l = P.bootstrap_ci(large, n_boot=500)
    assert low_l < 1.0 < high_l  # covers the true mean
    assert (high_l - low_l) < (high - low) / 4  # ~1/√n: 10× the width for 100× fewer values
    # a 90% interval sits inside the 95% one; bools count as 0/1
    _, low90, high90 = P.bootstrap_ci(small, seed=3, level=0.90)
    assert low <= low90 and high90 <= high
    assert P.bootstrap_ci([True, False, True, True])[0] == 0.75
    assert all(math.isnan(x) for x in P.bootstrap_ci([]))


def test_bootstrap_resamples_whole_groups():
    # two groups of very different values: resampling the groups can only draw all-0 (mean 0), all-10 (mean 10)
    # or one of each (the mean of the values, weighted by group size: here 5 with equal sizes)
    values = [0.0, 0.0, 0.0, 10.0, 10.0, 10.0]
    groups = ["a", "a", "a", "b", "b", "b"]
    unit, n = P._units(len(values), groups)
    assert n == 2 and unit.tolist() == [0, 0, 0, 1, 1, 1]
    boot = P._resampled(np.array(values), unit, P._draws(n, 400, 0), np.mean)
    assert set(np.round(boot, 9)) <= {0.0, 5.0, 10.0} and len(set(np.round(boot, 9))) == 3
    # resampling single values instead gives many more distinct means
    single = P._resampled(np.array(values), np.arange(6), P._draws(6, 400, 0), np.mean)
    assert len(set(np.round(single, 9))) > 3
    est, low, high = P.bootstrap_ci(values, groups=groups)
    assert est == 5.0 and low == 0.0 and high == 10.0
    # a statistic other than the mean takes the slow path, and the same draws
    med = P.bootstrap_ci(values, groups=groups, stat=np.median, n_boot=200)
    assert med[1] == 0.0 and med[2] == 10.0
    with pytest.raises(ValueError):
        P.bootstrap_ci(values, groups=["a"])


def test_paired_diff_of_identical_arrays_is_zero_with_zero_width():
    a = np.random.default_rng(1).normal(size=50)
    assert P.paired_bootstrap_diff(a, a) == (0.0, 0.0, 0.0, 1.0)
    assert P.paired_bootstrap_diff(a, a, groups=np.arange(50) // 5) == (0.0, 0.0, 0.0, 1.0)
    # a clear shift: an interval away from 0 and a small p; the sign follows a − b
    diff, low, high, p = P.paired_bootstrap_diff(a + 1.0, a + np.random.default_rng(2).normal(0, 0.1, 50))
    assert 0.8 < low < diff < high < 1.2 and p < 0.01
    assert P.paired_bootstrap_diff(a, a + 1.0)[0] == pytest.approx(-1.0)


def test_choice_tables_from_rows_by_hand():
    rows = []
    for i in range(6):
        rows.append(
            {
                "spec": "x",
                "item_id": f"q{i}",
                "correct_d": i < 4,
                "correct_p": i < 2,
                "agree": i != 3,
                "kl": 0.001,
                "sub_kl": 0.0,
            }
        )
        rows.append(
            {
                "spec": "y",
                "item_id": f"q{i}",
                "correct_d": i < 4,
                "correct_p": i < 4,
                "agree": True,
                "kl": 0.5,
                "sub_kl": 0.1,
            }
        )
    spec = {r["spec"]: r for r in P.choice_spec_rows(rows, ["y", "x"])}
    assert list(spec) == ["y", "x"]
    assert spec["x"]["right_to_wrong"] == 2 and spec["x"]["wrong_to_right"] == 0
    assert spec["x"]["mcnemar_p"] == P.mcnemar_exact(2, 0) and spec["y"]["mcnemar_p"] == 1.0
    assert spec["x"]["acc_diff"] == pytest.approx(-1 / 3) and spec["x"]["acc_diff_hi"] <= 0
    assert spec["y"]["acc_diff"] == spec["y"]["acc_diff_lo"] == spec["y"]["acc_diff_hi"] == 0.0
    (pair,) = P.choice_pair_rows(rows, ["y", "x"])
    assert (pair["spec_a"], pair["spec_b"], pair["items"]) == ("y", "x", 6)
    assert pair["a_only"] == 2 and pair["b_only"] == 0 and pair["acc_diff"] == pytest.approx(1 / 3)
    assert pair["kl_diff"] == pytest.approx(0.499) and pair["kl_diff_lo"] == pytest.approx(0.499)


def test_silent_failure_reading():
    quiet = {"spec": "int8", "kl": 0.001, "mcnemar_p": 0.01, "right_to_wrong": 9, "wrong_to_right": 0}
    loud = {"spec": "wanda:0.5", "kl": 0.8, "mcnemar_p": 0.001, "right_to_wrong": 12, "wrong_to_right": 1}
    found = RD.silent_failures([quiet, loud])
    assert found["holds"] is False and "int8" in found["verdict"] and "wanda" not in found["verdict"]
    assert "none found" in RD.silent_failures([loud])["verdict"]
    assert "none found" in RD.silent_failures([{**quiet, "mcnemar_p": 0.5}])["verdict"]
    # above a threshold of 0.01 nats but below the noise floor's KL
    assert RD.silent_failures([{**quiet, "kl": 0.05}], floor_kl=0.1)["holds"] is False
    assert RD.silent_failures([]) is None


# ------------------------------------------------------------------ a real sweep with multiple-choice items

RECIPE = """\
name = "paired"
model = "tiny-random"
prompts = ["open.txt", "mc.jsonl"]
specs = ["magnitude:0.5", "magnitude:0.3", "none"]
modes = ["shared"]
max_new_tokens = 3
batch_size = 4

[calibration]
samples = 4
length = 16
seed = 0
"""
# tiny-random's tokenizer is byte-level: choices start with distinct bytes
ITEMS = [
    {"id": f"q{i}", "prompt": prompt, "choices": choices, "answer": answer}
    for i, (prompt, choices, answer) in enumerate(
        [
            ("The capital of France is", ["Paris", "Rome"], 0),
            ("Two plus two is", ["four", "two", "six"], 0),
            ("The sky is", ["blue", "green"], 0),
            ("Water is", ["wet", "dry"], 0),
            ("Fire is", ["hot", "cold"], 0),
            ("Ice is", ["cold", "hot"], 1),
            ("A cat says", ["meow", "woof"], 0),
            ("A dog says", ["meow", "woof"], 1),
        ]
    )
]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    folder = tmp_path_factory.mktemp("paired")
    (folder / "open.txt").write_text("Hello there\nOnce upon a time\n", encoding="utf-8")
    (folder / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ITEMS), encoding="utf-8")
    (folder / "paired.toml").write_text(RECIPE, encoding="utf-8")
    out = folder / "out"
    result = CliRunner().invoke(app, ["batch", "--recipe", str(folder / "paired.toml"), "--out", str(out)])
    assert result.exit_code == 0, (result.output, result.exception)
    return out


def test_sweep_writes_paired_tables_that_match_mc(sweep):
    mc = pq.read_table(sweep / "mc.parquet").to_pylist()
    paired = pq.read_table(sweep / "mc_paired.parquet").to_pylist()
    pairs = pq.read_table(sweep / "mc_pairs.parquet").to_pylist()
    assert (sweep / "mc_paired.csv").is_file() and (sweep / "mc_pairs.csv").is_file()
    specs = ["magnitude:0.5", "magnitude:0.3", "none"]
    assert [r["spec"] for r in paired] == specs
    for row in paired:
        mine = [r for r in mc if r["spec"] == row["spec"]]
        b = sum(r["correct_d"] and not r["correct_p"] for r in mine)
        c = sum(not r["correct_d"] and r["correct_p"] for r in mine)
        assert (row["items"], row["right_to_wrong"], row["wrong_to_right"]) == (len(ITEMS), b, c)
        assert row["both_right"] + row["both_wrong"] + b + c == len(ITEMS)
        assert row["mcnemar_p"] == P.mcnemar_exact(b, c)
        assert row["acc_p_lo"] <= row["acc_p"] <= row["acc_p_hi"]
        assert row["kl_lo"] <= row["kl"] <= row["kl_hi"]
    none = paired[2]  # the dense model against itself: nothing flips, nothing moves
    assert none["right_to_wrong"] == none["wrong_to_right"] == 0 and none["mcnemar_p"] == 1.0
    assert none["acc_diff"] == none["acc_diff_lo"] == none["acc_diff_hi"] == 0.0
    assert [(r["spec_a"], r["spec_b"]) for r in pairs] == [(a, b) for i, a in enumerate(specs) for b in specs[i + 1 :]]
    for row in pairs:
        a = {r["item_id"]: r["correct_p"] for r in mc if r["spec"] == row["spec_a"]}
        b = {r["item_id"]: r["correct_p"] for r in mc if r["spec"] == row["spec_b"]}
        a_only = sum(a[k] and not b[k] for k in a)
        b_only = sum(b[k] and not a[k] for k in a)
        assert (row["a_only"], row["b_only"]) == (a_only, b_only)
        assert row["mcnemar_p"] == P.mcnemar_exact(a_only, b_only)
        assert row["acc_diff"] == pytest.approx(row["acc_a"] - row["acc_b"])
    # the tables are rebuilt from mc.parquet alone, identically (seed 0)
    run = R.load_run(sweep)
    assert R.choice_paired_rows(run) == paired and R.choice_pair_rows(run) == pairs


def test_spec_rows_carry_bootstrap_intervals(sweep):
    rows = {r["spec"]: r for r in R.spec_rows(R.load_run(sweep))}
    for row in rows.values():
        assert row["kl_lo"] <= row["kl"] + 1e-12 and row["kl"] <= row["kl_hi"] + 1e-12
        assert row["top1_lo"] <= row["top1"] <= row["top1_hi"]
    assert rows["none"]["kl_lo"] == rows["none"]["kl_hi"] == 0.0


def test_report_shows_intervals_pairs_and_silent_failures(sweep, tmp_path):
    page = HR.write_report(sweep, tmp_path / "r.html").read_text(encoding="utf-8")
    hierarchy = page.split('id="hierarchy"')[1].split("</section>")[0]
    assert "KL 95% CI" in hierarchy and "top-1 95% CI" in hierarchy
    row = next(r for r in R.spec_rows(R.load_run(sweep)) if r["spec"] == "magnitude:0.5")
    assert T.interval("kl", row["kl_lo"], row["kl_hi"]) in hierarchy
    mc = page.split('id="multiple-choice"')[1].split("</section>")[0]
    for text in ("right → wrong", "McNemar p", "acc perturbed [95% CI]", "spec a vs spec b", "Δ acc a − b [95% CI]"):
        assert text in mc, text
    assert "<td>magnitude:0.5 vs magnitude:0.3</td>" in mc and "Silent failures" in mc
    assert page == HR.render_html(R.load_run(sweep))  # the same page again, byte for byte


def test_show_prints_the_flip_table(cli, sweep):
    run = cli("show", sweep, env={"COLUMNS": "80"})
    assert run.returncode == 0, run.stderr
    assert "flips of correctness and McNemar's exact test" in run.stdout
    assert "means with their 95% intervals" in run.stdout
    drawn = [line.rstrip() for line in run.stdout.splitlines() if str(sweep) not in line]
    assert all(len(line) <= 80 for line in drawn), max(drawn, key=len)


def test_silent_failure_rule_and_its_report_line():
    """Silent: a mean KL under max(noise floor, 0.01) with significant flips; the floor raises the limit."""
    from engine.results.paired import SILENT_KL, is_silent, silent_limit
    from hierui.views.kld import silent_line

    assert silent_limit(None) == SILENT_KL and silent_limit(0.002) == SILENT_KL and silent_limit(0.05) == 0.05
    assert is_silent(0.005, 0.01) and not is_silent(0.005, 0.2) and not is_silent(0.02, 0.01)
    assert is_silent(0.02, 0.01, floor_kl=0.05) and not is_silent(None, 0.01)
    row = {"kl_mean": 0.02, "mcnemar_p": 0.01, "noise_floor_kl": 0.05, "silent": True}
    assert silent_line(row).startswith("Silent failure     : YES") and "noise floor 0.050000" in silent_line(row)
    row = {"kl_mean": 0.5, "mcnemar_p": 0.01, "noise_floor_kl": None, "silent": False}
    assert "above the threshold 0.01" in silent_line(row)
    row = {"kl_mean": 0.001, "mcnemar_p": 0.9, "noise_floor_kl": None, "silent": False}
    assert "flips not significant" in silent_line(row)
