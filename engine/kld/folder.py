"""A `hierui kld --out` folder: its manifest (kld.json), whether OUT can take a kld run, and the specs it already
holds (reused by a rerun instead of being scored again).

    kld.json    format hierui-kld, version, model (its name and model_key: the weights, ModelRef.cache_key), corpus
                (name and corpus_sha256), ctx, stride, device, dtype, base (the base file's path, None: the dense
                model ran), base_k (None: exact), calibration (spec → its calibration, as batch.json's; None: no
                spec calibrates), tokens ("llama.cpp": the stream begins with the BOS, a llama.cpp base file was
                read or written; else "hierui"), specs (scored there), allocations (spec → its layer allocation's
                details, where a spec has one: @auto's levels, bounds and predicted KLD), created

One run per folder, as `hierui batch`'s (engine.sweep.folder.check_out): a kld run whose model, text, window
(ctx, stride), device, dtype or base file differ from the folder's kld.json, or that calibrates a spec the folder
holds with other settings, is refused in one line naming what differs. The same run is allowed, and the specs
already in the tables are reused: only the others are scored, and the tables are written again for all of them
(the folder's specs first, then the new ones). A kld run into a batch folder (batch.json) is allowed when the
model and the calibration of every spec both calibrate are the batch's (engine.record.settings.
calibrations_differ): `hierui report` then shows both (docs/design.md, "Corpus KLD"). kld.json is written before
the tables (with every spec the tables will hold), so a run killed while writing them is resumed: a spec kld.json
names but the tables lack is scored again. The caller holds OUT's lock (engine.record.lock).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from engine.errors import HieruiError
from engine.kld.corpus import TOKEN_FIELDS, KldRun, SpecResult
from engine.record.paths import atomic_write
from engine.record.settings import calibrations_differ

MANIFEST = "kld.json"
FORMAT = "hierui-kld"
VERSION = 1
SUMMARY, TOKENS = "kld_summary.parquet", "kld_tokens.parquet"

# what makes two kld runs the same one, and how a refusal names each
COMPARED = {
    "model_key": "model",
    "corpus_sha256": "text",
    "ctx": "--ctx",
    "stride": "--stride",
    "device": "device",
    "dtype": "dtype",
    "base": "--base",
    "base_k": "the base file's K",
    "tokens": "the token stream (a llama.cpp base file's begins with the BOS)",
}
# what a kld.json of an earlier version, which lacks the key, ran with
COMPARED_DEFAULTS = {"tokens": "hierui"}


def manifest(
    model: str,
    corpus: str,
    corpus_sha256: str,
    ctx: int,
    stride: int | None,
    device: str,
    dtype: str,
    base: str | Path | None = None,
    base_k: int | None = None,
    calibration: dict | None = None,
    tokens: str = "hierui",
) -> dict:
    """kld.json of a run (its specs and creation time are added when written): `model` a --model name (resolved
    here, not loaded), `device` and `dtype` as given (auto resolved to what it picks), `calibration`
    (CalibSettings.to_dict) None when no spec calibrates, `tokens` "llama.cpp" where a llama.cpp base file is read or
    written (the token stream begins with the BOS), else "hierui"."""
    from engine.models.devices import pick_device, pick_dtype
    from engine.models.names import resolve
    from engine.run.floor import dtype_name

    ref = resolve(model)
    picked = pick_device(device)
    return {
        "format": FORMAT,
        "version": VERSION,
        "model": ref.name,
        "model_key": ref.cache_key(),
        "corpus": corpus,
        "corpus_sha256": corpus_sha256,
        "ctx": ctx,
        "stride": ctx if stride is None else stride,
        "device": picked.type,
        "dtype": dtype_name(pick_dtype(dtype, picked)),
        "base": str(Path(base).expanduser().resolve()) if base is not None else None,
        "base_k": base_k,
        "calibration": dict(calibration) if calibration else None,
        "tokens": tokens,  # "llama.cpp": a BOS first, as llama.cpp's base files hold them (engine.kld.llamacpp)
    }


def read_manifest(out: str | Path) -> dict | None:
    """OUT/kld.json, or None where there is none; an unreadable one is one line (exit 2)."""
    return read_format_file(Path(out) / MANIFEST, FORMAT, lambda old: isinstance(old.get("specs", []), list))


def read_format_file(path: Path, fmt: str, valid=lambda old: True) -> dict | None:
    """A run folder's JSON manifest (kld.json, sensitivity.json): None where there is none; one line (exit 2) where
    it is not readable JSON, not an object of format `fmt`, or not `valid`."""
    if not path.exists():
        return None
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        old = None
    if not isinstance(old, dict) or old.get("format") != fmt or not valid(old):
        raise HieruiError(f"{path} is not a readable {path.name}; use another --out")
    return old


def check_out(wanted: dict, out: str | Path) -> list[str]:
    """Check, writing nothing, that OUT can take the kld run `wanted` (manifest()): returns the specs OUT already
    holds for this same run (in its order; [] for a new folder). Refuses another kld run, naming what differs, a
    folder with kld tables but no kld.json, and a batch folder of another model or calibration."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise HieruiError(f"--out {out} is a file, not a folder")
    _check_batch(wanted, out)
    old = read_manifest(out)
    if old is None:
        if (out / SUMMARY).exists() or (out / TOKENS).exists():
            raise HieruiError(
                f"{out} holds kld tables but no {MANIFEST} (written by another version); use another --out"
            )
        return []
    differ = [label for key, label in COMPARED.items() if old.get(key, COMPARED_DEFAULTS.get(key)) != wanted.get(key)]
    differ += [
        f"the calibration of {spec}" for spec in calibrations_differ(old.get("calibration"), wanted["calibration"])
    ]
    if differ:
        raise HieruiError(
            f"{out} holds another kld run ({', '.join(differ)} differ{'s' * (len(differ) == 1)}): rerun it with "
            f"the same settings to add specs to it, or use another --out"
        )
    stored = stored_specs(out)
    return [s for s in old.get("specs", []) if s in stored]


