"""The `zero` check (`none` only): the dense model against itself gives exactly zero divergence.

Stepped in free mode (each model fed its own token, so the texts could split), every metric of every step sits
at its identity value (kl, js, tv, dp, emb_rel, … = 0; every cosine, top1_agree, topk_overlap = 1; nll_d = nll_p,
top-k and subspace probabilities equal; amp null; no first divergence; same tokens). Tolerance 0: the value is
the largest distance of any field from its identity value.
"""

from __future__ import annotations

import math

from engine.check.compare import as_numbers, deviation
from engine.check.result import CheckResult
from engine.check.stepping import CHOICES, PROMPTS, step_settings

# the identity value of every field of a step record of `none` (engine.run.stepper, engine.run.metrics)
_ZERO = frozenset(
    {"kl", "kl_est", "js", "tv", "dp", "rank_shift", "emb_rel", "emb_perp", "logit_rel", "sub_kl", "cum_kl"}
    | {"cum_nll_gap"}
)
_ONE = frozenset(
    {"emb_cos", "emb_cos_est", "logit_cos", "prob_cos", "prob_cos_est", "top1_agree", "topk_overlap", "sub_cos"}
    | {"sub_agree"}
)
_FALSE = frozenset({"emb_cos_est_oor", "prob_cos_est_oor"})
_NULL = frozenset({"amp", "first_divergence"})
_TRUE = frozenset({"same_token"})
_EQUAL = (("nll_d", "nll_p"), ("sub_p_d", "sub_p_p"), ("token_d", "token_p"), ("text_d", "text_p"))
_EQUAL += (("topk_d", "topk_p"), ("end_d", "end_p"))
_NOT_COMPARED = frozenset({"step", "fed"})


def check_zero(pair, steps: int) -> CheckResult:
    """`none`: every field of every step at its identity value, identical tokens (free mode)."""
    from engine.run.stepper import Stepper

    spec = str(pair.spec)
    stepper = Stepper(pair, PROMPTS[0], step_settings("free", steps, CHOICES[0]))
    stepper.batch.eos = set()  # every step compared (engine.run.stepper: an empty set never ends a run)
    records = stepper.run()
    worst, where, unchecked = 0.0, "", set()

    def seen(dev: float, field_name: str, step: int) -> None:
        nonlocal worst, where
        if dev > worst or (math.isnan(dev) and not math.isnan(worst)):
            worst, where = dev, f"{field_name} at step {step + 1}"

    paired = {a for pair_ in _EQUAL for a in pair_}
    for r in records:
        i = r["step"]
        for key, value in r.items():
            if key in _ZERO:
                seen(_distance(value, 0.0), key, i)
            elif key in _ONE:
                seen(_distance(value, 1.0), key, i)
            elif key in _FALSE:
                flags = value if isinstance(value, list) else [value]
                seen(0.0 if all(v is False for v in flags) else math.inf, key, i)
            elif key in _NULL:
                seen(0.0 if value is None else math.inf, key, i)
            elif key in _TRUE:
                seen(0.0 if value is True else math.inf, key, i)
            elif key in paired or key in _NOT_COMPARED:
                continue
            else:
                unchecked.add(key)
        for a, b in _EQUAL:
            if a in r or b in r:
                same = r.get(a) == r.get(b)
                numeric = deviation(r.get(a), r.get(b)) if a.startswith(("nll", "sub_p")) else None
                seen(numeric if numeric is not None else (0.0 if same else math.inf), f"{a} vs {b}", i)
        fed = r.get("fed") or [None, None]
        seen(0.0 if fed[0] == fed[1] else math.inf, "fed", i)
    note = f"{len(records)} steps, free mode"
    if unchecked:
        note += f"; fields with no identity value, not checked: {', '.join(sorted(unchecked))}"
    if worst == 0.0:
        return CheckResult(spec, "zero", "pass", 0.0, 0.0, note, "every field")
    return CheckResult(spec, "zero", "fail", worst, 0.0, f"{where} is {worst:.3g} from its identity value", where)


def _distance(value, identity: float) -> float:
    """How far a field (a number, or a list of numbers) is from its identity value."""
    return deviation(value, [identity] * len(as_numbers(value) or [0]) if isinstance(value, list) else identity)
