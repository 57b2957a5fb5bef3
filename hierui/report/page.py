"""`hierui report RUN_DIR`: a `hierui batch` output as one self-contained HTML page, the paper's argument.

    data       engine.results.runs (load_run, spec_rows, cum_kl_curves, first_divergences, choice_rows)
    page       templates/report.html.j2, rendered by Jinja2 with autoescape: the claim under test, what this
               sweep shows of it, then one section per step of the argument (ids SECTION_IDS), each with a
               one-line reading guide, what the run's numbers say, a table and an inline SVG chart
               (hierui.report.charts); a part without data says so
    readings   every sentence that states a pattern is decided from the run's own numbers by the small pure
               functions below (*_check: one spec's row → Check; reading: the checks → the sentences), so a
               run that contradicts the expected pattern is told so, spec by spec
    numbers    hierui.format.metric, the same digits as the explorer and `hierui show`; steps counted from 1
               (hierui.format.step_label), as everywhere on screen (the tables keep them 0-based)

The page is the same, byte for byte, for the same run folder: it carries no wall-clock time unless asked
(`stamp`, `hierui report --stamp`). Torch is never imported: the report reads files only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from engine.errors import HieruiError
from engine.record.architecture import summary as architecture_summary
from engine.record.paths import atomic_write
from engine.results.localization import basis_mode
from engine.results.paired import SIGNIFICANT, SILENT_KL, is_silent, silent_limit
from engine.results.runs import (
    Curve,
    RunData,
    choice_pair_rows,
    choice_paired_rows,
    choice_rows,
    cum_kl_curves,
    first_divergences,
    load_run,
    spec_rows,
)
from hierui.format import MISSING, metric, step_label
from hierui.report.render import environment
from hierui.tokentext import escape

SECTION_IDS = (
    "hierarchy",
    "kl-theory",
    "amplification",
    "accumulation",
    "first-divergence",
    "multiple-choice",
    "where-it-breaks",
)

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


def silent_failures(paired: list[dict], floor_kl=None) -> dict | None:
    """The "silent" failures: specs whose mean KL at the answer is below the noise floor's KL (or SILENT_KL)
    while their flips of correctness are significant (McNemar's p < SIGNIFICANT). Rows:
    engine.results.runs.choice_paired_rows. A reading (holds False when one is found), None without rows."""
    if not paired:
        return None
    limit = silent_limit(floor_kl)
    found = [r for r in paired if is_silent(r.get("kl"), r.get("mcnemar_p"), floor_kl)]
    source = "the noise floor's" if floor_kl is not None and floor_kl >= SILENT_KL else "a threshold of"
    if not found:
        return {
            "verdict": f"Silent failures: none found (no spec with a mean KL at the answer below {source} "
            f"{metric('kl', limit)} nats whose flips are significant, McNemar p < {SIGNIFICANT}).",
            "details": "",
            "holds": None,
        }
    return {
        "verdict": f"Silent failures: {_names([r['spec'] for r in found])} — a mean KL at the answer below {source} "
        f"{metric('kl', limit)} nats, yet significant flips of correctness (McNemar p < {SIGNIFICANT}).",
        "details": "; ".join(
            f"{r['spec']}: KL {metric('kl', r['kl'])}, {r['right_to_wrong']} right → wrong and "
            f"{r['wrong_to_right']} wrong → right, p = {metric('mcnemar_p', r['mcnemar_p'])}"
            for r in found
        )
        + ".",
        "holds": False,
    }


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' * (n != 1)}"


def _meta(run: RunData) -> list[str]:
    m = run.manifest
    settings = m.get("settings") or {}
    calib = m.get("calibration") or {}

    def value(d: dict, key: str) -> str:
        return escape(d[key]) if d.get(key) is not None else MISSING

    parts = [
        *([escape(architecture_summary(m["architecture"]))] if m.get("architecture") else []),
        _plural(run.prompt_count, "generation prompt"),
        _plural(run.item_count, "multiple-choice item"),
        _plural(len(run.specs), "spec"),
        "modes " + (", ".join(m.get("modes") or run.modes) or MISSING),
        f"{value(settings, 'max_new_tokens')} new tokens, T = {value(settings, 'temperature')}, "
        f"{'sampled' if settings.get('sample') else 'greedy'}",
        f"calibration {value(calib, 'samples')}×{value(calib, 'length')} tokens",
    ]
    if m.get("created"):
        parts.append(f"recorded {escape(m['created'])}")
    return parts


# ------------------------------------------------------------------ readings: the run's numbers → its sentences

TOL = 1e-6  # a 1 − cos, KL or accuracy difference below this is no deviation (float noise)


@dataclass(frozen=True)
class Check:
    """One spec against one expected pattern. `holds`: True or False, None when it cannot be judged
    (`identical`: the spec leaves the outputs as they are, so there is no deviation to judge; else a figure
    is missing). `detail`: the numbers behind a False (or a missing figure), for the sentence."""

    spec: str
    holds: bool | None
    detail: str = ""
    identical: bool = False


def _gap(cos) -> float | None:
    return None if cos is None else 1.0 - cos


def _num(name: str, value) -> str:
    return metric(name, value)


def hierarchy_check(row: dict) -> Check | None:
    """Does 1 − cos grow from hidden states to logits to probabilities? None without any similarity."""
    spaces = [
        ("hidden states", "hidden cos", "emb_cos"),
        ("logits", "logit cos", "logit_cos"),
        ("probabilities", "prob cos", "prob_cos"),
    ]
    known = [(name, label, key, _gap(row.get(key))) for name, label, key in spaces if row.get(key) is not None]
    if not known:
        return None
    if all(g <= TOL for *_, g in known):
        return Check(row["spec"], None, identical=True)
    if len(known) < 2:
        return Check(row["spec"], None, "only one space recorded")
    wrong = [
        f"1 − cos shrinks from {a[0]} to {b[0]} ({b[1]} {_num(b[2], row[b[2]])} above {a[1]} {_num(a[2], row[a[2]])})"
        for a, b in zip(known, known[1:])
        if b[3] < a[3] - TOL
    ]
    return Check(row["spec"], not wrong, "; ".join(wrong))


def amplification_check(row: dict) -> Check | None:
    """Does the softmax amplify (mean amp per step above 1)? None without an amp and a deviation."""
    amp, gap = row.get("amp"), _gap(row.get("logit_cos"))
    if amp is None:
        return Check(row["spec"], None, identical=True) if gap is not None and gap <= TOL else None
    if amp > 1:
        return Check(row["spec"], True)
    return Check(row["spec"], False, f"amp {_num('amp', amp)}: probabilities deviate less than logits")


def amplification_disagreements(rows: list[dict]) -> list[str]:
    """Specs whose mean amp and mean cosines point different ways: amp is the mean of a per-step ratio, the
    cosines of section 1 are means over steps, and a few steps with barely moved logits can weigh more
    in the first than in the second."""
    out = []
    for r in rows:
        amp, z, p = r.get("amp"), _gap(r.get("logit_cos")), _gap(r.get("prob_cos"))
        if amp is None or z is None or p is None or z <= TOL:
            continue
        if (amp > 1) != (p > z):
            out.append(r["spec"])
    return out


KL_FACTOR = 1.25  # the estimate "tracks" the measured KL within this factor either way


def kl_theory_check(row: dict) -> Check | None:
    """Is the second-order estimate within KL_FACTOR of the measured KL? None without both."""
    kl, est = row.get("kl"), row.get("kl_est")
    if kl is None or est is None:
        return None
    if kl <= TOL and est <= TOL:
        return Check(row["spec"], None, identical=True)
    if kl <= TOL:
        return Check(row["spec"], False, f"measured KL {_num('kl', kl)}, estimate {_num('kl_est', est)}")
    ratio = est / kl
    if 1 / KL_FACTOR <= ratio <= KL_FACTOR:
        return Check(row["spec"], True)
    side = "below" if ratio < 1 else "above"
    return Check(
        row["spec"],
        False,
        f"the estimate {_num('kl_est', est)} is {ratio:.2f}× the measured {_num('kl', kl)}, {side} it",
    )


def accumulation_check(row: dict) -> Check | None:
    """Does free mode (each model on its own text) accumulate more KL than shared mode? None without both."""
    shared, free = row.get("cum_kl_shared"), row.get("cum_kl_free")
    if shared is None or free is None:
        return None
    if shared <= TOL and free <= TOL:
        return Check(row["spec"], None, identical=True)
    if free > shared:
        return Check(row["spec"], True)
    return Check(
        row["spec"], False, f"free {_num('cum_kl', free)} against shared {_num('cum_kl', shared)} (mean final cum KL)"
    )


def choice_check(row: dict) -> Check | None:
    """Does multiple-choice accuracy drop less than generation's top-1 agreement does (MC stays stable)?
    Row: engine.results.runs.choice_rows. None without accuracies."""
    acc_d, acc_p, top1 = row.get("acc_d"), row.get("acc_p"), row.get("gen_top1")
    if acc_d is None or acc_p is None:
        return None
    drop = acc_d - acc_p
    if top1 is None:
        return Check(row["spec"], None, "no generation runs to set it against")
    gen_drop = 1.0 - top1
    if abs(drop) <= TOL and gen_drop <= TOL and (row.get("agree") is None or row["agree"] >= 1 - TOL):
        return Check(row["spec"], None, identical=True)
    if drop <= gen_drop + TOL:
        return Check(row["spec"], True)
    return Check(
        row["spec"],
        False,
        f"accuracy drops by {_num('acc', drop)} ({_num('acc', acc_d)} → {_num('acc', acc_p)}), more than the "
        f"top-1 agreement of generation, which drops by {_num('acc', gen_drop)} (to {_num('top1', top1)})",
    )


def choice_kl_check(row: dict) -> Check | None:
    """Is the KL over the choices smaller than the full-vocabulary KL at the answer position? Row: choice_rows."""
    sub, full = row.get("sub_kl"), row.get("kl")
    if sub is None or full is None:
        return None
    if sub <= TOL and full <= TOL:
        return Check(row["spec"], None, identical=True)
    if sub < full:
        return Check(row["spec"], True)
    return Check(row["spec"], False, f"KL over the choices {_num('sub_kl', sub)} ≥ full KL {_num('kl', full)}")


def _names(specs: list[str]) -> str:
    return ", ".join(specs[:-1]) + f" and {specs[-1]}" if len(specs) > 1 else specs[0]


def reading(checks, pattern: str, contrary: str) -> dict | None:
    """The checks of one claim → {verdict, details, holds}: `verdict` one sentence saying whether `pattern`
    (a clause: "1 − cos grows …"; `contrary` its negation) holds under every spec it can be judged on, some
    (naming those where it does not) or none; `details` the numbers where it does not, and the specs left
    out; `holds` True, False (contradicted under at least one spec) or None (nothing to judge). None when
    there are no checks."""
    checks = [c for c in checks if c is not None]
    if not checks:
        return None
    judged = [c for c in checks if c.holds is not None]
    failing = [c for c in judged if not c.holds]
    same = [c.spec for c in checks if c.identical]
    unjudged = [c for c in checks if c.holds is None and not c.identical]
    n = len(judged)
    every = (
        f"{judged[0].spec}, the one spec that changes the outputs"
        if n == 1
        else f"all {n} specs that change the outputs"
    )
    if not judged:
        verdict = (
            "Every spec leaves the outputs identical to the dense model's: no deviation to judge."
            if not unjudged
            else "This sweep cannot tell: " + "; ".join(f"{c.spec}: {c.detail}" for c in unjudged) + "."
        )
    elif not failing:
        verdict = f"Under {every}, {pattern}."
    elif len(failing) < n:
        verdict = (
            f"Under {n - len(failing)} of {n} specs, {pattern}; under {_names([c.spec for c in failing])}, it does not."
        )
    else:
        verdict = f"Contrary to the claim, under {every}, {contrary}."
    details = []
    if failing:
        details.append("Where it does not: " + "; ".join(f"{c.spec}: {c.detail}" for c in failing) + ".")
    if same and judged:
        details.append(
            f"The spec {same[0]} leaves the outputs identical and is left out."
            if len(same) == 1
            else f"The specs {_names(same)} leave the outputs identical and are left out."
        )
    if unjudged and judged:
        details.append("Not judged: " + "; ".join(f"{c.spec}: {c.detail}" for c in unjudged) + ".")
    return {"verdict": verdict, "details": " ".join(details), "holds": None if not judged else not failing}


CLAIMS = {  # claim → (its pattern, its negation), as clauses
    "hierarchy": (
        "1 − cos grows from hidden states to logits to probabilities",
        "1 − cos does not grow from hidden states to logits to probabilities",
    ),
    "kl-theory": (
        f"the second-order estimate Var_p(Δz)/2T² tracks the measured KL (within a factor {KL_FACTOR})",
        f"the second-order estimate Var_p(Δz)/2T² misses the measured KL by more than a factor {KL_FACTOR}",
    ),
    "amplification": (
        "the softmax amplifies the logit deviation (mean amp per step above 1)",
        "the softmax does not amplify the logit deviation (mean amp per step at most 1)",
    ),
    "accumulation": (
        "free mode, where each model follows its own text, accumulates more KL than shared mode",
        "free mode, where each model follows its own text, accumulates no more KL than shared mode",
    ),
    "multiple-choice": (
        "multiple choice stays stable: its accuracy drops less than generation's top-1 agreement",
        "multiple choice is not more stable than generation: its accuracy drops more than generation's top-1 agreement",
    ),
    "multiple-choice-kl": (
        "the KL over the few choices is smaller than the full-vocabulary KL at the same position",
        "the KL over the few choices is not smaller than the full-vocabulary KL at the same position",
    ),
}


def readings(rows: list[dict], mc: list[dict]) -> dict[str, dict | None]:
    """Every claim's reading for a run: spec_rows and choice_rows → {claim: reading(…) or None}."""
    checks = {
        "hierarchy": (hierarchy_check, rows),
        "kl-theory": (kl_theory_check, rows),
        "amplification": (amplification_check, rows),
        "accumulation": (accumulation_check, rows),
        "multiple-choice": (choice_check, mc),
        "multiple-choice-kl": (choice_kl_check, mc),
    }
    return {claim: reading([check(r) for r in data], *CLAIMS[claim]) for claim, (check, data) in checks.items()}


def _lengths(curve: Curve | None) -> str | None:
    """How many steps the runs of a curve compared: '12', or '4–12' when they stopped at different steps."""
    if curve is None:
        return None
    lo, hi = curve.lengths
    return f"{lo}" if lo == hi else f"{lo}–{hi}"


def _sections(run: RunData) -> tuple[list[dict], list[dict]]:
    """The page's sections, and the summary of what this sweep shows (one verdict per claim)."""
    from markupsafe import Markup

    from hierui.report import charts as C

    def svg(text: str | None):
        return Markup(text) if text else None

    rows = spec_rows(run)
    mc = choice_rows(run)
    said = readings(rows, mc)
    basis = basis_mode(run)
    sections = []

    # 1. hierarchy
    s = {
        "id": "hierarchy",
        "title": "1. The hierarchy: hidden states, logits, probabilities",
        "guide": f"Mean cosine similarity dense vs perturbed per space ({basis or 'shared'} mode, mean over steps "
        "and prompts); in the chart lower bars are closer. Expected: 1 − cos grows from hidden states to "
        "logits to probabilities.",
        "readings": [said["hierarchy"]],
    }
    if any(r["logit_cos"] is not None for r in rows):
        if basis not in (None, "shared"):
            s["note"] = (
                f"No shared-mode runs in this sweep: the figures come from the {basis}-mode runs, whose "
                "contexts differ once the texts split."
            )
        s["table"] = table(
            [
                ("spec", "spec"),
                ("sparsity", "measured sparsity"),
                ("emb_cos", "hidden cos (final layer)"),
                ("logit_cos", "logit cos"),
                ("prob_cos", "prob cos"),
                ("kl", "KL"),
                ("kl_ci", "KL 95% CI"),
                ("tv", "TV"),
                ("top1", "top-1 agree"),
                ("top1_ci", "top-1 95% CI"),
            ],
            [
                {
                    **r,
                    "kl_ci": interval("kl", r.get("kl_lo"), r.get("kl_hi")),
                    "top1_ci": interval("top1", r.get("top1_lo"), r.get("top1_hi")),
                }
                for r in rows
            ],
        )
        s["note"] = (s.get("note") + " " if s.get("note") else "") + (
            "95% CI: the percentile bootstrap interval of the mean over prompts (2000 resamples, seed 0)."
        )
        s["chart"] = svg(C.chart_hierarchy(rows))
    else:
        s["nodata"] = "No generation runs in this sweep: nothing to compare across the three spaces."
    sections.append(s)

    # 2. KL and its theory estimate
    s = {
        "id": "kl-theory",
        "title": "2. KL and its second-order estimate",
        "guide": "The measured KL(P_d ‖ P_p) beside the theory Var_{i~p}(Δz_i)/2T²: points near the diagonal mean "
        "the logit deviation alone explains the probability divergence. The estimates are second order in Δz: "
        "they hold while Var(Δz)/T² ≪ 1; beyond that a cosine estimate can leave [−1, 1] and is left out "
        "(its share of steps: “est out of range”).",
        "readings": [said["kl-theory"]],
    }
    if any(r["kl"] is not None for r in rows):
        columns = [
            ("spec", "spec"),
            ("kl", "KL measured"),
            ("kl_est", "KL est Var_p(Δz)/2T²"),
            ("prob_cos", "prob cos"),
            ("prob_cos_est", "prob cos est"),
        ]
        if any(r.get("est_oor_rate") is not None for r in rows):
            columns.append(("est_oor_rate", "est out of range"))
        s["table"] = table(columns, rows)
        s["chart"] = svg(C.chart_kl_theory(rows))
    else:
        s["nodata"] = "No generation runs in this sweep: no KL to compare with its estimate."
    sections.append(s)

    # 3. amplification
    s = {
        "id": "amplification",
        "title": "3. Amplification by the softmax",
        "guide": "amp = (1 − cos p) / (1 − cos z) per step, averaged: how much larger the deviation is in "
        "probability space than in logit space (the dashed line is 1, no amplification).",
        "readings": [said["amplification"]],
    }
    odd = amplification_disagreements(rows)
    if odd:
        s["note"] = (
            f"For {_names(odd)} the mean amp and the mean cosines of section 1 point different ways: amp is the "
            "mean of a per-step ratio, and steps where the logits barely moved weigh more in it than in the "
            "mean cosines."
        )
    if any(r["amp"] is not None for r in rows):
        s["table"] = table(
            [("spec", "spec"), ("logit_cos", "logit cos"), ("prob_cos", "prob cos"), ("amp", "amp (mean per step)")],
            rows,
        )
        s["chart"] = svg(C.chart_amplification(rows))
    else:
        s["nodata"] = "No amplification factor recorded (no generation runs, or logits identical at every step)."
    sections.append(s)

    # 4. accumulation
    curves = cum_kl_curves(run)
    varies = any(c.varies for c in curves.values())
    s = {
        "id": "accumulation",
        "title": "4. Accumulation over generation steps",
        "guide": "Accumulated KL Σ KL(step) against the step (step 1 = the first generated token), per spec: solid "
        "lines are shared mode (same context, the local effect), dashed free mode (each model its own text). "
        + (
            "Runs stop at different steps (end of sequence), so two means are drawn: over every run, a run that "
            "stopped keeping its final value (it ends at the table's mean final cum KL), and over only the runs "
            "still generating at each step, with how many they are below it."
            if varies
            else "Every run generated every step, so the mean over all runs is the mean at every step."
        ),
        "readings": [said["accumulation"]],
    }
    if curves:
        for r in rows:
            r["len_shared"] = _lengths(curves.get((r["spec"], "shared")))
            r["len_free"] = _lengths(curves.get((r["spec"], "free")))
        s["table"] = table(
            [
                ("spec", "spec"),
                ("cum_kl_shared", "cum KL shared: mean final over runs"),
                ("len_shared", "shared: steps per run"),
                ("cum_kl_free", "cum KL free: mean final over runs"),
                ("len_free", "free: steps per run (both generating)"),
            ],
            rows,
        )
        s["chart"] = svg(C.chart_accumulation(curves, run.specs))
    else:
        s["nodata"] = "No generation steps in this sweep: nothing accumulates."
    sections.append(s)

    # 5. first divergence
    groups = first_divergences(run)
    s = {
        "id": "first-divergence",
        "title": "5. Where the generated texts split",
        "guide": "Free mode: the first step at which the perturbed model picks another token than the dense one "
        "(step 1 = the first generated token), per run (box: quartiles; runs that never split are counted in "
        "the table).",
        "readings": [],
    }
    if groups:
        s["table"] = table(
            [
                ("spec", "spec"),
                ("runs", "free runs"),
                ("diverged", "texts split"),
                ("median", "median step"),
                ("min", "earliest"),
                ("max", "latest"),
            ],
            groups,
            steps=("median", "min", "max"),
        )
        s["chart"] = svg(C.chart_first_divergence(groups))
        if s["chart"] is None:
            s["nodata"] = "In no free-mode run did the two texts differ within the recorded steps."
    else:
        s["nodata"] = "No free-mode runs in this sweep (add --mode free): no first-divergence step to show."
    sections.append(s)

    # 6. multiple choice
    s = {
        "id": "multiple-choice",
        "title": "6. Multiple choice beside generation",
        "guide": "Accuracy of the dense and the perturbed model on the same items, and the divergence they see "
        "over the few candidate answers, beside the divergence of generation under the same spec. Expected: "
        "multiple choice stays stable while generation drifts.",
        "readings": [said["multiple-choice"], said["multiple-choice-kl"]],
    }
    if mc:
        s["table"] = table(
            [
                ("spec", "spec"),
                ("items", "items"),
                ("acc_d", "acc dense"),
                ("acc_p", "acc perturbed"),
                ("agree", "same choice"),
                ("gen_top1", "generation top-1 agree"),
                ("sub_kl", "KL over choices"),
                ("kl", "full KL at answer"),
                ("gen_kl", "generation KL/step"),
                ("gen_cum_kl", "generation cum KL"),
            ],
            mc,
        )
        s["chart"] = svg(C.chart_choices(mc))
        paired = choice_paired_rows(run)
        floor = run.manifest.get("noise_floor") or {}
        s["readings"].append(silent_failures(paired, floor.get("kl_mean")))
        for r in paired:
            for key, name in (
                ("acc_d", "acc"),
                ("acc_p", "acc"),
                ("acc_diff", "acc"),
                ("kl", "kl"),
                ("sub_kl", "kl"),
                ("agree", "agree"),
            ):
                r[f"{key}_ci"] = with_interval(name, r, key)
        s["note"] = (
            "Flips: items the dense model gets right and the perturbed one wrong (right → wrong), and the reverse; "
            "McNemar p: the exact two-sided test that both directions are equally likely (a small p: the accuracy "
            "changed beyond chance). Brackets: 95% percentile bootstrap intervals, items resampled (2000 times, seed "
            "0); pairs of specs are compared on the same items, resampled jointly (OUT/mc_paired, OUT/mc_pairs)."
        )
        s["tables"] = [
            table(
                [
                    ("spec", "spec"),
                    ("items", "items"),
                    ("right_to_wrong", "right → wrong"),
                    ("wrong_to_right", "wrong → right"),
                    ("mcnemar_p", "McNemar p"),
                    ("acc_d_ci", "acc dense [95% CI]"),
                    ("acc_p_ci", "acc perturbed [95% CI]"),
                    ("acc_diff_ci", "Δ acc perturbed − dense [95% CI]"),
                    ("kl_ci", "full KL at answer [95% CI]"),
                    ("sub_kl_ci", "KL over choices [95% CI]"),
                    ("agree_ci", "same choice [95% CI]"),
                ],
                paired,
            )
        ]
        pairs = choice_pair_rows(run)
        for r in pairs:
            r["pair"] = f"{r['spec_a']} vs {r['spec_b']}"
            r["acc_diff_ci"] = with_interval("acc", r, "acc_diff")
            r["kl_diff_ci"] = with_interval("kl", r, "kl_diff")
        if pairs:
            s["tables"].append(
                table(
                    [
                        ("pair", "spec a vs spec b"),
                        ("items", "items"),
                        ("acc_a", "acc a"),
                        ("acc_b", "acc b"),
                        ("a_only", "a right, b wrong"),
                        ("b_only", "a wrong, b right"),
                        ("mcnemar_p", "McNemar p"),
                        ("acc_diff_ci", "Δ acc a − b [95% CI]"),
                        ("kl_a", "KL a"),
                        ("kl_b", "KL b"),
                        ("kl_diff_ci", "Δ KL a − b [95% CI]"),
                    ],
                    pairs,
                )
            )
    else:
        s["nodata"] = (
            'No multiple-choice items in this sweep (JSONL items with "choices" and "answer", e.g. '
            "suite:mc in a recipe): nothing to set against generation."
        )
    sections.append(s)

    sections.append(_where_it_breaks(run, svg))

    assert tuple(s["id"] for s in sections) == SECTION_IDS
    labels = {
        "hierarchy": "The hierarchy",
        "kl-theory": "The theory",
        "amplification": "Amplification",
        "accumulation": "Accumulation",
        "multiple-choice": "Multiple choice",
        "multiple-choice-kl": "The choices' KL",
    }
    summary = [{"label": labels[k], **r} for k, r in said.items() if r is not None]
    for s in sections:
        s["readings"] = [r for r in s["readings"] if r is not None]
    return [
        {"note": None, "table": None, "tables": [], "chart": None, "chart2": None, "nodata": None, **s}
        for s in sections
    ], summary


def _half_layer(grid) -> int | None:
    """The first layer (1-based) whose mean lens KL over steps reaches half of the last layer's."""
    from engine.record.summary import mean

    by_layer = [mean(row) for row in grid.values]
    last = by_layer[-1] if by_layer else None
    if not last:
        return None
    return next((i + 1 for i, v in enumerate(by_layer) if v is not None and v >= last / 2), None)


def _where_it_breaks(run: RunData, svg) -> dict:
    """Section 7: the logit lens per layer, the units that flip tokens, recovery after a split, the noise floor."""
    from engine.results import localization as W
    from hierui.report import charts as C

    s = {
        "id": "where-it-breaks",
        "title": "7. Where it breaks: layers, units, recovery, noise",
        "guide": "Top: the logit lens, each layer's hidden state read out through the model's own final norm and "
        "head, as the mean KL(dense lens ℓ ‖ perturbed lens ℓ) per layer and step (the last layer is the "
        "step's KL). Then, for the steps whose top-1 token flipped (hierui batch --attribute flips), the "
        "sublayers whose dense output, patched into the perturbed forward, removes the most KL (“ranks "
        "first”) or belongs to the smallest set that brings the top-1 back; how often a free-mode split "
        "recovers once the perturbed model is fed the dense token (--counterfactual); and flips beside the "
        "rate numerical noise alone gives (hierui noise).",
        "readings": [],
    }
    grids = W.lens_grids(run)
    said = []
    for grid in grids:
        half = _half_layer(grid)
        if half is not None:
            said.append(f"{grid.spec}: half of the final KL is reached by layer {half} of {grid.layers}")
    if said:
        s["readings"].append({"verdict": "Lens: " + "; ".join(said) + ".", "details": "", "holds": None})
    units = W.flip_units(run)
    tables = []
    if units:
        leaders = {}
        for row in units:
            leaders.setdefault(row["spec"], row)
        s["readings"].append(
            {
                "verdict": "Flips: "
                + "; ".join(
                    f"{r['spec']}: {r['unit']} ranks first for {r['first']} of {r['flips']} attributed flips"
                    for r in leaders.values()
                )
                + ".",
                "details": "",
                "holds": None,
            }
        )
        for r in units:
            r["first_pct"] = None if r["first_share"] is None else f"{100 * r['first_share']:.0f}%"
            r["set_pct"] = None if r["in_set_share"] is None else f"{100 * r['in_set_share']:.0f}%"
            r["restored_pct"] = None if r["restored"] is None else f"{100 * r['restored']:.0f}%"
        tables.append(
            table(
                [
                    ("spec", "spec"),
                    ("flips", "attributed flips"),
                    ("unit", "unit"),
                    ("first_pct", "ranks first"),
                    ("set_pct", "in the minimal set"),
                    ("restored_pct", "KL removed (median)"),
                ],
                units,
            )
        )
    recovery = W.recovery_rows(run)
    if any(r["branched"] for r in recovery):
        s["readings"].append(
            {
                "verdict": "Recovery: "
                + "; ".join(
                    f"{r['spec']}: {r['recovered']} of {r['branched']} splits recovered"
                    for r in recovery
                    if r["branched"]
                )
                + ".",
                "details": "",
                "holds": None,
            }
        )
    if recovery:
        tables.append(
            table(
                [
                    ("spec", "spec"),
                    ("runs", "free runs"),
                    ("split", "texts split"),
                    ("branched", "with a counterfactual branch"),
                    ("recovered", "recovered"),
                    ("rate", "recovery rate"),
                    ("steps", "median steps to recover"),
                ],
                recovery,
            )
        )
    flips = W.flip_rows(run)
    if flips:
        tables.append(
            table(
                [
                    ("spec", "spec"),
                    ("flips", "top-1 flips"),
                    ("compared", "compared steps"),
                    ("flip_rate", "flip rate"),
                    ("near_ties", "near ties"),
                    ("floor_flip_rate", "noise floor flip rate"),
                    ("kl", "KL"),
                    ("floor_kl", "noise floor KL"),
                ],
                flips,
            )
        )
        floor = run.manifest.get("noise_floor")
        if floor:
            cast = floor.get("cast") or {}
            s["note"] = (
                f"Noise floor of the dense model ({floor.get('source') or 'hierui noise'}, {floor.get('dtype') or ''}):"
                f" the same model in another batch shape or without its KV cache flips "
                f"{metric('top1', floor.get('flip_rate'))} of its top-1 tokens at a mean KL of "
                f"{metric('kl', floor.get('kl_mean'))}; a flip at a dense top-1/top-2 margin below "
                f"{metric('kl', floor.get('tie_margin'))} is counted as a near tie."
                + (
                    f" For reference, {cast.get('name')} gives a mean KL of {metric('kl', cast.get('kl_mean'))} and a "
                    f"flip rate of {metric('top1', cast.get('flip_rate'))}."
                    if cast.get("name")
                    else ""
                )
            )
        else:
            s["note"] = (
                "No noise floor recorded for this model: run hierui noise --model MODEL before the sweep to see "
                "the flip rate numerical noise alone produces beside each spec's."
            )
    s["tables"] = tables
    s["chart"] = svg(C.chart_lens_heatmaps(grids))
    s["chart2"] = svg(C.chart_flip_layers(W.flip_layers(run)))
    if not grids and not units and not recovery and not flips:
        s["nodata"] = (
            "Nothing recorded to localize: this sweep has no logit lens (--no-lens), no attributed flips "
            "(--attribute flips) and no free-mode runs."
        )
    elif not grids:
        s["readings"].append(
            {"verdict": "No logit lens in this sweep (recorded with --no-lens).", "details": "", "holds": None}
        )
    return s


def render_html(run: RunData, stamp: str | None = None) -> str:
    """The page for `run`; `stamp` (a time, as text) goes into the footer when given."""
    title = f"hierui report — {run.recipe.get('name') or run.path.name}"
    files = ["batch.json", "summary.parquet", "steps.parquet"] + (["mc_summary.parquet"] if run.mc_summary else [])
    sections, summary = _sections(run)
    from hierui.report import kld as report_kld

    if report_kld.has_kld(run.path):  # `hierui kld --out` into the same folder: section 8, after the argument's
        kld = report_kld.load_kld(run.path)
        sections.append(report_kld.section(kld, len(sections) + 1))
        files += kld.files
    return (
        environment()
        .get_template("report.html.j2")
        .render(
            title=title,
            model=escape(run.manifest.get("model") or MISSING),
            meta=_meta(run),
            description=run.recipe.get("description"),
            claim=True,
            sections=sections,
            summary=summary,
            source=str(run.path),
            stamp=stamp,
            files=files,
        )
    )


def write_report(run_dir: str | Path, out: str | Path | None = None, stamp: bool = False) -> Path:
    """Read RUN_DIR and write its report (default RUN_DIR/report.html), whole or not at all; return its path.
    RUN_DIR: a batch output (and a `hierui kld --out` into it: section 8), or a kld output alone (a page of
    that section, hierui.report.kld). With `stamp`, the footer says when the page was made (and the page then
    differs from run to run)."""
    from hierui.report import kld as report_kld

    folder = Path(run_dir)
    kld_only = folder.is_dir() and not (folder / "batch.json").is_file()
    if kld_only and not report_kld.has_kld(folder):
        raise HieruiError(
            f"{folder} is not a hierui batch output (no batch.json), nor a hierui kld output (no "
            f"{report_kld.SUMMARY}): run hierui batch --out {folder} or hierui kld --out {folder} first"
        )
    run = report_kld.load_kld(folder) if kld_only else load_run(run_dir)
    render = report_kld.render_html if kld_only else render_html
    target = Path(out) if out is not None else run.path / "report.html"
    if target.is_dir():
        target = target / "report.html"
    if not target.parent.is_dir():
        raise HieruiError(f"--out {target}: folder {target.parent} does not exist")
    from engine.record.lock import lock_file

    with lock_file(target):  # one writer per report file: a second one is refused, naming the first
        page = render(run, time.strftime("%Y-%m-%d %H:%M") if stamp else None)
        return atomic_write(target, page)
