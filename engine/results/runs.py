"""A `hierui batch` output folder as data: what `hierui report` and `hierui show RUN_DIR` print.

    load_run()           reads OUT/batch.json, summary.parquet, steps.parquet (the few columns needed) and,
                         when the sweep scored multiple-choice items, mc.parquet and mc_summary.parquet
    spec_rows()          one dict per spec: the similarity in each space, KL and its estimate, amplification,
                         accumulated KL, first divergence, multiple-choice accuracy (means over runs)
    basis_mode()         the mode those figures come from (shared when recorded)
    cum_kl_curves()      accumulated KL over the steps, per (spec, mode), as a Curve: the mean over the runs still
                         generating at each step with how many they are (n), and the mean over every run with a
                         finished run carrying its final value forward (its end is the mean final cum_kl)
    first_divergences()  the first-divergence steps of the free-mode runs, per spec
    choice_rows()        multiple choice per spec beside the generation KL of the same spec
    choice_paired_rows() multiple choice per spec: flips, McNemar's p, bootstrap intervals (engine.results.paired, from
                         mc.parquet's rows: the same as OUT/mc_paired.parquet, for a run written before it too)
    choice_pair_rows()   multiple choice per pair of specs (OUT/mc_pairs.parquet's rows, likewise)

Numbers and rows only: the headings, formatting and charts are the face's (hierui.report.page, hierui.views.batch).
Steps are the tables' own 0-based indices (`step`, `first_divergence`); a face shows them counted from 1
(hierui.format.step_label). Torch is never imported: this reads files only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from engine.errors import HieruiError
from engine.record.summary import mean, percentile
from engine.results.localization import basis_mode

STEP_COLUMNS = ("run_id", "spec", "mode", "prompt_id", "step", "kl", "cum_kl")
# read where the table has them (a sweep recorded before them, or with --no-lens, has none): engine.results.localization
LOCALIZATION_COLUMNS = ("lens_kl", "top1_agree", "near_tie")


def median(values) -> float | None:
    return percentile(list(values), 50)


@dataclass
class RunData:
    path: Path
    manifest: dict
    summary: list[dict]
    steps: list[dict]
    mc: list[dict] = field(default_factory=list)
    mc_summary: list[dict] = field(default_factory=list)
    recipe: dict = field(default_factory=dict)  # name, description (OUT/recipe.toml from --recipe)
    attribution: list[dict] = field(default_factory=list)  # OUT/attribution.parquet (batch --attribute flips)
    specs: list[str] = field(default_factory=list)  # in sweep order

    @property
    def modes(self) -> list[str]:
        return list(dict.fromkeys(r["mode"] for r in self.summary))

    @property
    def prompt_count(self) -> int:
        """Distinct generation prompts."""
        return len({r.get("prompt_id") for r in self.summary})

    @property
    def item_count(self) -> int:
        """Distinct multiple-choice items."""
        return len({r.get("item_id") for r in self.mc})


# the columns each table must have for the readers here (every other declared column is optional, but typed)
REQUIRED = {
    "summary": ("run_id", "spec", "mode", "prompt_id"),
    "steps": STEP_COLUMNS,
    "mc": ("spec", "item_id"),
    "mc_summary": ("spec",),
    "mc_paired": ("spec",),
    "mc_pairs": ("spec_a", "spec_b"),
    "attribution": ("run_id", "spec", "step", "unit"),
}


def _check_table(file: Path, table, name: str) -> None:
    """One HieruiError line unless `table` has the schema engine.record.schema declares for `name`: the required
    columns present, every declared column of its declared type."""
    from engine.record.schema import TABLES, arrow_type

    declared = TABLES[name]
    missing = [c for c in REQUIRED[name] if c not in table.column_names]
    if missing:
        raise HieruiError(
            f"{file} is not a hierui {name} table (no column {', '.join(repr(c) for c in missing)}); "
            "rerun the sweep to rewrite it"
        )
    for column in table.schema:
        kind = declared.get(column.name)
        if kind is not None and column.type != arrow_type(kind) and str(column.type) != "null":  # null: all empty
            raise HieruiError(
                f"{file}: column '{column.name}' is {column.type}, expected {arrow_type(kind)} "
                "(engine/record/schema.py); rerun the sweep to rewrite it"
            )


def _check_manifest(file: Path, manifest: dict) -> None:
    """The manifest fields read here and by the faces: `specs` a list of strings, `model` a string."""
    from engine.record.validate import shown

    specs = manifest.get("specs")
    if specs is not None and not (isinstance(specs, list) and all(isinstance(s, str) for s in specs)):
        raise HieruiError(f"{file}: specs is {shown(specs)}, expected a list of strings")
    for name in ("model", "source"):
        value = manifest.get(name)
        if value is not None and not isinstance(value, str):
            raise HieruiError(f"{file}: {name} is {shown(value)}, expected a string")
    architecture = manifest.get("architecture")
    if architecture is not None and not isinstance(architecture, dict):
        raise HieruiError(f"{file}: architecture is {shown(architecture)}, expected an object")
    floor = manifest.get("noise_floor")
    if floor is not None:
        if not isinstance(floor, dict):
            raise HieruiError(f"{file}: noise_floor is {shown(floor)}, expected an object")
        for name in ("tie_margin", "flip_rate", "kl_mean", "kl_p99"):
            value = floor.get(name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise HieruiError(f"{file}: noise_floor.{name} is {shown(value)}, expected a number")
        cast = floor.get("cast")
        if cast is not None and not isinstance(cast, dict):
            raise HieruiError(f"{file}: noise_floor.cast is {shown(cast)}, expected an object")


def load_run(run_dir: str | Path) -> RunData:
    """Read a `hierui batch` output folder; a folder that is not one is a one-line HieruiError."""
    import pyarrow.parquet as pq

    path = Path(run_dir)
    if not path.exists():
        raise HieruiError(f"run folder not found: {path}")
    if not path.is_dir():
        raise HieruiError(f"{path} is not a folder: give the --out folder of a hierui batch run")
    missing = [n for n in ("batch.json", "summary.parquet", "steps.parquet") if not (path / n).is_file()]
    if missing:
        raise HieruiError(
            f"{path} is not a hierui batch output (no {' or '.join(missing)}): run hierui batch --out {path} first"
        )
    try:
        manifest = json.loads((path / "batch.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        raise HieruiError(f"{path / 'batch.json'} is unreadable") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "hierui-batch":
        raise HieruiError(f"{path / 'batch.json'} is not a hierui batch manifest")
    _check_manifest(path / "batch.json", manifest)

    def read(name: str, columns=None) -> list[dict]:
        file = path / name
        if not file.is_file():
            return []
        try:
            table = pq.read_table(file)
        except Exception as e:  # pyarrow raises several types for a damaged file
            raise HieruiError(f"{file} is unreadable ({type(e).__name__}); rerun the sweep to rewrite it") from None
        _check_table(file, table, name.removesuffix(".parquet"))
        if columns is not None:
            table = table.select([c for c in columns if c in table.column_names])
        return table.to_pylist()

    run = RunData(
        path,
        manifest,
        read("summary.parquet"),
        read("steps.parquet", STEP_COLUMNS + LOCALIZATION_COLUMNS),
        read("mc.parquet"),
        read("mc_summary.parquet"),
    )
    from engine.record.schema import TABLES

    if "attribution" in TABLES:
        run.attribution = read("attribution.parquet")
    recipe = path / "recipe.toml"
    if recipe.is_file():
        import tomllib

        try:
            data = tomllib.loads(recipe.read_text(encoding="utf-8"))
            run.recipe = {k: data[k] for k in ("name", "description") if isinstance(data.get(k), str)}
        except (OSError, ValueError):
            pass
    order = [str(s) for s in manifest.get("specs") or []]
    seen = order + [r.get("spec") for r in run.summary + run.mc_summary]
    run.specs = [s for s in dict.fromkeys(seen) if s]
    return run


def spec_rows(run: RunData) -> list[dict]:
    """One row per spec, in sweep order: means over runs of the per-run summaries.

    Similarities, KL, its estimate, amplification and top-1 agreement come from the basis mode's runs
    (shared when recorded); cum_kl_* are the mean final accumulated KL over runs per mode (Curve.final, the end
    of the carried curve); first_div is the median first-divergence step (0-based, as in the tables) of the
    free runs that diverged; mc_* come from mc_summary. kl_lo/kl_hi and top1_lo/top1_hi: the 95% bootstrap
    interval of the mean per-run KL and same-top-1 rate (engine.results.paired, prompts resampled, seed 0).
    """
    from engine.results.localization import flip_counts, recovery_counts
    from engine.results.paired import bootstrap_ci

    basis = basis_mode(run)
    mc = {r["spec"]: r for r in run.mc_summary}
    floor = run.manifest.get("noise_floor") or {}
    rows = []
    for spec in run.specs:
        mine = [r for r in run.summary if r.get("spec") == spec]
        base = [r for r in mine if r.get("mode") == basis]
        free = [r for r in mine if r.get("mode") == "free"]
        m = mc.get(spec, {})
        flips = flip_counts(base) or {}
        interval = {}
        for name, key in (("kl", "kl_mean"), ("top1", "same_top1_rate")):
            kept = [r for r in base if r.get(key) is not None]
            _, low, high = bootstrap_ci([r[key] for r in kept], groups=[r.get("prompt_id") for r in kept])
            interval[f"{name}_lo"], interval[f"{name}_hi"] = (low, high) if kept else (None, None)
        rows.append(
            {
                "spec": spec,
                "sparsity": mean(r.get("measured_sparsity") for r in mine),
                "layer_sparsity": layer_sparsity(mine),
                "runs": len(mine),
                "emb_cos": mean(r.get("emb_cos_final_mean") for r in base),
                "logit_cos": mean(r.get("logit_cos_mean") for r in base),
                "prob_cos": mean(r.get("prob_cos_mean") for r in base),
                "prob_cos_est": mean(r.get("prob_cos_est_mean") for r in base),
                "est_oor_rate": mean(r.get("prob_cos_est_oor_rate") for r in base),
                "kl": mean(r.get("kl_mean") for r in base),
                "kl_est": mean(r.get("kl_est_mean") for r in base),
                "tv": mean(r.get("tv_mean") for r in base),
                "amp": mean(r.get("amp_mean") for r in base),
                "top1": mean(r.get("same_top1_rate") for r in base),
                "cum_kl_shared": mean(r.get("cum_kl") for r in mine if r.get("mode") == "shared"),
                "cum_kl_free": mean(r.get("cum_kl") for r in free),
                "first_div": median(r.get("first_divergence") for r in free),
                "diverged": sum(r.get("first_divergence") is not None for r in free) if free else None,
                "free_runs": len(free),
                # flips (top-1 differs) per compared step, near ties among them, the noise floor's flip rate
                "flip_rate": flips.get("flip_rate"),
                "near_ties": flips.get("near_ties"),
                "floor_flip_rate": floor.get("flip_rate") if flips.get("compared") else None,
                # free runs with a counterfactual branch: the share that recovered
                "recovery_rate": recovery_counts(free)["rate"],
                "mc_items": m.get("items"),
                "mc_acc_d": m.get("acc_d"),
                "mc_acc_p": m.get("acc_p"),
                "mc_agree": m.get("agree_rate"),
                "mc_sub_kl": m.get("sub_kl_mean"),
                "mc_kl": m.get("kl_mean"),
                **interval,
            }
        )
    return rows


def layer_sparsity(rows: list[dict]) -> list | None:
    """The zero weights' fraction per decoder layer of the first of `rows` (summary or kld_summary rows; the
    same for every run of a spec) that recorded it, from its JSON column; None where none did."""
    for r in rows:
        value = r.get("layer_sparsity")
        if isinstance(value, str):
            value = json.loads(value)
        if isinstance(value, list) and value:
            return value
    return None


@dataclass
class Curve:
    """Accumulated KL over the steps of one (spec, mode), two honest means over its runs.

    A run is *generating* at a step while it has a record there that compares the two models (a `kl`): runs
    stop at different steps (end of sequence), so later steps hold fewer runs. `generating[i]` is the mean
    cum_kl over the `n[i]` runs still generating at `steps[i]`; `carried[i]` the mean over all `runs`, a run
    that stopped counting with its final cum_kl (it has accumulated all it will), so `carried[-1]` is the mean
    final cum_kl over runs, the figure of the tables (`final`). Steps are 0-based, as in the tables.
    """

    spec: str
    mode: str
    steps: list[int]
    generating: list[float]
    n: list[int]
    carried: list[float]
    runs: int

    @property
    def final(self) -> float | None:
        """Mean final cum_kl over the runs (= carried at the last step)."""
        return self.carried[-1] if self.carried else None

    @property
    def varies(self) -> bool:
        """Whether some run stopped before the last step (then the two means differ)."""
        return bool(self.n) and (self.n[0] != self.runs or self.n[-1] != self.runs)

    @property
    def lengths(self) -> tuple[int, int]:
        """(fewest, most) steps a run generated: the runs stop after that many tokens."""
        if not self.n:
            return (0, 0)
        return (sum(k == self.runs for k in self.n), len(self.steps))


def cum_kl_curves(run: RunData) -> dict[tuple[str, str], Curve]:
    """(spec, mode) → its Curve, in sweep order (shared before free)."""
    per_run: dict[tuple[str, str], dict[str, dict[int, float]]] = {}
    for s in run.steps:
        if s.get("cum_kl") is None or s.get("step") is None or s.get("spec") is None:
            continue
        if "kl" in s and s["kl"] is None:  # no comparison at this step: one model has ended
            continue
        key = (s["spec"], s.get("mode") or "")
        per_run.setdefault(key, {}).setdefault(s.get("run_id"), {})[int(s["step"])] = float(s["cum_kl"])
    order = {spec: i for i, spec in enumerate(run.specs)}
    keys = sorted(per_run, key=lambda k: (order.get(k[0], len(order)), k[1] != "shared", k[1]))
    curves = {}
    for key in keys:
        runs = list(per_run[key].values())
        steps = sorted({step for values in runs for step in values})
        generating, n, carried = [], [], []
        last = [None] * len(runs)  # each run's cum_kl at its latest step so far
        for step in steps:
            here = []
            for i, values in enumerate(runs):
                if step in values:
                    last[i] = values[step]
                    here.append(values[step])
            generating.append(sum(here) / len(here))
            n.append(len(here))
            seen = [v for v in last if v is not None]
            carried.append(sum(seen) / len(seen))
        curves[key] = Curve(key[0], key[1], steps, generating, n, carried, len(runs))
    return curves


def first_divergences(run: RunData) -> list[dict]:
    """Per spec with free-mode runs: the first-divergence steps of the runs that split, and how many did not."""
    out = []
    for spec in run.specs:
        free = [r for r in run.summary if r.get("spec") == spec and r.get("mode") == "free"]
        if not free:
            continue
        steps = sorted(int(r["first_divergence"]) for r in free if r.get("first_divergence") is not None)
        out.append(
            {
                "spec": spec,
                "runs": len(free),
                "steps": steps,
                "diverged": len(steps),
                "never": len(free) - len(steps),
                "median": median(steps),
                "min": steps[0] if steps else None,
                "max": steps[-1] if steps else None,
            }
        )
    return out


def choice_rows(run: RunData) -> list[dict]:
    """Per spec with multiple-choice results: accuracy dense/perturbed, agreement, subspace vs full KL at
    the answer position, beside the generation KL of the same spec."""
    gen = {r["spec"]: r for r in spec_rows(run)}
    rows = []
    for m in run.mc_summary:
        g = gen.get(m["spec"], {})
        rows.append(
            {
                "spec": m["spec"],
                "items": m.get("items"),
                "acc_d": m.get("acc_d"),
                "acc_p": m.get("acc_p"),
                "agree": m.get("agree_rate"),
                "sub_kl": m.get("sub_kl_mean"),
                "kl": m.get("kl_mean"),
                "gen_kl": g.get("kl"),
                "gen_top1": g.get("top1"),
                "gen_cum_kl": g.get("cum_kl_free") if g.get("cum_kl_free") is not None else g.get("cum_kl_shared"),
            }
        )
    order = {spec: i for i, spec in enumerate(run.specs)}
    return sorted(rows, key=lambda r: order.get(r["spec"], len(order)))


def choice_paired_rows(run: RunData) -> list[dict]:
    """Per spec with multiple-choice items, in sweep order: engine.results.paired.choice_spec_rows of mc.parquet."""
    from engine.results.paired import choice_spec_rows

    return choice_spec_rows(run.mc, run.specs) if run.mc else []


def choice_pair_rows(run: RunData) -> list[dict]:
    """Per pair of specs with multiple-choice items: engine.results.paired.choice_pair_rows of mc.parquet."""
    from engine.results.paired import choice_pair_rows as pairs

    return pairs(run.mc, run.specs) if run.mc else []
