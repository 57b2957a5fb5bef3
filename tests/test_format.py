"""The one number formatter (hierui.format) and the one token-text renderer (hierui.tokentext)."""

import math

import pytest

from hierui import format as F
from hierui import tokentext as T

# ------------------------------------------------------------------ numbers


def test_missing_value_is_one_mark_everywhere():
    assert F.MISSING == "—"
    assert F.num(None) == F.pct(None) == F.count(None) == F.metric("kl", None) == F.metric("sparsity", None) == "—"


@pytest.mark.parametrize(
    "value, digits, text",
    [
        (0.5, 4, "0.5000"),
        (0.0123456, 4, "0.01235"),
        (1.23456e-5, 4, "1.235e-05"),
        (12345.678, 4, "1.235e+04"),
        (1234.4, 4, "1234"),
        (0.0, 4, "0.000"),
        (-0.0, 4, "0.000"),
        (-2.5, 3, "-2.50"),
        (0.9999871, 6, "0.999987"),
        (1.0, 6, "1.00000"),
        (3e5, 1, "3e+05"),
    ],
)
def test_significant_digits(value, digits, text):
    assert F.num(value, digits) == text


def test_bool_int_text_and_non_finite():
    assert F.num(True) == "yes" and F.num(False) == "no" and F.metric("top1_agree", True) == "yes"
    assert F.num(7) == "7" and F.num("abc") == "abc"
    assert F.num(math.nan) == "nan" and F.num(math.inf) == "inf" and F.num(-math.inf) == "-inf"
    assert F.pct(math.nan) == "nan" and F.metric("cum_kl", math.inf) == "inf"
    import numpy as np

    assert F.num(np.float32(0.25)) == "0.2500" and F.num(np.int64(3)) == "3" and F.num(np.bool_(True)) == "yes"


def test_percentages_and_counts():
    assert F.pct(0.5) == "50.00%" and F.pct(0.12345) == "12.35%" and F.pct(1) == "100.00%"
    assert F.count(3) == "3" and F.count(3.0) == "3" and F.count(2.5) == "2.5" and F.count(2.333) == "2.3"


def test_one_metric_prints_the_same_way_whatever_its_name_says_about_where_it_comes_from():
    # a similarity: 5 significant digits, so that 1 − cos shows
    assert F.metric("logit_cos", 0.99998765) == F.metric("logit_cos_mean", 0.99998765) == "0.99999"
    assert F.metric("emb_cos[L]", 0.5) == F.metric("emb_cos_final_mean", 0.5) == "0.50000"
    assert F.metric("prob_cos", 0.691695) == f"{0.691695:.5f}"  # as the layer panel prints a cosine
    # divergences and everything else: 4
    for name in ("kl", "kl_mean", "sub_kl", "mc_sub_kl", "cum_kl_free", "tv", "js", "amp", "cum_nll_gap", "gen_kl"):
        assert F.metric(name, 0.0123456) == "0.01235", name
    # rates and accuracies: 3
    for name in ("same_top1_rate", "top1", "acc_d", "mc_acc_p", "agree", "mc_agree", "agree_rate", "topk_overlap"):
        assert F.metric(name, 0.5) == "0.500", name
    # sparsity: a percentage; steps and counts: whole numbers
    assert F.metric("sparsity", 0.5) == F.metric("measured_sparsity", 0.5) == "50.00%"
    for name in ("first_div", "first_divergence", "runs", "items", "mc_items", "median", "steps"):
        assert F.metric(name, 4.0) == "4", name
    assert F.metric("first_div", 4.5) == "4.5"
    assert F.metric("dp", -0.0496912) == "-0.050"


# ------------------------------------------------------------------ token text


def test_escape_shows_control_characters():
    assert T.escape("a\nb\tc") == "a⏎b→c"
    assert T.escape("\x0e\x00") == "\\x0e\\x00"
    assert T.escape("zero\u200bwidth") == "zero\\u200bwidth"
    assert T.escape("back\\slash 'q' \"d\"") == "back\\slash 'q' \"d\""  # shown as it is
    assert T.escape(None) == "" and T.escape(3) == "3"
    assert T.escape("héllo wörld ✓") == "héllo wörld ✓"


def test_running_text_breaks_lines_after_the_mark():
    assert T.running("one\ntwo\tthree") == "one⏎\ntwo→three"
    assert T.running("\x1b[31m") == "\\x1b[31m"  # no terminal escape sequence gets through


def test_cell_for_tables():
    assert T.cell(" Paris") == "·Paris"
    assert T.cell("") == "∅" and T.cell(None) == "∅"
    assert T.cell("\n") == "⏎"
    assert T.cell(" a very long token", 10) == "·a·very·l…"
    assert len(T.cell("x" * 50, 10)) == 10 and T.cell("x" * 10, 10) == "x" * 10
    assert T.clip("abcdef", 4) == "abc…" and T.clip("abc", None) == "abc"
