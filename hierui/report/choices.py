"""The report's section 6: multiple choice beside generation, with its flips, intervals and pairs of specs."""

from __future__ import annotations

from engine.results.runs import RunData, choice_pair_rows, choice_paired_rows
from hierui.report import charts as C
from hierui.report.readings import silent_failures
from hierui.report.tables import svg, table, with_interval


def choice_section(run: RunData, mc: list[dict], said: dict) -> dict:
    """Section 6 (`mc`: engine.results.runs.choice_rows, `said`: every claim's reading)."""
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
        s["note"] = (
            "Flips: items the dense model gets right and the perturbed one wrong (right → wrong), and the reverse; "
            "McNemar p: the exact two-sided test that both directions are equally likely (a small p: the accuracy "
            "changed beyond chance). Brackets: 95% percentile bootstrap intervals, items resampled (2000 times, seed "
            "0); pairs of specs are compared on the same items, resampled jointly (OUT/mc_paired, OUT/mc_pairs)."
        )
        pairs = choice_pair_rows(run)
        s["tables"] = [flips_table(paired)] + ([pairs_table(pairs)] if pairs else [])
    else:
        s["nodata"] = (
            'No multiple-choice items in this sweep (JSONL items with "choices" and "answer", e.g. '
            "suite:mc in a recipe): nothing to set against generation."
        )
    return s


def flips_table(paired: list[dict]) -> dict:
    """Each spec's flips of correctness and its intervals (`paired`: engine.results.runs.choice_paired_rows;
    adds each interval's text to its row)."""
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
    return table(
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


def pairs_table(pairs: list[dict]) -> dict:
    """Pairs of specs compared on the same items (`pairs`: engine.results.runs.choice_pair_rows; adds the pair's
    name and the differences' intervals to each row)."""
    for r in pairs:
        r["pair"] = f"{r['spec_a']} vs {r['spec_b']}"
        r["acc_diff_ci"] = with_interval("acc", r, "acc_diff")
        r["kl_diff_ci"] = with_interval("kl", r, "kl_diff")
    return table(
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
