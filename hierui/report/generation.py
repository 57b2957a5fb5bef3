"""The report's sections on generation (1–5): the hierarchy of spaces, KL and its estimate, amplification by the
softmax, accumulation over steps, and where the generated texts split; each a dict the template renders."""

from __future__ import annotations

from engine.results.runs import Curve, RunData, cum_kl_curves, first_divergences
from hierui.report import charts as C
from hierui.report.readings import amplification_disagreements
from hierui.report.tables import interval, names, svg, table


def hierarchy_section(rows: list[dict], said: dict, basis: str | None) -> dict:
    """Section 1: the mean cosines per space (`basis`: the mode the figures come from, engine.results.localization)."""
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
        layers = svg(C.chart_layer_sparsity(rows))
        if layers:  # a layer allocation (wanda:0.6@owl, @auto, @FILE): where each spec's zeros are
            s["figures"] = [layers]
            s["note"] += " Last chart: the zero weights per decoder layer of each spec (a layer allocation's mix)."
    else:
        s["nodata"] = "No generation runs in this sweep: nothing to compare across the three spaces."
    return s


def kl_theory_section(rows: list[dict], said: dict) -> dict:
    """Section 2: the measured KL beside its second-order estimate."""
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
    return s


def amplification_section(rows: list[dict], said: dict) -> dict:
    """Section 3: the softmax's amplification of the logit deviation."""
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
            f"For {names(odd)} the mean amp and the mean cosines of section 1 point different ways: amp is the "
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
    return s


def _lengths(curve: Curve | None) -> str | None:
    """How many steps the runs of a curve compared: '12', or '4–12' when they stopped at different steps."""
    if curve is None:
        return None
    lo, hi = curve.lengths
    return f"{lo}" if lo == hi else f"{lo}–{hi}"


def accumulation_section(run: RunData, rows: list[dict], said: dict) -> dict:
    """Section 4: the accumulated KL over the steps (adds len_shared and len_free to `rows`)."""
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
    return s


def first_divergence_section(run: RunData) -> dict:
    """Section 5: the first step at which the free-mode texts split."""
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
    return s
