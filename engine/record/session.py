"""Session files: one JSON Lines file per run (docs/design.md, "Session files"), version 2.

    line 1     header: {"format": "hierui-session", "version": 2, "model": …, "perturbation": {…}, …}
               (engine.record.header.SessionHeader: its fields, their defaults, exactly how it is written)
    lines 2…   one step record each, appended and flushed as the step completes
    then       optionally {"end": true, "summary": {…}}, with "branch": {…} for a free-mode run with counterfactual
               on (engine.record.branches.Branch.to_dict; older readers ignore it)
    anywhere   after its step's line, before or after the closing line: a lens line {"lens_of": s, "lens_kl": […],
               "lens_top1_agree": […], "lens_dense_final_kl": […]}, the logit lens of step s computed after the step
               was written (the explorer computes it behind the stepping: hierui.explorer.live); the reader merges it
               into step s, whose own line holds those fields null. A step no lens line completes keeps them null.

A crash loses nothing that was written: the loader drops a truncated last line with a warning. A wrong
format, a newer version, a missing file or a file that is not JSON Lines is one clear HieruiError.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from engine import __version__
from engine.errors import HieruiError
from engine.record.header import FORMAT, VERSION, SessionHeader, header_of
from engine.record.paths import append_whole, check_regular_file, open_for_writing, write_failed
from engine.record.schema import LENS_FIELDS
from engine.record.validate import check_branch, check_lens, check_step, check_summary, loads, shown

if TYPE_CHECKING:
    from engine.record.branches import Branch


def _clean(value):
    """JSON has no NaN/inf: they are written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _line(obj: dict) -> str:
    return json.dumps(_clean(obj), ensure_ascii=False, separators=(",", ":")) + "\n"


def slugify(text: str, limit: int = 32) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug[:limit].rstrip("-") or "session"


