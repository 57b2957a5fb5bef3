"""Non-uniform sparsity: how much of each decoder layer a pruning spec prunes when it carries an allocation.

Written after the spec's own arguments (engine.perturb.spec), for the pruning methods that declare it
(Method.allocates: magnitude, wanda, sparsegpt; never N:M, whose pattern fixes the sparsity of every group):

    wanda:0.6@owl            OWL (Yin et al., 2023): each layer's outlier ratio sets its density (engine.perturb.owl)
    wanda:0.6@owl:M:λ        the same with outliers above M × the layer's mean score (default 5) and the densities
                             spread over 2λ (default 0.08) around the target
    wanda:0.6@FILE.json      the sparsities a file gives, per layer or per matrix (`read_file` says how)
    wanda:0.6@auto           from measured sensitivity (`hierui sensitivity` on the calibration): the layer
    wanda:0.6@auto:LO:HI     sparsities in [LO, HI] (default the target ± AUTO_BOUND) minimising the predicted KLD

Whatever the per-layer mix, the sparsity over all pruned weights equals the target, counted in weights: `realize`
turns the wanted per-matrix sparsities into whole counts of pruned weights (as each method rounds: per output row
for Wanda, per matrix for magnitude and SparseGPT) and moves single rows or weights between matrices until the
total is the target's to within one row of the widest matrix (far under 0.001 of the weights of any real model).

Nothing here imports torch: the spec grammar and the CLI's checks read it before any model loads.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from engine.errors import HieruiError

OWL_M = 5.0  # OWL's outlier threshold: scores above M × the layer's mean score
OWL_LAMBDA = 0.08  # OWL's λ: the layers' densities spread over [target density − λ, + λ] around their mean
FORMAT = "hierui-allocation"  # a file's "format" (`hierui sensitivity --allocate` writes it; optional by hand)
BUDGET_SLACK = 0.001  # a file's weighted mean sparsity may miss the spec's target by at most this before realize

_DECIMAL = re.compile(r"[0-9]*\.?[0-9]+")


@dataclass(frozen=True)
class Allocation:
    """What follows '@' in a spec: `kind` owl (with `m`, `lam`), auto (with the bounds `lo`, `hi`, None: the
    target ± AUTO_BOUND) or file (with `path`)."""

    kind: str
    m: float = OWL_M
    lam: float = OWL_LAMBDA
    path: str | None = None
    lo: float | None = None
    hi: float | None = None

    def __str__(self) -> str:
        if self.kind == "file":
            return str(self.path)
        if self.kind == "auto":
            return "auto" if self.lo is None else f"auto:{self.lo:g}:{self.hi:g}"
        if (self.m, self.lam) == (OWL_M, OWL_LAMBDA):
            return "owl"
        return f"owl:{self.m:g}:{self.lam:g}"

    @property
    def slug(self) -> str:
        """File-name-safe: 'owl', 'owl-7-0.1', or the file's stem."""
        if self.kind == "file":
            return "".join(c if c.isalnum() or c in "._" else "_" for c in Path(str(self.path)).stem)
        return str(self).replace(":", "-")


def parse_allocation(raw: str, text: str, bad) -> Allocation:
    """The allocation written after '@' in the spec `raw`; `bad(raw, why)` makes the one-line error."""
    text = text.strip()
    if not text:
        raise bad(raw, "nothing after '@'; write @owl, @owl:M:λ or @FILE.json")
    name, _, rest = text.partition(":")
    if name.lower() == "owl":
        if not rest:
            return Allocation("owl")
        parts = [p.strip() for p in rest.split(":")]
        if len(parts) != 2 or not all(_DECIMAL.fullmatch(p) for p in parts):
            raise bad(raw, "@owl takes two numbers, @owl:M:λ (e.g. @owl:5:0.08: outliers above 5 × the mean, ±0.08)")
        m, lam = float(parts[0]), float(parts[1])
        if m <= 1:
            raise bad(raw, f"OWL's M must be above 1 (scores above M × the layer mean are outliers), got {parts[0]}")
        if not 0 <= lam < 0.5:
            raise bad(raw, f"OWL's λ must be in [0, 0.5), got {parts[1]}")
        return Allocation("owl", m=m, lam=lam)
    if name.lower() == "auto":
        if not rest:
            return Allocation("auto")
        parts = [p.strip() for p in rest.split(":")]
        if len(parts) != 2 or not all(_DECIMAL.fullmatch(p) for p in parts):
            raise bad(raw, "@auto takes two sparsities, @auto:LO:HI (e.g. @auto:0.45:0.75: every layer within them)")
        lo, hi = float(parts[0]), float(parts[1])
        if not 0 <= lo < hi < 1:
            raise bad(raw, f"@auto's bounds need 0 ≤ LO < HI < 1, got {parts[0]}:{parts[1]}")
        return Allocation("auto", lo=lo, hi=hi)
    return Allocation("file", path=text)


