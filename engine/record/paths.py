"""Where hierui keeps things on disk ($HIERUI_HOME and its cache layout), and the one way files are written whole.

    $HIERUI_HOME (default ~/.cache/hierui)
        models/     converted models (the embedded default, GGUF conversions); $HIERUI_MODELS moves it
        calib/      calibration token batches              <key>.pt            + <key>.meta.json
        pruned/     pruned weights                         <key>.safetensors   + <key>.meta.json
                    drop (similarity) scores               <key>-similarity.json + <key>-similarity.meta.json
        noise/      numerical noise floors (`hierui noise`) <model key>-<device type>.json (engine.run.floor)
        sessions/   the explorer's session files (the default of explore --sessions)

Every module takes these folders from here. The cache entries and their metadata are managed by
engine.perturb.cache.

`atomic_write` is the only way a cache entry or a table is written: into a uniquely named temporary file
in the target's own folder, then `os.replace`d onto the target, so a reader sees the old file or the new
one, never half of one, and two processes writing the same target never share a temporary file.
`atomic_dir` does the same for a whole folder (a converted model).
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

TEMP_SUFFIXES = (".tmp", ".partial")


def hierui_home() -> Path:
    return Path(os.environ.get("HIERUI_HOME") or Path.home() / ".cache" / "hierui")


def models_dir() -> Path:
    """Converted models: $HIERUI_MODELS when set (a model store shared between homes), else $HIERUI_HOME/models."""
    override = os.environ.get("HIERUI_MODELS")
    return Path(override).expanduser() if override else hierui_home() / "models"


def calib_dir() -> Path:
    return hierui_home() / "calib"


def pruned_dir() -> Path:
    return hierui_home() / "pruned"


def sessions_dir() -> Path:
    """Where the explorer records its sessions by default (never the repository's shipped sessions/)."""
    return hierui_home() / "sessions"


def _temp_name(target: Path, suffix: str) -> Path:
    """A name beside `target` that no other writer (thread or process) picks: hidden, pid + random."""
    return target.with_name(f".{target.name}.{os.getpid()}-{uuid.uuid4().hex[:12]}{suffix}")


def is_temporary(path: str | Path) -> bool:
    """Whether `path` is one of atomic_path's / atomic_dir's temporary names (a leftover if it lingers)."""
    name = Path(path).name
    return name.startswith(".") and name.endswith(TEMP_SUFFIXES)


@contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yields a fresh temporary path beside `target` (not yet created); when the block ends without an
    error, the file written there replaces `target` in one step. On an error the temporary file is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(target, ".tmp")
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write(target: str | Path, data: str | bytes | Callable[[Path], None], encoding: str = "utf-8") -> Path:
    """Write `data` (text, bytes, or a function that writes a file at the path it is given) to `target`
    whole or not at all. Returns `target` as a Path."""
    target = Path(target)
    with atomic_path(target) as tmp:
        if callable(data):
            data(tmp)
        elif isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data, encoding=encoding)
    return target


@contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yields a fresh, empty temporary folder beside `target`; when the block ends without an error it
    becomes `target` (an existing `target` is moved aside and removed). On an error it is removed.

    Two processes filling the same target each use their own folder; the last to finish wins, and a
    reader never sees a half-written folder under the target's name."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(target, ".partial")
    tmp.mkdir()
    try:
        yield tmp
        _swap_in(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _swap_in(tmp: Path, target: Path) -> None:
    """Put the folder `tmp` in `target`'s place. A folder cannot be renamed over a non-empty one, so the
    old target is moved aside first; the two renames run under an exclusive lock on the parent folder, so
    writers in other threads or processes never interleave them."""
    import fcntl

    fd = os.open(target.parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        aside = None
        if target.exists():
            aside = _temp_name(target, ".partial")
            os.rename(target, aside)
        os.rename(tmp, target)
    finally:
        os.close(fd)  # releases the lock
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True) if aside.is_dir() else aside.unlink(missing_ok=True)
