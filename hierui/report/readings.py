"""The report's readings: every sentence that states a pattern, decided from the run's own numbers.

Small pure functions: *_check takes one spec's row (engine.results.runs.spec_rows, choice_rows) to a Check;
reading takes a claim's checks to its sentences, so a run that contradicts the expected pattern is told so,
spec by spec; silent_failures reads the paired multiple-choice rows against the noise floor.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.results.paired import SIGNIFICANT, SILENT_KL, is_silent, silent_limit
from hierui.format import metric
from hierui.report.tables import names

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
            f"Under {n - len(failing)} of {n} specs, {pattern}; under {names([c.spec for c in failing])}, it does not."
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
            else f"The specs {names(same)} leave the outputs identical and are left out."
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
        "verdict": f"Silent failures: {names([r['spec'] for r in found])} — a mean KL at the answer below {source} "
        f"{metric('kl', limit)} nats, yet significant flips of correctness (McNemar p < {SIGNIFICANT}).",
        "details": "; ".join(
            f"{r['spec']}: KL {metric('kl', r['kl'])}, {r['right_to_wrong']} right → wrong and "
            f"{r['wrong_to_right']} wrong → right, p = {metric('mcnemar_p', r['mcnemar_p'])}"
            for r in found
        )
        + ".",
        "holds": False,
    }
