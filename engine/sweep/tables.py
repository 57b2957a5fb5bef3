"""The tables of a sweep: read back from its session and multiple-choice files, written whole, averaged per group.

    steps        OUT/steps.parquet: a row per step per run (per-layer metrics as list columns, top-k lists as
                 JSON text), sorted by run_id, step.
    summary      OUT/summary.parquet and OUT/summary.csv: a row per run, engine.record.summary.summarize of its
                 steps (and the counterfactual branch's fields of its closing line), sorted by run_id.
    mc           OUT/mc.parquet (an item per spec per row) and OUT/mc_summary.parquet/.csv (a row per spec),
                 when the sweep has multiple-choice items; from mc.parquet's rows (engine.results.paired, seed 0),
                 OUT/mc_paired.parquet/.csv (per spec: flips, McNemar's p, bootstrap intervals) and
                 OUT/mc_pairs.parquet/.csv (per pair of specs: accuracy and KL differences).
    attribution  OUT/attribution.parquet: a row per run × flip step × unit (engine.run.attribution), when the sweep
                 attributes its flips (batch --attribute flips), sorted by run_id, step.

Every table has the columns and types of engine.record.schema, whatever the sweep held. The tables are built from
the files, never from memory, so a resumed and an uninterrupted sweep give equal tables. group_summary()
averages the key summary fields per (spec, mode) for the printed table.
"""

from __future__ import annotations

import json
from pathlib import Path

from engine.errors import HieruiError
from engine.record import schema
from engine.record.branches import BRANCH_SUMMARY
from engine.record.paths import atomic_write
from engine.record.session import Session
from engine.sweep.folder import choices_complete, choices_path, load_complete, session_path
from engine.sweep.sweeps import Run, Sweep

# the summary fields averaged per (spec, mode) in the printed table, with their headings
GROUP_FIELDS = {
    "kl_mean": "KL",
    "kl_p99": "KL p99",
    "tv_mean": "TV",
    "same_top1_rate": "top-1",
    "emb_cos_final_mean": "emb cos",
    "logit_cos_mean": "logit cos",
    "prob_cos_mean": "prob cos",
    "amp_mean": "amp",
    "first_divergence": "1st div",
    "ln_ppl_ratio": "ln ppl",
    "sub_kl_mean": "sub KL",
}


def _sessions(sweep: Sweep, out: Path) -> list[tuple[Run, Session]]:
    found, missing = [], []
    for run in sorted(sweep.runs(), key=lambda r: r.run_id):
        session = load_complete(session_path(out, run))
        (missing.append(run.run_id) if session is None else found.append((run, session)))
    if missing:
        raise HieruiError(f"{len(missing)} runs are not complete in {out} (e.g. {missing[0]}); rerun the sweep")
    return found


def build_tables(sweep: Sweep, out: str | Path):
    """(steps, summary) as pyarrow tables, read back from the session files of every run of `sweep`."""
    from engine.record.summary import summarize

    steps, summary = [], []
    for run, session in _sessions(sweep, Path(out)):
        ident = {"run_id": run.run_id, "spec": str(run.spec), "mode": run.mode, "prompt_id": run.prompt.id}
        for record in session.steps:
            steps.append({**ident, **record})
        summary.append(
            {
                **ident,
                "prompt": run.prompt.prompt,
                "choices": run.prompt.choices or None,
                "model": sweep.model,
                "measured_sparsity": session.header.perturbation.measured_sparsity,
                "layer_sparsity": (session.header.perturbation.details or {}).get("layer_sparsity"),
                **summarize(session.steps, run.mode),
                # the counterfactual branch's fields, from the closing line (engine.run.branch)
                **{k: v for k, v in (session.summary or {}).items() if k in BRANCH_SUMMARY},
            }
        )
    return (
        schema.to_table(steps, schema.STEPS, "steps.parquet"),
        schema.to_table(summary, schema.SUMMARY, "summary.parquet"),
    )


def write_tables(sweep: Sweep, out: str | Path) -> list[dict]:
    """Write OUT/steps.parquet, OUT/summary.parquet and OUT/summary.csv; return the summary rows."""
    out = Path(out)
    steps, summary = build_tables(sweep, out)
    _write_whole(out, "steps", steps, "summary", summary)
    return summary.to_pylist()


