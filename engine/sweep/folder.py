"""A sweep's output folder: where each run's session and the multiple-choice rows go, which are complete, the
manifest (batch.json) and whether OUT can take a sweep (a resume of the same one, or a new folder)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from engine.errors import HieruiError
from engine.perturb.spec import Spec
from engine.record.paths import atomic_write
from engine.record.session import Session, load_session
from engine.sweep.sweeps import Run, Sweep

MANIFEST = "batch.json"


def default_out_dir(root: str | Path = "runs") -> Path:
    return Path(root) / time.strftime("%Y%m%d-%H%M%S")


def session_path(out: str | Path, run: Run) -> Path:
    return Path(out) / "sessions" / f"{run.run_id}.jsonl"


def choices_path(out: str | Path, spec: Spec) -> Path:
    return Path(out) / "mc" / f"{spec.slug}.jsonl"


def load_complete(path: Path) -> Session | None:
    """The session at `path` if it is there and complete (has its closing summary), else None."""
    try:
        session = load_session(path)
    except HieruiError:
        return None
    return session if session.complete else None


def complete_runs(sweep: Sweep, out: str | Path) -> list[str]:
    """The ids of the runs of `sweep` whose session in `out` is complete."""
    return [r.run_id for r in sweep.runs() if load_complete(session_path(out, r)) is not None]


def choices_complete(sweep: Sweep, out: str | Path, spec: Spec) -> bool:
    """Whether OUT/mc/<spec>.jsonl holds a row for every multiple-choice item of `sweep`, in order."""
    path = choices_path(out, spec)
    if not path.is_file():
        return False
    try:
        done = [json.loads(line)["item_id"] for line in path.read_text(encoding="utf-8").splitlines() if line]
    except (OSError, ValueError, KeyError):
        return False
    return done == [p.id for p in sweep.choice_items]


def check_out(sweep: Sweep, out: str | Path) -> bool:
    """Check that OUT can take `sweep` without writing anything: True when OUT/batch.json is there and
    describes this same sweep (a resume), False when there is none yet. Another sweep is refused."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise HieruiError(f"--out {out} is a file, not a folder")
    manifest = json.loads(json.dumps(sweep.manifest()))
    _check_kld(manifest, out)
    target = out / MANIFEST
    if target.exists():
        try:
            old = json.loads(target.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise HieruiError(f"{target} is unreadable; use another --out") from None
        ignore = {"source", "created", "architecture", "attribute", "noise_floor", "plan"}
        if isinstance(old.get("settings"), dict):  # the lens as its word (a manifest from before the modes)
            old["settings"] = {**old["settings"], "lens": _lens_of(old["settings"])}
        differ = [k for k in sorted(set(old) | set(manifest)) if k not in ignore and old.get(k) != manifest.get(k)]
        if not differ and old.get("attribute", "none") != sweep.attribute and sweep.attribute == "none":
            # turning attribution on over a sweep recorded without it adds it to every run; turning it off would
            # leave attribution.parquet describing some runs only
            raise HieruiError(
                f"{out} was recorded with --attribute {old.get('attribute')}: rerun it with the same option to "
                f"resume it, or use another --out"
            )
        if differ:
            raise HieruiError(
                f"{out} holds another sweep ({', '.join(differ)} differ): rerun it with the same "
                f"settings to resume it, or use another --out"
            )
        return True
    if (out / "sessions").is_dir() and any((out / "sessions").iterdir()):
        raise HieruiError(f"{out} holds sessions but no {MANIFEST}; use another --out")
    return False


def _lens_of(settings: dict) -> str | None:
    """The lens mode batch.json's settings record (engine.record.settings.recorded_lens); None: not a mode."""
    from engine.record.settings import recorded_lens

    try:
        return recorded_lens(settings.get("lens"), "lens" in settings)
    except HieruiError:
        return None


def recorded_sweep_lens(out: str | Path) -> str | None:
    """The lens mode of the sweep recorded in OUT (its batch.json), so that a resume without --lens keeps it;
    None where OUT holds no readable manifest."""
    try:
        old = json.loads((Path(out) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    settings = old.get("settings") if isinstance(old, dict) else None
    return _lens_of(settings) if isinstance(settings, dict) else None


KLD_MANIFEST = "kld.json"  # engine.kld.folder.MANIFEST (that layer sits above this one)


def other_run_differs(path: Path, model_key: str | None, calibration: dict | None) -> list[str]:
    """What keeps a run of `model_key` with `calibration` (spec → settings, engine.record.settings.calibrations)
    out of a folder that holds the other command's run, whose manifest is `path` (batch.json for a kld run, kld.json
    for a sweep): "another model (M)" and "another calibration of S" for every spec both calibrate differently;
    [] where there is no such manifest. One rule for both directions; an unreadable manifest is one line."""
    from engine.record.settings import calibrations_differ

    if not path.is_file():
        return []
    try:
        other = json.loads(path.read_text(encoding="utf-8"))
        model, recorded = other["model"], other.get("calibration")
        if not isinstance(recorded, (dict, type(None))):
            raise TypeError("calibration is a mapping")
        key = other["model_key"] if "model_key" in other else _model_key(model)
    except (OSError, ValueError, KeyError, TypeError):
        raise HieruiError(f"{path} is unreadable; use another --out") from None
    differ = [] if key == model_key else [f"another model ({model})"]
    return differ + [f"another calibration of {spec}" for spec in calibrations_differ(recorded, calibration)]


def _model_key(name) -> str | None:
    """The cache key of the model a manifest names (None: a name this hierui does not resolve)."""
    from engine.models.names import resolve

    try:
        return resolve(str(name)).cache_key()
    except HieruiError:
        return None


def _check_kld(manifest: dict, out: Path) -> None:
    """A folder holding a `hierui kld` run takes a sweep of the same model and, for every spec both calibrate,
    the same calibration (the rule engine.kld.folder applies the other way round); else one line."""
    differ = other_run_differs(out / KLD_MANIFEST, _model_key(manifest["model"]), manifest["calibration"])
    if differ:
        raise HieruiError(
            f"{out} holds a kld run of {' and '.join(differ)}: a sweep goes into a kld folder only with the same "
            f"model and calibration; use another --out"
        )


def noise_floor(model_name: str, model) -> dict | None:
    """What `hierui noise` measured for the dense model on its device in its dtype (engine.run.floor.floor_summary,
    and the cast to another dtype as a reference: `cast`), or None where it was not run."""
    from engine.run.floor import dtype_name, floor_summary, load_floor

    weight = model.get_input_embeddings().weight
    dtype = dtype_name(weight.dtype)
    try:
        floor = load_floor(model_name, weight.device.type)
    except HieruiError:
        return None
    if floor is None:
        return None
    out = floor_summary(floor, dtype)
    cast = [c for c in floor.get("comparisons", []) if c.get("kind") == "dtype"]
    if cast:
        out["cast"] = {k: cast[0].get(k) for k in ("name", "kl_mean", "flip_rate")}
    out["dtype"] = dtype
    return out


def write_manifest(sweep: Sweep, out: str | Path, architecture: dict | None = None, floor: dict | None = None) -> None:
    """Write OUT/batch.json and the sweep's `files` (once the sweep has really started: model loaded, choices
    checked)."""
    out = Path(out)
    if (out / MANIFEST).exists():
        return
    manifest = json.loads(json.dumps(sweep.manifest()))
    out.mkdir(parents=True, exist_ok=True)
    for name, text in sweep.files.items():
        if not (out / name).is_file():
            atomic_write(out / name, text)
    manifest["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    if architecture:  # engine.record.architecture.describe of the loaded model (not compared on resume)
        manifest["architecture"] = architecture
    if floor:  # the dense model's noise floor (`hierui noise`) when measured: the report shows it (not compared)
        manifest["noise_floor"] = floor
    if getattr(sweep, "plan", None):  # engine.run.plan's estimate, made before loading (not compared)
        manifest["plan"] = sweep.plan
    atomic_write(out / MANIFEST, json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