def _check_batch(wanted: dict, out: Path) -> None:
    """A batch folder takes a kld run of the same model and (where both calibrate) the same calibration
    (engine.sweep.folder.other_run_differs, the rule a sweep into a kld folder meets too)."""
    from engine.sweep.folder import MANIFEST, other_run_differs

    differ = other_run_differs(out / MANIFEST, wanted["model_key"], wanted["calibration"])
    if differ:
        raise HieruiError(
            f"{out} holds a batch sweep of {' and '.join(differ)}: a kld run goes into a batch folder only with "
            f"the same model and calibration; use another --out"
        )


def stored_specs(out: str | Path) -> list[str]:
    """The specs whose rows are in both OUT/kld_summary.parquet and OUT/kld_tokens.parquet ([] where unreadable)."""
    import pyarrow.parquet as pq

    out = Path(out)
    try:
        summary = pq.read_table(out / SUMMARY, columns=["spec"]).column("spec").to_pylist()
        tokens = set(pq.read_table(out / TOKENS, columns=["spec"]).column("spec").unique().to_pylist())
    except (OSError, ValueError, KeyError):
        return []
    return [s for s in summary if s in tokens]


def load_results(out: str | Path, specs: list[str], run: KldRun) -> list[SpecResult]:
    """The stored SpecResults of `specs` (stored_specs) in OUT, checked against `run`'s scored positions; their
    per-token arrays as score() made them (float32 where the stored values are float32's)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    out = Path(out)
    summary = {row["spec"]: row for row in pq.read_table(out / SUMMARY).to_pylist()}
    tokens = pq.read_table(out / TOKENS)
    results = []
    for spec in specs:
        rows = tokens.filter(pc.equal(tokens.column("spec"), spec))
        pos = np.asarray(rows.column("pos").to_numpy())
        if not np.array_equal(pos, run.positions):
            raise HieruiError(f"{out / TOKENS}: the rows of {spec} are not this run's tokens; use another --out")
        arrays = {}
        for name in (*TOKEN_FIELDS, "top_d", "top_p"):
            arrays[name] = _as_scored(np.asarray(rows.column(name).to_numpy(zero_copy_only=False)))
        row = summary[spec]
        layers = json.loads(row["layer_sparsity"]) if row.get("layer_sparsity") else None  # a JSON column
        gguf = None
        if row.get("file_size") is not None:
            types = json.loads(row["quant_types"]) if row.get("quant_types") else None
            gguf = {"file_size": row["file_size"], "bits_per_weight": row.get("bits_per_weight"), "types": types}
        measured = row.get("measured_sparsity")
        results.append(SpecResult(spec, arrays, row.get("hidden_cos"), measured, layers, gguf=gguf))
    return results


def stored_noise_floor(out: str | Path) -> dict | None:
    """The noise floor the folder's summary was made with ({"kl_mean": …}), for a rerun that loads no model."""
    import pyarrow.parquet as pq

    try:
        values = pq.read_table(Path(out) / SUMMARY, columns=["noise_floor_kl"]).column(0).to_pylist()
    except (OSError, ValueError, KeyError):
        return None
    value = next((v for v in values if v is not None), None)
    return None if value is None else {"kl_mean": value}


