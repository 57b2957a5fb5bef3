"""A `hierui sensitivity --out` folder:

    sensitivity.json       format hierui-sensitivity, version, model (name, model_key), spec, levels, unit, corpus
                           (name, corpus_sha256), ctx, stride, device, dtype, calibration (per level that calibrates,
                           as kld.json's), created
    sensitivity_rows.jsonl one row per finished (unit, level), appended whole and flushed as it finishes
                           (engine.record.paths.append_whole), so Ctrl-C loses only the layer in flight
    sensitivity.parquet    the table (engine.record.schema.SENSITIVITY), levels × units in the run's order,
    sensitivity.csv        written at the end from the rows

One run per folder, as `hierui kld`'s (engine.kld.folder): a run whose model, spec, levels, unit, text, window,
device, dtype or calibration differ from sensitivity.json is refused in one line naming what differs; the same run
reuses the rows already there (a rerun skips them and writes the same table). The caller holds OUT's lock."""

from __future__ import annotations

import json
import time
from pathlib import Path

from engine.errors import HieruiError
from engine.record.paths import append_whole, atomic_write

MANIFEST = "sensitivity.json"
ROWS = "sensitivity_rows.jsonl"
TABLE = "sensitivity.parquet"
CSV = "sensitivity.csv"
FORMAT = "hierui-sensitivity"
VERSION = 1

# what makes two runs the same one, and how a refusal names each
COMPARED = {
    "model_key": "model",
    "spec": "--prune",
    "levels": "--sparsities",
    "unit": "--unit",
    "corpus_sha256": "text",
    "ctx": "--ctx",
    "stride": "--stride",
    "device": "device",
    "dtype": "dtype",
    "calibration": "calibration",
}


def manifest(
    model: str,
    spec,
    levels,
    unit: str,
    corpus: str,
    corpus_sha256: str,
    ctx: int,
    stride,
    device: str,
    dtype: str,
    calibration: dict | None,
) -> dict:
    """sensitivity.json of a run (its creation time is added when written); the model, device and dtype resolved
    as engine.kld.folder.manifest does."""
    from engine.kld.folder import manifest as kld_manifest

    base = kld_manifest(model, corpus, corpus_sha256, ctx, stride, device, dtype, calibration=calibration)
    keep = ("model", "model_key", "corpus", "corpus_sha256", "ctx", "stride", "device", "dtype", "calibration")
    out = {"format": FORMAT, "version": VERSION, **{k: base[k] for k in keep}}
    out.update(spec=str(spec), levels=[str(level) for level in levels], unit=unit)
    return out


def read_manifest(out: str | Path) -> dict | None:
    """OUT/sensitivity.json, or None where there is none; an unreadable one is one line (exit 2)."""
    from engine.kld.folder import read_format_file

    return read_format_file(Path(out) / MANIFEST, FORMAT)


def check_out(wanted: dict, out: str | Path) -> set[tuple[str, str]]:
    """Check, writing nothing, that OUT can take the run `wanted` (manifest()): the (unit, level) rows it holds for
    this same run (empty for a new folder). Another sensitivity run is refused naming what differs; so is a folder
    holding rows but no sensitivity.json."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise HieruiError(f"--out {out} is a file, not a folder")
    old = read_manifest(out)
    if old is None:
        if (out / ROWS).exists() or (out / TABLE).exists():
            raise HieruiError(f"{out} holds sensitivity rows but no {MANIFEST}; use another --out")
        return set()
    differ = [label for key, label in COMPARED.items() if old.get(key) != wanted.get(key)]
    if differ:
        raise HieruiError(
            f"{out} holds another sensitivity run ({', '.join(differ)} differ{'s' * (len(differ) == 1)}): rerun it "
            "with the same settings to resume it, or use another --out"
        )
    return {(row["unit"], row["level"]) for row in read_rows(out)}


def write_manifest(out: str | Path, wanted: dict) -> None:
    out = Path(out)
    old = read_manifest(out) or {}
    data = {**wanted, "created": old.get("created") or time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    atomic_write(out / MANIFEST, json.dumps(data, indent=1, ensure_ascii=False) + "\n")


def read_rows(out: str | Path) -> list[dict]:
    """The rows OUT/sensitivity_rows.jsonl holds (a last line cut short by a crash is left out)."""
    path = Path(out) / ROWS
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and "unit" in row and "level" in row:
            rows.append(row)
    return rows


def append_row(out: str | Path, row: dict) -> None:
    """One finished row, appended whole and flushed to the disk."""
    append_whole(Path(out) / ROWS, json.dumps(row, ensure_ascii=False) + "\n")


def ordered(rows: list[dict], levels, units) -> list[dict]:
    """The rows of the run's levels × units, in that order (the last row of a (unit, level) appended twice wins)."""
    by_key = {(row["unit"], row["level"]): row for row in rows}
    return [by_key[(u.name, str(level))] for level in levels for u in units if (u.name, str(level)) in by_key]


def write_tables(out: str | Path, rows: list[dict]) -> None:
    """OUT/sensitivity.parquet and .csv of `rows` (ordered())."""
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    from engine.record import schema

    table = schema.to_table(rows, schema.SENSITIVITY, TABLE)
    out = Path(out)
    atomic_write(out / TABLE, lambda path: pq.write_table(table, str(path)))
    atomic_write(out / CSV, lambda path: pcsv.write_csv(table, str(path)))


def read_table(out: str | Path) -> list[dict]:
    """OUT/sensitivity.parquet's rows ([] where there is none)."""
    import pyarrow.parquet as pq

    path = Path(out) / TABLE
    if not path.exists():
        return []
    return pq.read_table(path).to_pylist()
