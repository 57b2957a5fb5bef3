"""The versioned on-disk caches: pruned weights, drop scores and calibration batches.

An entry's key hashes what it was made from (model, dtype, spec, calibration) together with the version
of the algorithm that made it and the hierui version (`engine.__version__`). Each algorithm has an
`ALGORITHM_VERSION`, bumped whenever its output changes, a constant of a module that imports no torch:

    magnitude, wanda, sparsegpt    engine/record/methods/<method>.py (the method's declaration: Method.algorithm)
    similarity (drop scores)       engine/record/methods/drop.py
    calibration                    engine/perturb/calibration.py

So after an upgrade that changes an algorithm (or any upgrade of hierui), old entries are never looked
up again; `hierui cache` lists them as stale and `hierui cache clear --stale` removes them.

Layout (folders from engine.record.paths): each data file has its metadata beside it, `<name>.meta.json`:

    pruned/<key>.safetensors              kind "pruned": the tensors pruning changed
    pruned/<key>-similarity.json          kind "scores": drop (similarity) scores
    calib/<key>.pt                        kind "calib":  calibration token ids

    meta: kind, key, model, model_key, spec, dtype, calibration, algorithm, algorithm_version,
          hierui_version, created (UTC, ISO 8601), size (bytes of the data file)

Torch-free: listing and clearing never import torch (the modules holding the versions import none).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import importlib
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from engine.errors import HieruiError
from engine.record.methods import methods
from engine.record.paths import WriteFailed, atomic_write, calib_dir, is_temporary, pruned_dir

# kind -> (folder, the data file's name after the key)
KINDS: dict[str, tuple[Callable[[], Path], str]] = {
    "pruned": (pruned_dir, ".safetensors"),
    "scores": (pruned_dir, "-similarity.json"),
    "calib": (calib_dir, ".pt"),
}
META_SUFFIX = ".meta.json"

# the calibration batches' algorithm; the methods' are declared in the registry (engine.record.methods)
CALIBRATION = ("calibration", "engine.perturb.calibration")

LEFTOVER_SECONDS = 3600  # a temporary file older than this is a crashed writer's leftover


def hierui_version() -> str:
    import engine

    return engine.__version__


def algorithms() -> dict[str, str]:
    """algorithm -> the module holding its ALGORITHM_VERSION: every registered method that caches results
    (Method.algorithm, engine.record.methods), and the calibration."""
    found = {m.algorithm: m.declared_in for m in methods() if m.algorithm and m.declared_in}
    return {**found, CALIBRATION[0]: CALIBRATION[1]}


def algorithm_version(algorithm: str) -> int | None:
    """The current ALGORITHM_VERSION of `algorithm` (None if unknown), read from a module that imports no torch."""
    name = algorithms().get(algorithm)
    if name is None:
        return None
    return getattr(importlib.import_module(name), "ALGORITHM_VERSION", None)


def check_kind(kind: str | None) -> str | None:
    if kind is not None and kind not in KINDS:
        raise HieruiError(f"unknown cache kind '{kind}': use {', '.join(KINDS)}")
    return kind


# ------------------------------------------------------------------ writing and finding one entry


@dataclass(frozen=True)
class Slot:
    """Where one cache entry lives (whether or not it exists yet) and the metadata it is stored with."""

    kind: str
    key: str
    meta: dict

    @property
    def path(self) -> Path:
        folder, tail = KINDS[self.kind]
        return folder() / f"{self.key}{tail}"

    @property
    def meta_path(self) -> Path:
        return meta_path_for(self.path)

    def store(self, data) -> Path | None:
        """Write the data (text, bytes or a function writing a file at the path it gets), then its metadata.
        A cache is only a shortcut: where it cannot be written (a full disk, a read-only $HIERUI_HOME) the run
        goes on without it, saying so in one line on stderr (None), and no half entry is left."""
        try:
            atomic_write(self.path, data)
            meta = {
                **self.meta,
                "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
                "size": self.path.stat().st_size,
            }
            atomic_write(self.meta_path, json.dumps(meta, indent=1, default=str))
        except WriteFailed as e:
            try:
                self.path.unlink(missing_ok=True)  # an entry without its metadata is never looked up; removed anyway
            except OSError:  # its folder is not one (a file where it should be): nothing was written there
                pass
            print(f"warning: {e}; going on without caching it", file=sys.stderr, flush=True)
            return None
        return self.path


def slot(kind: str, algorithm: str, identity: dict, info: dict | None = None) -> Slot:
    """The entry of `kind` made by `algorithm` from `identity` (model_key, spec, calibration, ...) at the
    current algorithm and hierui versions. `info` is stored in the metadata but not part of the key."""
    check_kind(kind)
    version = algorithm_version(algorithm)
    ident = {
        "kind": kind,
        **identity,
        "algorithm": algorithm,
        "algorithm_version": version,
        "hierui_version": hierui_version(),
    }
    key = hashlib.sha1(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:20]
    return Slot(kind, key, {"kind": kind, "key": key, **(info or {}), **ident})


def meta_path_for(data: Path) -> Path:
    name = data.name
    for tail in (".safetensors", ".json", ".pt"):
        if name.endswith(tail):
            name = name[: -len(tail)]
            break
    return data.with_name(name + META_SUFFIX)


# ------------------------------------------------------------------ listing and clearing


@dataclass
class Entry:
    """One cache entry found on disk."""

    kind: str
    path: Path
    meta: dict | None
    size: int  # bytes of the data file
    created: float  # epoch seconds
    stale: bool
    why: str = ""  # why it is stale

    @property
    def model(self) -> str:
        m = self.meta or {}
        return str(m.get("model") or m.get("model_key") or "?")

    @property
    def spec(self) -> str:
        m = self.meta or {}
        if self.kind == "calib":
            c = m.get("calibration") or {}
            if not c:
                return "?"
            source = "self" if c.get("source") == "self" else "file"
            return f"{source} {c.get('samples')}×{c.get('length')} s{c.get('seed')}"
        if self.kind == "scores":
            return "similarity"
        return str(m.get("spec") or "?")

    @property
    def versions(self) -> str:
        """The algorithm's version (the algorithm is the spec's method) and hierui's: "v1 · 0.1.0"."""
        if not self.meta:
            return "?"
        return f"v{self.meta.get('algorithm_version')} · {self.meta.get('hierui_version')}"

    def age(self, now: float | None = None) -> float:
        return max(0.0, (now or time.time()) - self.created)


