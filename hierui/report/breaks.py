"""The report's section 7, where it breaks: the logit lens per layer, the units that flip tokens, recovery after a
split, and the flips beside the noise floor's."""

from __future__ import annotations

from engine.results import localization as W
from engine.results.runs import RunData
from hierui.format import metric
from hierui.report import charts as C
from hierui.report.tables import svg, table


def _half_layer(grid) -> int | None:
    """The first layer (1-based) whose mean lens KL over steps reaches half of the last layer's."""
    from engine.record.summary import mean

    by_layer = [mean(row) for row in grid.values]
    last = by_layer[-1] if by_layer else None
    if not last:
        return None
    return next((i + 1 for i, v in enumerate(by_layer) if v is not None and v >= last / 2), None)


def _said(verdict: str) -> dict:
    """A reading that states what the run shows, with no claim to hold or fail."""
    return {"verdict": verdict, "details": "", "holds": None}


def where_it_breaks(run: RunData) -> dict:
    """Section 7: the logit lens per layer, the units that flip tokens, recovery after a split, the noise floor."""
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
        s["readings"].append(_said("Lens: " + "; ".join(said) + "."))
    if grids and W.sweep_lens(run) == "sampled":
        s["readings"].append(_said(sampled_note()))
    units = W.flip_units(run)
    tables = []
    if units:
        s["readings"].append(_units_reading(units))
        tables.append(_units_table(units))
    recovery = W.recovery_rows(run)
    if any(r["branched"] for r in recovery):
        s["readings"].append(
            _said(
                "Recovery: "
                + "; ".join(
                    f"{r['spec']}: {r['recovered']} of {r['branched']} splits recovered"
                    for r in recovery
                    if r["branched"]
                )
                + "."
            )
        )
    if recovery:
        tables.append(_recovery_table(recovery))
    flips = W.flip_rows(run)
    if flips:
        tables.append(_flips_table(flips))
        s["note"] = floor_note(run.manifest.get("noise_floor"))
    s["tables"] = tables
    s["chart"] = svg(C.chart_lens_heatmaps(grids))
    s["chart2"] = svg(C.chart_flip_layers(W.flip_layers(run)))
    if not grids and not units and not recovery and not flips:
        s["nodata"] = (
            "Nothing recorded to localize: this sweep has no logit lens (--lens off), no attributed flips "
            "(--attribute flips) and no free-mode runs."
        )
    elif not grids:
        s["readings"].append(_said("No logit lens in this sweep (recorded with --lens off)."))
    return s


def sampled_note() -> str:
    """The sentence a sampled sweep's lens figures come with (engine.record.settings: lens "sampled")."""
    from engine.record.settings import LENS_SAMPLE_EVERY

    return (
        f"The lens figures come from a sample of steps (--lens sampled): every {LENS_SAMPLE_EVERY}th step, every "
        "step whose top-1 flips and each run's first divergence; the other steps have no lens data (no cell), "
        "and --lens all computes every step."
    )


def _units_reading(units: list[dict]) -> dict:
    """Which unit ranks first most often, per spec (`units`: engine.results.localization.flip_units, the leader
    of each spec first)."""
    leaders = {}
    for row in units:
        leaders.setdefault(row["spec"], row)
    return _said(
        "Flips: "
        + "; ".join(
            f"{r['spec']}: {r['unit']} ranks first for {r['first']} of {r['flips']} attributed flips"
            for r in leaders.values()
        )
        + "."
    )


def _units_table(units: list[dict]) -> dict:
    """The units that flip tokens, their shares as percentages (added to each row)."""
    for r in units:
        r["first_pct"] = None if r["first_share"] is None else f"{100 * r['first_share']:.0f}%"
        r["set_pct"] = None if r["in_set_share"] is None else f"{100 * r['in_set_share']:.0f}%"
        r["restored_pct"] = None if r["restored"] is None else f"{100 * r['restored']:.0f}%"
    return table(
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


def _recovery_table(recovery: list[dict]) -> dict:
    return table(
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


def _flips_table(flips: list[dict]) -> dict:
    return table(
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


def floor_note(floor: dict | None) -> str:
    """The note under the flips: the noise floor the sweep recorded (the manifest's noise_floor), or how to get one."""
    if not floor:
        return (
            "No noise floor recorded for this model: run hierui noise --model MODEL before the sweep to see "
            "the flip rate numerical noise alone produces beside each spec's."
        )
    cast = floor.get("cast") or {}
    return (
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