def bounds(allocation: Allocation, target: float) -> tuple[float, float]:
    """@auto's per-unit bounds: its own, or the target ± AUTO_BOUND within [0, 0.99]."""
    if allocation.lo is not None:
        return allocation.lo, allocation.hi
    return round(max(0.0, target - AUTO_BOUND), 6), round(min(0.99, target + AUTO_BOUND), 6)


# ------------------------------------------------------------------ files


def file_hash(path: str | Path) -> str:
    """The SHA-256 of the file's bytes (part of the pruned-weight cache key and of the session header)."""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError as e:
        raise HieruiError(f"allocation file {path}: {e.strerror or e}") from None


def read_file(path: str | Path) -> dict:
    """A file's wanted sparsities: {"layers": {"0": s, …}} (a decoder layer's index → the sparsity of every matrix
    in it) and/or {"matrices": {"layers.3.self_attn.q_proj": s, …}} (a matrix as engine.anatomy.linears names it,
    `layers.{index}.{name}`, overriding its layer's value); each s in [0, 1). Other keys are kept for the reader
    ("format", "method", "target", "unit" from `hierui sensitivity --allocate`). One line for a file that is
    missing, is not JSON, or holds anything else."""
    where = f"allocation file {path}"
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise HieruiError(f"{where} not found") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise HieruiError(f"{where} is not readable JSON: {e}") from None
    tables = [data.get(part) for part in ("layers", "matrices")] if isinstance(data, dict) else []
    if not any(isinstance(table, dict) for table in tables):
        raise HieruiError(f'{where}: expected an object with "layers" and/or "matrices" (name → sparsity)')
    for part in ("layers", "matrices"):
        table = data.get(part) or {}
        if not isinstance(table, dict):
            raise HieruiError(f'{where}: "{part}" must be an object (name → sparsity)')
        for name, value in table.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise HieruiError(f'{where}: "{part}" → "{name}" is {value!r}; a sparsity must be in [0, 1)')
            if part == "layers" and not re.fullmatch(r"[0-9]+", str(name)):
                raise HieruiError(f'{where}: "layers" keys are layer indices (0, 1, …), got "{name}"')
    return data


def check_file(path: str | Path, matrices: list[tuple[int, str, int]], target: float) -> None:
    """A file against the model's matrices [(layer, name, weights)] (engine.anatomy.linears) before pruning: every
    layer and matrix it names exists, it gives a value to every matrix (a layer value or its own), and its mean
    sparsity over all weights is the spec's target within BUDGET_SLACK. One line (exit 2) otherwise."""
    data = read_file(path)
    wanted = file_sparsities(data, matrices, path)
    total = sum(n for _l, _name, n in matrices)
    mean = sum(wanted[(layer, name)] * n for layer, name, n in matrices) / total
    if abs(mean - target) > BUDGET_SLACK:
        raise HieruiError(
            f"allocation file {path}: its sparsities average {mean:.4f} over the model's {total:,} pruned weights, "
            f"not the spec's {target:g} (within {BUDGET_SLACK:g}); change the spec's sparsity or the file"
        )


def file_sparsities(data: dict, matrices: list[tuple[int, str, int]], path) -> dict[tuple[int, str], float]:
    """(layer, name) → the file's sparsity for every matrix of `matrices`; one line where a name is unknown or a
    matrix gets no value."""
    layers = {layer for layer, _name, _n in matrices}
    by_layer = {int(k): float(v) for k, v in (data.get("layers") or {}).items()}
    unknown = sorted(set(by_layer) - layers)
    if unknown:
        raise HieruiError(
            f"allocation file {path}: no decoder layer {unknown[0]} in this model (it has layers 0–{max(layers)})"
        )
    names = {f"layers.{layer}.{name}": (layer, name) for layer, name, _n in matrices}
    by_matrix = dict(data.get("matrices") or {})
    for key in by_matrix:
        if key not in names:
            example = next(iter(names))
            raise HieruiError(f'allocation file {path}: no matrix "{key}" in this model (names look like "{example}")')
    out = {}
    for key, (layer, name) in names.items():
        value = by_matrix.get(key, by_layer.get(layer))
        if value is None:
            raise HieruiError(f"allocation file {path}: no sparsity for layer {layer} (nor for its matrix {key})")
        out[(layer, name)] = float(value)
    return out