def default_session_path(prompt: str, spec: str, directory: str | Path = "sessions") -> Path:
    """sessions/<time>-<slug>.jsonl, unique within the directory."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(directory) / f"{stamp}-{slugify(spec, 20)}-{slugify(prompt)}"
    path = base.with_suffix(".jsonl")
    n = 1
    while path.exists():
        n += 1
        path = Path(f"{base}-{n}.jsonl")
    return path


class SessionWriter:
    """Writes the header at once, then each step as it comes (flushed), then an optional summary; the lens lines of
    steps whose lens is computed later (write_lens) whenever they come, after the summary too.

    The file is opened by engine.record.paths.open_for_writing: a symbolic link at its name is replaced, never
    written through. A write that fails (a full disk) is WriteFailed naming the file (one line, exit 1); the
    file is cut back to its last whole line first, so it stays a readable, incomplete session that a rerun
    records again. Every line is written whole under one lock: a step from the stepping thread and a lens line
    from another thread never interleave."""

    def __init__(self, path: str | Path, header: SessionHeader, exclusive: bool = False):
        """`header`: the run's (engine.run.recorder.session_header; a dict is read as one), stamped here with the
        format, version, time and hierui version. `exclusive`: create the file with O_EXCL (FileExistsError if it
        is there), so two writers (two explorers) never share a file; otherwise an existing file is rewritten (a
        batch run rerun)."""
        self.path = Path(path)
        full = replace(
            header_of(header),
            format=FORMAT,
            version=VERSION,
            created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            hierui=__version__,
        )
        self.header = full
        self._file = open_for_writing(self.path, "x" if exclusive else "w")
        self._good = 0  # the length of what was written whole
        self._lock = threading.Lock()
        self.closed = False
        self.failed = False  # a write failed: the file was cut back and closed, nothing more is written
        self.summary: dict | None = None
        self._write(_line(full.to_dict()))

    def _write(self, text: str) -> None:
        with self._lock:
            self._write_locked(text)

    def _write_locked(self, text: str) -> None:
        try:
            self._file.write(text)
            self._file.flush()
            self._good = os.lseek(self._file.fileno(), 0, os.SEEK_CUR)
        except OSError as e:
            self._fail(e)

    def _fail(self, error: OSError) -> None:
        """Close the file cut back to its last whole line, and raise WriteFailed naming it."""
        fd = os.dup(self._file.fileno())
        try:
            try:
                self._file.close()  # its flush may fail again
            except OSError:
                pass
            os.ftruncate(fd, self._good)
        except OSError:
            pass
        finally:
            os.close(fd)
        if self._good == 0:  # not even the header: no empty file is left under a session's name
            try:
                os.unlink(self.path)
            except OSError:
                pass
        self.closed = self.failed = True
        raise write_failed(self.path, error) from None

    def write_step(self, record: dict) -> None:
        self._write(_line(record))

    def write_lens(self, step: int, values: dict) -> None:
        """The lens line of step `step` (already written), its LENS_FIELDS from `values` (engine.run.lens, as a step
        record holds them). After close, appended to the closed file (all of it or none, never creating it
        again); after a failed write, nothing."""
        text = _line({"lens_of": int(step), **{name: values.get(name) for name in LENS_FIELDS}})
        with self._lock:
            if self.failed:
                return
            if not self.closed:
                self._write_locked(text)
                return
            append_whole(self.path, text, create=False)

    def close(self, summary: dict | None = None, branch: dict | None = None) -> None:
        """End the file, with the closing line when there is a `summary` (and the counterfactual `branch`)."""
        with self._lock:
            if self.closed:
                return
            if summary is not None:
                self._write_locked(_line({"end": True, "summary": summary, **({"branch": branch} if branch else {})}))
                self.summary = summary
            try:
                self._file.flush()
                os.fsync(self._file.fileno())
            except OSError as e:
                self._fail(e)
            self._file.close()
            self.closed = True

    def __enter__(self) -> SessionWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class Session:
    """A loaded session: header, step records, the closing summary if there is one, and the counterfactual
    branch (an engine.record.branches.Branch) if the closing line holds one."""

    path: Path
    header: SessionHeader
    steps: list[dict]
    summary: dict | None = None
    warnings: list[str] = field(default_factory=list)
    branch: Branch | None = None

    @property
    def complete(self) -> bool:
        return self.summary is not None


_TRUNCATED = object()  # what _decode_line gives for a last line cut short by a crash


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def load_session(path: str | Path) -> Session:
    """Read and validate a session file; raise HieruiError with one line on anything unusable.

    The file is split into lines before decoding, so a crash in the middle of a multi-byte character
    of the last line is still a truncated last line (a warning), not an unreadable file.
    """
    path = Path(path)
    lines = _read_lines(path)
    session = Session(path=path, header=_read_header(path, *lines[0]), steps=[])
    last = len(lines) - 1
    for index, (number, raw) in enumerate(lines[1:], start=1):
        obj = _decode_line(path, number, raw, last=index == last)
        if obj is _TRUNCATED:
            session.warnings.append(f"{path}: dropped a truncated last line (line {number}); the run was interrupted")
            break
        if not isinstance(obj, dict):
            raise HieruiError(f"{path}: line {number} is not a JSON object")
        if "lens_of" in obj:  # a step's lens, computed after it: anywhere after that step, the closing line too
            _read_lens(session, obj, number)
            continue
        if session.summary is not None:
            raise HieruiError(f"{path}: line {number} comes after the closing summary line")
        if obj.get("end"):
            _read_closing(session, obj, number)
        else:
            _read_step(session, obj, number)
    return session


def _read_lines(path: Path) -> list[tuple[int, bytes]]:
    """The file's non-blank lines as (line number in the file, raw bytes); a missing, unreadable or empty file is
    one HieruiError."""
    if not path.exists() and not path.is_symlink():  # a link loop or a dangling link: check_regular_file says which
        raise HieruiError(f"session not found: {path}")
    if path.is_dir():
        raise HieruiError(f"{path} is a directory, not a session file")
    check_regular_file(path, "session")  # a FIFO or a device: one line, not a read that blocks
    try:
        data = path.read_bytes()
    except OSError as e:
        raise HieruiError(f"cannot read session {path}: {e.strerror or e}") from None
    lines = [(n, raw) for n, raw in enumerate(data.split(b"\n"), start=1) if raw.strip()]
    if not lines:
        raise HieruiError(f"{path} is empty, not a hierui session")
    return lines


def _read_header(path: Path, number: int, raw: bytes) -> SessionHeader:
    """The first line as a SessionHeader: a hierui session of a version this hierui reads, every field checked."""
    try:
        first = loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise HieruiError(f"{path} is not a hierui session (not UTF-8 text)") from None
    except RecursionError:
        raise HieruiError(f"{path}: line {number} is nested too deeply to read") from None
    except json.JSONDecodeError:
        raise HieruiError(f"{path} is not a hierui session (its first line is not JSON)") from None
    except ValueError:  # an integer of too many digits
        raise HieruiError(f"{path}: line {number} holds a number too large to read") from None
    if not isinstance(first, dict) or first.get("format") != FORMAT:
        raise HieruiError(f'{path} is not a hierui session (no "format": "{FORMAT}" header)')
    version = first.get("version")
    if not _is_int(version):
        raise HieruiError(f"{path}: the session header has no valid version")
    if version > VERSION:
        raise HieruiError(
            f"{path} is a version {version} session; this hierui ({__version__}) reads version {VERSION}: "
            "upgrade hierui"
        )
    if version < 1:
        raise HieruiError(f"{path}: unsupported session version {version}")
    return SessionHeader.from_dict(first, path, number)  # every field's type and range checked


def _decode_line(path: Path, number: int, raw: bytes, last: bool):
    """A line after the header, decoded (any JSON value); _TRUNCATED where the last line is not UTF-8 JSON."""
    try:
        return loads(raw.decode("utf-8"))
    except RecursionError:
        raise HieruiError(f"{path}: line {number} is nested too deeply to read") from None
    except ValueError as e:  # UnicodeDecodeError, json.JSONDecodeError, an integer of too many digits
        if not isinstance(e, (UnicodeDecodeError, json.JSONDecodeError)):
            raise HieruiError(f"{path}: line {number} holds a number too large to read") from None
        if last:  # a crash mid-write cut the last line short
            return _TRUNCATED
        raise HieruiError(f"{path}: line {number} is not valid JSON") from None


def _read_closing(session: Session, obj: dict, number: int) -> None:
    """The closing line: its summary, checked, and the counterfactual branch where it holds one."""
    path = session.path
    summary = obj.get("summary")
    if summary is not None and not isinstance(summary, dict):
        raise HieruiError(f"{path}: line {number}, the closing line, holds no summary object")
    check_summary(summary or {}, path, number)
    session.summary = summary or {}
    if obj.get("branch") is not None:
        from engine.record.branches import Branch

        check_branch(obj["branch"], path, number)
        session.branch = Branch.from_dict(obj["branch"])


def _read_step(session: Session, obj: dict, number: int) -> None:
    """A step record, checked: numbered in order from 0, every field's type and range."""
    path = session.path
    if "step" not in obj:
        raise HieruiError(f"{path}: line {number} is neither a step nor the closing line")
    if not _is_int(obj["step"]) or obj["step"] != len(session.steps):
        raise HieruiError(f"{path}: line {number} holds step {shown(obj['step'])}, expected step {len(session.steps)}")
    check_step(obj, path, number)
    session.steps.append(obj)


def _read_lens(session: Session, obj: dict, number: int) -> None:
    """A lens line, checked (engine.record.validate.check_lens), merged into its step: a new record holding the
    step's fields and the line's lens values. A step's lens is given once: its own line holds it null."""
    path = session.path
    check_lens(obj, path, number, len(session.steps), session.header.layers)
    step = int(obj["lens_of"])
    record = session.steps[step]
    if any(record.get(name) is not None for name in LENS_FIELDS):
        raise HieruiError(f"{path}: line {number} gives the lens of step {step} again (its values are already read)")
    session.steps[step] = {**record, **{name: obj[name] for name in LENS_FIELDS}}
