"""Where a sweep's perturbations break generation, from its tables: what `hierui report` shows in its
"where it breaks" section. Torch-free: it reads engine.results.runs.RunData only.

    lens_grids      per spec, the mean `lens_kl` over runs at each (layer, step): the layer × step heatmap; a
                    step without lens data (a sampled sweep's other steps) is no cell, not a zero
    sweep_lens      the lens mode the sweep recorded (all, sampled, off): whether its lens figures are a sample
    flip_units      per spec, the units (`attn.ℓ`, `mlp.ℓ`, engine.run.attribution) most often responsible for the
                    top-1 flips that `hierui batch --attribute flips` attributed: how often each ranks first
                    among the sublayers, how often it is in the greedy minimal set that brings the top-1 back
    flip_layers     per spec, how many flips each layer's sublayer ranks first for (the chart)
    recovery_rows   per spec, free mode with --counterfactual: how many runs split, how many recovered after
                    being fed the dense token at the split, and after how many steps
    flip_rows       per spec, flips per compared step and how many were near ties, beside the noise floor
                    (batch.json's `noise_floor`, from `hierui noise`) when the sweep recorded one
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass

from engine.errors import HieruiError
from engine.record.settings import recorded_lens
from engine.record.summary import mean, percentile


@dataclass
class LensGrid:
    """Mean lens_kl of one spec: `values[ℓ − 1][i]` for layer ℓ = 1..L and step i (None: no run has it)."""

    spec: str
    mode: str
    runs: int
    values: list[list[float | None]]

    @property
    def layers(self) -> int:
        return len(self.values)

    @property
    def steps(self) -> int:
        return len(self.values[0]) if self.values else 0


def lens_grids(run, mode: str | None = None) -> list[LensGrid]:
    """One LensGrid per spec that recorded the lens in `mode` (default: the basis mode, shared when recorded)."""
    mode = mode or basis_mode(run)
    cells: dict[str, dict[tuple[int, int], list[float]]] = defaultdict(lambda: defaultdict(list))
    runs: dict[str, set] = defaultdict(set)
    for row in run.steps:
        lens = row.get("lens_kl")
        if row.get("mode") != mode or not lens:
            continue
        runs[row["spec"]].add(row["run_id"])
        for layer, value in enumerate(lens):
            if value is not None:
                cells[row["spec"]][(layer, row["step"])].append(value)
    grids = []
    for spec in run.specs:
        if spec not in cells:
            continue
        found = cells[spec]
        layers = 1 + max(layer for layer, _ in found)
        steps = 1 + max(step for _, step in found)
        values = [[mean(found.get((layer, step), [])) for step in range(steps)] for layer in range(layers)]
        grids.append(LensGrid(spec, mode, len(runs[spec]), values))
    return grids


def sweep_lens(run) -> str | None:
    """The lens mode batch.json records (engine.record.settings.recorded_lens: a manifest from before the modes
    "all", or "off"); None where the folder holds no sweep settings (a kld run alone)."""
    settings = run.manifest.get("settings") if isinstance(run.manifest, dict) else None
    if not isinstance(settings, dict):
        return None
    try:
        return recorded_lens(settings.get("lens"), "lens" in settings)
    except HieruiError:
        return None


def _flips(run) -> dict[str, dict[tuple[str, int], list[dict]]]:
    """Per spec, the attribution rows of each attributed flip (run_id, step)."""
    out: dict[str, dict[tuple[str, int], list[dict]]] = defaultdict(lambda: defaultdict(list))
    for row in getattr(run, "attribution", None) or []:
        out[row["spec"]][(row["run_id"], row["step"])].append(row)
    return out


def _sublayer(row: dict) -> bool:
    return row.get("kind") in ("attn", "mlp")


def flip_units(run, top: int = 5) -> list[dict]:
    """Per spec, its `top` sublayer units by how often they rank first for a flip, with how often they are in
    the minimal set and the median fraction of the KL its patch removes. Rows: spec, flips, unit, first,
    first_share, in_set, in_set_share, restored (median restored_kl over the flips)."""
    rows = []
    for spec, flips in _flips(run).items():
        first: Counter = Counter()
        in_set: Counter = Counter()
        restored: dict[str, list] = defaultdict(list)
        for units in flips.values():
            subs = [u for u in units if _sublayer(u)]
            best = min(subs, key=lambda u: u.get("rank") or 1e9, default=None)
            if best is not None:
                first[best["unit"]] += 1
            for u in subs:
                if u.get("in_minimal_set"):
                    in_set[u["unit"]] += 1
                restored[u["unit"]].append(u.get("restored_kl"))
        n = len(flips)
        names = sorted(set(first) | set(in_set), key=lambda u: (-first[u], -in_set[u], u))[:top]
        for unit in names:
            rows.append(
                {
                    "spec": spec,
                    "flips": n,
                    "unit": unit,
                    "first": first[unit],
                    "first_share": first[unit] / n if n else None,
                    "in_set": in_set[unit],
                    "in_set_share": in_set[unit] / n if n else None,
                    # the median: a unit's patch can also make a flip worse (a negative share, e.g. the last MLP
                    # written into a residual stream the earlier layers left wrong), and a few such outliers
                    # dragged the mean of the embedded model's most frequent first unit to −41%
                    "restored": percentile(restored[unit], 50),
                }
            )
    order = {s: i for i, s in enumerate(run.specs)}
    return sorted(rows, key=lambda r: order.get(r["spec"], len(order)))


def flip_layers(run) -> dict[str, dict[str, Counter]]:
    """Per spec, {"attn": Counter(layer → flips it ranks first for), "mlp": …}."""
    out: dict[str, dict[str, Counter]] = {}
    for spec, flips in _flips(run).items():
        counts = {"attn": Counter(), "mlp": Counter()}
        for units in flips.values():
            best = min((u for u in units if _sublayer(u)), key=lambda u: u.get("rank") or 1e9, default=None)
            if best is not None:
                counts[best["kind"]][best["layer"]] += 1
        out[spec] = counts
    return out


def flip_counts(rows: list[dict]) -> dict | None:
    """Over per-run summaries: flips, compared (steps), flip_rate, near_ties (None where no run recorded them);
    None when no run recorded its flips (a sweep from before them)."""
    counted = [r for r in rows if r.get("flips") is not None]
    if not counted:
        return None
    flips = sum(r["flips"] for r in counted)
    compared = sum(r.get("compared_steps") or 0 for r in counted)
    ties = [r["near_tie_flips"] for r in rows if r.get("near_tie_flips") is not None]
    return {
        "flips": flips,
        "compared": compared,
        "flip_rate": flips / compared if compared else None,
        "near_ties": sum(ties) if ties else None,
    }


def recovery_counts(free: list[dict]) -> dict:
    """Over free-mode summaries: split (a first divergence), branched (a counterfactual branch with a compared
    step), recovered, rate (recovered / branched), steps (median recovery_steps of those that recovered)."""
    split = [r for r in free if r.get("first_divergence") is not None]
    branched = [r for r in split if r.get("recovered") is not None]
    recovered = [r for r in branched if r.get("recovered")]
    return {
        "split": len(split),
        "branched": len(branched),
        "recovered": len(recovered),
        "rate": len(recovered) / len(branched) if branched else None,
        "steps": percentile([r.get("recovery_steps") for r in recovered], 50) if recovered else None,
    }


def recovery_rows(run) -> list[dict]:
    """Per spec with free-mode runs: runs, split (a first divergence), branched (a counterfactual branch with a
    compared step), recovered, rate (recovered / branched), median recovery_steps of those that recovered."""
    rows = []
    for spec in run.specs:
        free = [r for r in run.summary if r.get("spec") == spec and r.get("mode") == "free"]
        if not free:
            continue
        rows.append({"spec": spec, "runs": len(free), **recovery_counts(free)})
    return rows


def flip_rows(run) -> list[dict]:
    """Per spec (basis mode): flips, compared steps, flip rate, near ties, and the noise floor's flip rate."""
    basis = basis_mode(run)
    floor = run.manifest.get("noise_floor") or {}
    rows = []
    for spec in run.specs:
        mine = [r for r in run.summary if r.get("spec") == spec and r.get("mode") == basis]
        counts = flip_counts(mine)
        if counts is None:
            continue
        rows.append(
            {
                "spec": spec,
                **counts,
                "floor_flip_rate": floor.get("flip_rate"),
                "floor_kl": floor.get("kl_mean"),
                "kl": mean(r.get("kl_mean") for r in mine),
            }
        )
    return rows


def basis_mode(run) -> str | None:
    """The mode the hierarchy figures come from: shared (same context for both models) when recorded."""
    modes = run.modes
    return "shared" if "shared" in modes else (modes[0] if modes else None)