# ------------------------------------------------------------------ whole counts


@dataclass(frozen=True)
class Matrix:
    """A pruned matrix as `realize` counts it: its key (layer, name), rows and columns."""

    layer: int
    name: str
    rows: int
    cols: int

    @property
    def weights(self) -> int:
        return self.rows * self.cols


def pruned_count(matrix: Matrix, sparsity: float, per_row: bool) -> int:
    """Weights the methods prune of `matrix` at `sparsity` (engine.perturb.masks: int(cols · s) in every row for a
    per-row method, else int(rows · cols · s) of the matrix)."""
    if per_row:
        return matrix.rows * int(matrix.cols * sparsity)
    return int(matrix.weights * sparsity)


def realize(matrices: list[Matrix], wanted: dict, per_row: bool, target: float) -> dict[tuple[int, str], float]:
    """The sparsity to hand the method for each matrix so that the whole counts it prunes total round(target × all
    weights) as closely as the grain allows (one row's worth, `rows` weights, of a matrix for a per-row method; one
    weight otherwise), each as near its `wanted` value as that allows: the counts of the wanted values first, then
    one grain at a time to the matrix furthest from its wanted share in the direction needed. The values returned
    sit half a grain above the count (int() in the methods gives the count back exactly, whatever the rounding of a
    product); `realized` reads the fractions."""
    total = sum(m.weights for m in matrices)
    goal = round(target * total)
    counts = {}
    for m in matrices:
        s = min(max(wanted[(m.layer, m.name)], 0.0), 1.0)
        counts[(m.layer, m.name)] = pruned_count(m, s, per_row)
    grain = {(m.layer, m.name): (m.rows if per_row else 1) for m in matrices}
    limit = {(m.layer, m.name): (m.weights - grain[(m.layer, m.name)]) for m in matrices}  # never a whole matrix
    by_key = {(m.layer, m.name): m for m in matrices}
    missing = goal - sum(counts.values())
    while missing:
        direction = 1 if missing > 0 else -1
        best, best_gap = None, None
        for key, m in by_key.items():
            after = counts[key] + direction * grain[key]
            if after < 0 or after > limit[key] or abs(missing - direction * grain[key]) >= abs(missing):
                continue
            gap = direction * (after / m.weights - wanted[key])  # how far past its wanted share the step takes it
            if best_gap is None or gap < best_gap:
                best, best_gap = key, gap
        if best is None:
            break  # the finest grain left would overshoot more than it helps
        counts[best] += direction * grain[best]
        missing -= direction * grain[best]
    out = {}
    for key, m in by_key.items():
        if per_row:
            out[key] = (counts[key] // m.rows + 0.5) / m.cols
        else:
            out[key] = (counts[key] + 0.5) / m.weights
    return out


def realized(matrices: list[Matrix], given: dict, per_row: bool) -> dict[tuple[int, str], float]:
    """The fraction of each matrix the method prunes at the sparsities `given` (realize's values)."""
    return {(m.layer, m.name): pruned_count(m, given[(m.layer, m.name)], per_row) / m.weights for m in matrices}


def by_layer(matrices: list[Matrix], fractions: dict) -> list[float]:
    """Each decoder layer's pruned fraction of its weights (the prune table's and the header's per-layer column)."""
    pruned: dict[int, float] = {}
    weights: dict[int, int] = {}
    for m in matrices:
        pruned[m.layer] = pruned.get(m.layer, 0.0) + fractions[(m.layer, m.name)] * m.weights
        weights[m.layer] = weights.get(m.layer, 0) + m.weights
    return [pruned[layer] / weights[layer] for layer in sorted(weights)]


def owl_sparsities(ratios: list[float], target: float, lam: float) -> list[float]:
    """OWL's layer sparsities from the layers' outlier ratios: the ratios scaled to [0, 2λ], shifted so that their
    mean is the target density 1 − target, each layer's density that value (denser where outliers are more
    frequent), its sparsity one minus it. Equal ratios give the target everywhere."""
    low, high = min(ratios), max(ratios)
    if not high > low or not math.isfinite(high - low):
        return [target for _ in ratios]
    spread = [(r - low) / (high - low) * 2 * lam for r in ratios]
    mean = sum(spread) / len(spread)
    return [1 - (s - mean + 1 - target) for s in spread]


# ------------------------------------------------------------------ from measured sensitivity

AUTO_BOUND = 0.15  # the default per-unit bounds around the target: [target − 0.15, target + 0.15]
GRID = 0.0025  # the sparsities the allocation chooses among, between the bounds


def predicted_damage(points: list[tuple[float, float]], s: float) -> float:
    """A unit's corpus KLD at sparsity s, predicted from its measured (sparsity, KLD) points and (0, 0): linear
    between the two nearest levels, the last segment's slope beyond the highest (never below 0)."""
    pts = sorted({0.0: 0.0, **dict(points)}.items())
    for (s0, k0), (s1, k1) in zip(pts, pts[1:]):
        if s <= s1 or (s1, k1) == pts[-1]:
            return max(0.0, k0 + (k1 - k0) * (s - s0) / (s1 - s0))
    return pts[-1][1]


def allocate(units: list[dict], target: float, lo: float, hi: float) -> dict[str, float]:
    """Each unit's sparsity in [lo, hi] (a grid of GRID) minimising the predicted total KLD, Σ predicted_damage
    (additive: each unit measured alone, their damages summed), with the weighted mean sparsity the target.
    `units`: {"unit": name, "weights": n, "points": [(sparsity, kl_mean), …]}. A Lagrange multiplier μ on the
    budget, found by bisection: each unit takes the sparsity that minimises damage − μ · weights · s; the units
    whose choice jumps at the final μ are moved along their own lines until the budget is met (the whole counts
    are made exact later by realize). One line when [lo, hi] cannot hold the target."""
    if not lo <= target <= hi:
        raise HieruiError(f"the bounds [{lo:g}, {hi:g}] do not hold the target sparsity {target:g}")
    steps = int(round((hi - lo) / GRID))
    grid = [lo + i * (hi - lo) / steps for i in range(steps + 1)] if steps else [lo]
    total = sum(u["weights"] for u in units)
    goal = target * total
    damage = {u["unit"]: [predicted_damage(u["points"], s) for s in grid] for u in units}
    scale = max((max(d) for d in damage.values()), default=0.0) or 1.0

    def choose(mu: float) -> dict[str, int]:
        out = {}
        for u in units:
            cost = [damage[u["unit"]][i] / scale - mu * u["weights"] / total * s for i, s in enumerate(grid)]
            out[u["unit"]] = min(range(len(grid)), key=lambda i: (cost[i], -i))  # ties: the sparser
        return out

    def used(choice) -> float:
        return sum(grid[choice[u["unit"]]] * u["weights"] for u in units)

    low, high = 0.0, 1.0
    while used(choose(high)) < goal and high < 1e12:
        high *= 2
    for _ in range(100):
        mid = (low + high) / 2
        if used(choose(mid)) < goal:
            low = mid
        else:
            high = mid
    below, above = choose(low), choose(high)
    chosen = {name: grid[i] for name, i in below.items()}
    missing = goal - sum(chosen[u["unit"]] * u["weights"] for u in units)
    for u in sorted(units, key=lambda u: u["weights"]):  # move the jumping units towards their higher choice
        name = u["unit"]
        room = (grid[above[name]] - chosen[name]) * u["weights"]
        if missing <= 0 or room <= 0:
            continue
        step = min(room, missing)
        chosen[name] += step / u["weights"]
        missing -= step
    return chosen


def allocate_from_table(
    rows: list[dict], method: str, target: float, lo: float | None = None, hi: float | None = None
) -> dict:
    """The allocation file (a dict to write as JSON, engine.perturb.allocation.read_file's format) that `hierui
    sensitivity --allocate TARGET` writes from its table: rows {"unit", "unit_kind" (layer, sublayer or matrix),
    "layer", "matrices" (the `layers.ℓ.name` names the unit covers), "weights", "level" (a sparsity), "kl_mean"}.
    Bounds default to AUTO_BOUND around the target."""
    if lo is None or hi is None:
        lo, hi = bounds(Allocation("auto"), target)
    units: dict[str, dict] = {}
    for row in rows:
        unit = units.setdefault(row["unit"], {"unit": row["unit"], "weights": row["weights"], "points": [], "row": row})
        unit["points"].append((float(row["level"]), float(row["kl_mean"])))
    chosen = allocate(list(units.values()), target, lo, hi)
    kinds = {u["row"]["unit_kind"] for u in units.values()}
    out: dict = {"format": FORMAT, "version": 1, "method": method, "target": target, "bounds": [lo, hi]}
    if kinds == {"layer"}:
        out["unit"] = "layer"
        out["layers"] = {str(u["row"]["layer"]): round(chosen[name], 6) for name, u in units.items()}
    else:
        out["unit"] = "/".join(sorted(kinds))
        out["matrices"] = {m: round(chosen[name], 6) for name, u in units.items() for m in u["row"]["matrices"]}
    out["predicted_kl"] = sum(predicted_damage(u["points"], chosen[name]) for name, u in units.items())
    return out