def _write_whole(out: Path, rows_name: str, rows, summary_name: str, summary) -> None:
    """OUT/<rows_name>.parquet, OUT/<summary_name>.parquet and .csv, each written whole or not at all."""
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    atomic_write(out / f"{rows_name}.parquet", lambda path: pq.write_table(rows, str(path)))
    atomic_write(out / f"{summary_name}.parquet", lambda path: pq.write_table(summary, str(path)))
    atomic_write(out / f"{summary_name}.csv", lambda path: pcsv.write_csv(summary, str(path)))


def build_choice_tables(sweep: Sweep, out: str | Path):
    """(items, summary) as pyarrow tables, read back from OUT/mc/<spec>.jsonl of every spec of `sweep`."""
    from engine.run.choice import summarize_items

    out = Path(out)
    items, summary = [], []
    for spec in sweep.specs:
        if not choices_complete(sweep, out, spec):
            raise HieruiError(f"the multiple-choice items of {spec} are not complete in {out}; rerun the sweep")
        rows = [json.loads(line) for line in choices_path(out, spec).read_text(encoding="utf-8").splitlines() if line]
        items += rows
        summary.append({"spec": str(spec), **summarize_items(rows)})
    return (
        schema.to_table(items, schema.CHOICES, "mc.parquet"),
        schema.to_table(summary, schema.CHOICE_SUMMARY, "mc_summary.parquet"),
    )


def write_choice_tables(sweep: Sweep, out: str | Path) -> list[dict]:
    """OUT/mc.parquet, OUT/mc_summary, OUT/mc_paired and OUT/mc_pairs (.parquet/.csv) when the sweep has
    multiple-choice items; returns mc_summary's rows (none without items)."""
    if not sweep.choice_items:
        return []
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    from engine.results.paired import choice_pair_rows, choice_spec_rows

    out = Path(out)
    items, summary = build_choice_tables(sweep, out)
    _write_whole(out, "mc", items, "mc_summary", summary)
    rows, specs = items.to_pylist(), [str(s) for s in sweep.specs]
    for name, found in (("mc_paired", choice_spec_rows(rows, specs)), ("mc_pairs", choice_pair_rows(rows, specs))):
        table = schema.to_table(found, schema.TABLES[name], f"{name}.parquet")
        atomic_write(out / f"{name}.parquet", lambda path, t=table: pq.write_table(t, str(path)))
        atomic_write(out / f"{name}.csv", lambda path, t=table: pcsv.write_csv(t, str(path)))
    return summary.to_pylist()


def build_attribution_table(sweep: Sweep, out: str | Path):
    """OUT/attribution.parquet's table, read back from OUT/attribution/<run_id>.jsonl of every run of `sweep`:
    sorted by run_id, step, then the order each step's units were written in."""
    from engine.run.attribution import attribution_complete, read_run

    out = Path(out)
    rows = []
    for run in sorted(sweep.runs(), key=lambda r: r.run_id):
        if not attribution_complete(out, run):
            raise HieruiError(f"the attribution of run {run.run_id} is not complete in {out}; rerun the sweep")
        found = read_run(out, run)
        rows += sorted(found, key=lambda r: r["step"])  # stable: each step's units stay in order
    return schema.to_table(rows, schema.ATTRIBUTION, "attribution.parquet")


def write_attribution_table(sweep: Sweep, out: str | Path) -> int | None:
    """OUT/attribution.parquet when the sweep attributes its flips (batch --attribute flips); returns its number
    of rows (None: not attributed)."""
    import pyarrow.parquet as pq

    if getattr(sweep, "attribute", "none") != "flips":
        return None
    out = Path(out)
    table = build_attribution_table(sweep, out)
    atomic_write(out / "attribution.parquet", lambda path: pq.write_table(table, str(path)))
    return table.num_rows


def group_summary(sweep: Sweep, rows: list[dict]) -> list[dict]:
    """Per (spec, mode), in sweep order: the number of runs and the mean over runs of GROUP_FIELDS."""
    groups = []
    for spec in sweep.specs:
        for mode in sweep.modes:
            members = [r for r in rows if r["spec"] == str(spec) and r["mode"] == mode]
            entry = {"spec": str(spec), "mode": mode, "runs": len(members)}
            for name in GROUP_FIELDS:
                vals = [r.get(name) for r in members if r.get(name) is not None]
                entry[name] = sum(vals) / len(vals) if vals else None
            groups.append(entry)
    return groups