def entries(kind: str | None = None) -> list[Entry]:
    """Every cache entry (of `kind`), oldest first, each marked stale when another algorithm or hierui
    version made it, or when it has no readable metadata (made before the caches were versioned)."""
    check_kind(kind)
    found = []
    for k, path in _data_files(kind):
        meta, why = _read_meta(meta_path_for(path))
        stale, reason = (True, why) if meta is None else _staleness(meta)
        found.append(Entry(k, path, meta, path.stat().st_size, _created(meta, path), stale, reason))
    return sorted(found, key=lambda e: (e.created, str(e.path)))


def clear(kind: str | None = None, stale_only: bool = False) -> list[Entry]:
    """Remove the entries (of `kind`; only the stale ones with `stale_only`), with their metadata, plus
    metadata whose data is gone and temporary files left by crashed writers. Returns the entries removed."""
    removed = [e for e in entries(kind) if e.stale or not stale_only]
    for e in removed:
        e.path.unlink(missing_ok=True)
        meta_path_for(e.path).unlink(missing_ok=True)
    folders = {KINDS[k][0]() for k in ([kind] if kind else KINDS)}
    now = time.time()
    for folder in folders:
        if not folder.is_dir():
            continue
        for f in folder.iterdir():
            if f.name.endswith(META_SUFFIX) and not _has_data(f) and (kind is None or _meta_kind(f) == kind):
                f.unlink(missing_ok=True)
            elif is_temporary(f) and f.is_file() and now - f.stat().st_mtime > LEFTOVER_SECONDS:
                f.unlink(missing_ok=True)
    return removed


def _data_files(kind: str | None):
    for k, (folder, tail) in KINDS.items():
        if kind not in (None, k):
            continue
        d = folder()
        if not d.is_dir():
            continue
        for f in sorted(d.iterdir()):
            if f.is_file() and not f.name.startswith(".") and f.name.endswith(tail):
                yield k, f


def _has_data(meta: Path) -> bool:
    stem = meta.name[: -len(META_SUFFIX)]
    return any((meta.parent / f"{stem}{ext}").is_file() for ext in (".safetensors", ".json", ".pt"))


def _meta_kind(meta: Path) -> str | None:
    data, _ = _read_meta(meta)
    return (data or {}).get("kind")


def _read_meta(path: Path) -> tuple[dict | None, str]:
    if not path.is_file():
        return None, "no metadata (made before versioned caches)"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, "unreadable metadata"
    return (meta, "") if isinstance(meta, dict) else (None, "unreadable metadata")


def _staleness(meta: dict) -> tuple[bool, str]:
    algorithm = meta.get("algorithm")
    current = algorithm_version(algorithm) if algorithm else None
    if current is None:
        return True, f"unknown algorithm {algorithm!r}"
    if meta.get("algorithm_version") != current:
        return True, f"{algorithm} v{meta.get('algorithm_version')}, now v{current}"
    if meta.get("hierui_version") != hierui_version():
        return True, f"hierui {meta.get('hierui_version')}, now {hierui_version()}"
    return False, ""


def _created(meta: dict | None, path: Path) -> float:
    try:
        return _dt.datetime.fromisoformat(str((meta or {})["created"])).timestamp()
    except (KeyError, ValueError):
        return path.stat().st_mtime