def _as_scored(values: np.ndarray) -> np.ndarray:
    """A float64 column back to float32 where every value is a float32's (what the window metrics compute)."""
    if values.dtype == np.float64:
        narrow = values.astype(np.float32)
        if np.array_equal(narrow.astype(np.float64), values, equal_nan=True):
            return narrow
    return values


def write_manifest(out: str | Path, wanted: dict, specs: list[str], allocations: dict | None = None) -> None:
    """OUT/kld.json for the run `wanted` holding `specs` (the folder's earlier specs, then the new ones); the
    calibration of the folder's specs is kept beside this run's, and so are the layer allocations' details
    (`allocations`: {spec: PerturbReport.details["allocation"]}; @auto's measured levels and predicted KLD)."""
    out = Path(out)
    old = read_manifest(out) or {}
    calibration = {**(old.get("calibration") or {}), **(wanted.get("calibration") or {})}
    calibration = {spec: c for spec, c in calibration.items() if spec in specs}
    allocated = {**(old.get("allocations") or {}), **(allocations or {})}
    allocated = {spec: a for spec, a in allocated.items() if spec in specs}
    data = {**wanted, "calibration": calibration or None, "specs": list(specs)}
    if allocated:
        data["allocations"] = allocated
    data["created"] = old.get("created") or time.strftime("%Y-%m-%dT%H:%M:%S%z")
    atomic_write(out / MANIFEST, json.dumps(data, indent=1, ensure_ascii=False) + "\n")


def write_run(out: str | Path, wanted: dict, run: KldRun, tokenizer, stored: list[SpecResult] = ()) -> list[dict]:
    """The folder's specs `stored` (load_results) put before `run`'s, kld.json written for all of them, then the
    tables (engine.kld.corpus.write_tables); returns the summary rows."""
    from engine.kld.corpus import write_tables

    run.results[:0] = [r for r in stored if r.spec not in {x.spec for x in run.results}]
    allocations = {r.spec: r.allocation for r in run.results if r.allocation}
    write_manifest(out, wanted, [r.spec for r in run.results], allocations)
    return write_tables(run, out, tokenizer)


def recorded_calibration(run_dir: str | Path, spec: str, given: dict) -> dict | None:
    """The calibration ({source, samples, length, seed}) a kld output folder's kld.json records for `spec`, for
    `explore --from-kld` to open the same perturbed model the run scored; None where there is no kld.json (an
    older folder) or it records none for the spec. `given`: the calibration the user typed (None values: not
    given), which only confirms the record: a different value is refused (one line, exit 2), and so is a
    --calib where the run sampled its calibration itself; a calibration file the record names goes through
    engine.models.trust (used on its own only under $HIERUI_HOME, else when confirmed with --calib)."""
    from engine.models.trust import same, trusted
    from engine.record.validate import escape

    path = Path(run_dir).expanduser() / MANIFEST
    if not path.exists():
        return None
    where, named = escape(str(path)), escape(spec)
    try:
        records = json.loads(path.read_text(encoding="utf-8")).get("calibration") or {}
        record = next((v for k, v in records.items() if same(k, spec, "spec")), None)
        if record is None:
            return None
        record = {k: record[k] for k in ("source", "samples", "length", "seed")}
        if not all(type(record[k]) is int for k in ("samples", "length", "seed")):
            raise TypeError("the sizes and the seed are integers")
        if not isinstance(record["source"], (str, type(None))):
            raise TypeError("the source is a path or null")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise HieruiError(f"--from-kld {where}: not a readable kld.json") from None
    options = {"samples": "--calib-samples", "length": "--calib-len", "seed": "--calib-seed"}
    for key, option in options.items():
        if given.get(key) is not None and given[key] != record[key]:
            raise HieruiError(
                f"{option} {given[key]}: {where} records {named} calibrated with {option} {record[key]}, and "
                f"{option} only confirms it here: repeat it exactly or leave {option} out"
            )
    if given.get("source") is not None and record["source"] is None:
        raise HieruiError(
            f"--calib {escape(str(given['source']))}: {where} records {named} calibrated on text the model sampled "
            "itself, and --calib only confirms a calibration file the run names: leave --calib out"
        )
    mine = None if given.get("source") is None else str(given["source"])
    record["source"] = trusted(record["source"], mine, "calib", path, confirm_only=True)
    return record
