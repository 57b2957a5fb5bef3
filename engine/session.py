"""Session files: one JSON Lines file per run (shared/design.md, "Sessions"), version 1.

    line 1     header: {"format": "hierui-session", "version": 1, "model": …, "perturbation": {…}, …}
    lines 2…   one step record each, appended and flushed as the step completes
    last line  optionally {"end": true, "summary": {…}}, with "branch": {…} for a free-mode run with counterfactual
               on (engine.branch.Branch.to_dict; older readers ignore it)

A crash loses nothing that was written: the loader drops a truncated last line with a warning. A wrong
format, a newer version, a missing file or a file that is not JSON Lines is one clear HieruiError.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from engine import __version__
from engine.errors import HieruiError
from engine.validate import check_branch, check_header, check_step, check_summary, loads, shown

if TYPE_CHECKING:
    from engine.branch import Branch

FORMAT = "hierui-session"
VERSION = 1


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
    """Writes the header at once, then each step as it comes (flushed), then an optional summary."""

    def __init__(self, path: str | Path, header: dict, exclusive: bool = False):
        """`exclusive`: create the file with O_EXCL (FileExistsError if it is there), so two writers (two
        explorers) never share a file; otherwise an existing file is rewritten (a batch run rerun)."""
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        full = {
            "format": FORMAT,
            "version": VERSION,
            **{k: v for k, v in header.items() if k not in ("format", "version", "created", "hierui")},
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "hierui": __version__,
        }
        self.header = full
        self._file = open(self.path, "x" if exclusive else "w", encoding="utf-8")
        self._file.write(_line(full))
        self._file.flush()
        self.closed = False
        self.summary: dict | None = None

    def write_step(self, record: dict) -> None:
        self._file.write(_line(record))
        self._file.flush()

    def close(self, summary: dict | None = None, branch: dict | None = None) -> None:
        """End the file, with the closing line when there is a `summary` (and the counterfactual `branch`)."""
        if self.closed:
            return
        if summary is not None:
            self._file.write(_line({"end": True, "summary": summary, **({"branch": branch} if branch else {})}))
            self.summary = summary
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self.closed = True

    def __enter__(self) -> SessionWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class Session:
    """A loaded session: header, step records, the closing summary if there is one, and the counterfactual
    branch (an engine.branch.Branch) if the closing line holds one."""

    path: Path
    header: dict
    steps: list[dict]
    summary: dict | None = None
    warnings: list[str] = field(default_factory=list)
    branch: Branch | None = None

    @property
    def complete(self) -> bool:
        return self.summary is not None


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def load_session(path: str | Path) -> Session:
    """Read and validate a session file; raise HieruiError with one line on anything unusable.

    The file is split into lines before decoding, so a crash in the middle of a multi-byte character
    of the last line is still a truncated last line (a warning), not an unreadable file.
    """
    path = Path(path)
    if not path.exists():
        raise HieruiError(f"session not found: {path}")
    if path.is_dir():
        raise HieruiError(f"{path} is a directory, not a session file")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise HieruiError(f"cannot read session {path}: {e.strerror or e}") from None
    # (line number in the file, raw bytes), blank lines skipped
    lines = [(n, raw) for n, raw in enumerate(data.split(b"\n"), start=1) if raw.strip()]
    if not lines:
        raise HieruiError(f"{path} is empty, not a hierui session")
    try:
        header = loads(lines[0][1].decode("utf-8"))
    except UnicodeDecodeError:
        raise HieruiError(f"{path} is not a hierui session (not UTF-8 text)") from None
    except RecursionError:
        raise HieruiError(f"{path}: line {lines[0][0]} is nested too deeply to read") from None
    except json.JSONDecodeError:
        raise HieruiError(f"{path} is not a hierui session (its first line is not JSON)") from None
    except ValueError:  # an integer of too many digits
        raise HieruiError(f"{path}: line {lines[0][0]} holds a number too large to read") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise HieruiError(f'{path} is not a hierui session (no "format": "{FORMAT}" header)')
    version = header.get("version")
    if not _is_int(version):
        raise HieruiError(f"{path}: the session header has no valid version")
    if version > VERSION:
        raise HieruiError(
            f"{path} is a version {version} session; this hierui ({__version__}) reads version {VERSION}: "
            "upgrade hierui"
        )
    if version < 1:
        raise HieruiError(f"{path}: unsupported session version {version}")
    check_header(header, path, lines[0][0])  # engine.validate: every field's type and range

    session = Session(path=path, header=header, steps=[])
    last = len(lines) - 1
    for index, (number, raw) in enumerate(lines[1:], start=1):
        try:
            obj = loads(raw.decode("utf-8"))
        except RecursionError:
            raise HieruiError(f"{path}: line {number} is nested too deeply to read") from None
        except ValueError as e:  # UnicodeDecodeError, json.JSONDecodeError, an integer of too many digits
            if not isinstance(e, (UnicodeDecodeError, json.JSONDecodeError)):
                raise HieruiError(f"{path}: line {number} holds a number too large to read") from None
            if index == last:  # the last line: a crash mid-write
                session.warnings.append(
                    f"{path}: dropped a truncated last line (line {number}); the run was interrupted"
                )
                break
            raise HieruiError(f"{path}: line {number} is not valid JSON") from None
        if not isinstance(obj, dict):
            raise HieruiError(f"{path}: line {number} is not a JSON object")
        if session.summary is not None:
            raise HieruiError(f"{path}: line {number} comes after the closing summary line")
        if obj.get("end"):
            summary = obj.get("summary")
            if summary is not None and not isinstance(summary, dict):
                raise HieruiError(f"{path}: line {number}, the closing line, holds no summary object")
            check_summary(summary or {}, path, number)
            session.summary = summary or {}
            if obj.get("branch") is not None:
                from engine.branch import Branch

                check_branch(obj["branch"], path, number)
                session.branch = Branch.from_dict(obj["branch"])
            continue
        if "step" not in obj:
            raise HieruiError(f"{path}: line {number} is neither a step nor the closing line")
        if not _is_int(obj["step"]) or obj["step"] != len(session.steps):
            raise HieruiError(
                f"{path}: line {number} holds step {shown(obj['step'])}, expected step {len(session.steps)}"
            )
        check_step(obj, path, number)
        session.steps.append(obj)
    return session


# ------------------------------------------------------------------ recording


def session_header(pair, settings, row, tie_margin: tuple[float, str] | None = None) -> dict:
    """The header of one row's session (the writer adds format, version, created and hierui).

    `pair`: an engine.pair.ModelPair; `settings`: the engine.settings.StepSettings the row is stepped
    with; `row`: the stepper's row (prompt, ids, choices, choice ids, notes); `tie_margin`: the near-tie
    threshold the stepper used and where it came from (BatchStepper.tie_margin, .tie_margin_source)."""
    from engine.architecture import describe as describe_architecture

    report = pair.report
    loaded = pair.loaded
    perturbation = {"spec": str(pair.spec)}
    if report is not None:
        perturbation.update(
            measured_sparsity=report.measured_sparsity,
            dense_sparsity=report.dense_sparsity,
            details=dict(report.details),
        )
    model = loaded.ref.name if loaded is not None else getattr(pair.dense.config, "name_or_path", "")
    first = pair.dense.get_input_embeddings().weight
    return {
        "model": model,
        "model_display": loaded.ref.display if loaded is not None else model,
        "perturbation": perturbation,
        "calibration": report.calibration if report is not None else None,
        "prompt": row.prompt,
        "prompt_tokens": len(row.ids),
        "prompt_ids": list(row.ids),
        **({"truncated_from": row.truncated_from} if getattr(row, "truncated_from", None) else {}),
        "mode": settings.mode,
        "temperature": settings.temperature,
        "choices": list(row.choices) if row.choices else None,
        "choice_ids": list(row.choice_ids) or None,
        "choice_notes": list(row.notes) or None,
        "seed": settings.seed,
        "sample": settings.sample,
        "max_new_tokens": settings.max_new_tokens,
        "raw": settings.raw,
        "topk": settings.topk,
        "lens": settings.lens,
        **({"tie_margin": tie_margin[0], "tie_margin_source": tie_margin[1]} if tie_margin else {}),
        **({"prefix_ids": list(row.prefix_ids)} if getattr(row, "prefix_ids", None) else {}),
        **({"start_step": row.start_step} if getattr(row, "start_step", 0) else {}),
        **({"parent": dict(row.parent)} if getattr(row, "parent", None) else {}),
        **({"counterfactual": True} if getattr(settings, "counterfactual", False) and settings.mode == "free" else {}),
        "layers": pair.dense.config.num_hidden_layers,
        "architecture": describe_architecture(pair.dense.config),
        "device": str(first.device),
        "dtype": str(first.dtype).removeprefix("torch."),
        # engine.plan's estimate made before loading: {peak_bytes, peak_stage, placement, fits, …}
        **({"plan": dict(pair.plan)} if getattr(pair, "plan", None) else {}),
    }


class SessionRecorder:
    """Steps a stepper and writes each of its rows to its own session file as it goes: the one recording
    path of `hierui batch`, `hierui replay --rerun` and the explorer.

    `stepper`: an engine.stepper.BatchStepper, or a Stepper (one row); `paths`: one file per row. A row's
    file is opened at its first recorded step (header, then every step so far, each flushed) and gets its
    closing summary as soon as the row finishes. `close(summary=False)` ends the others without one (an
    interrupted run, rerun later); `close(summary=True)` ends them with a summary of the steps taken (the
    explorer's restart or quit: the user ended the run there).

    With `counterfactual` on in free mode, the rows' files stay open until every row has finished; then the
    counterfactual branches are stepped (engine.branch.counterfactuals, all rows at once) and each file is closed
    with its summary, the branch's fields and the branch. A run ended before it finished gets no branch.
    """

    def __init__(self, stepper, paths: list):
        self.stepper = getattr(stepper, "batch", stepper)
        self.paths = [Path(p) for p in paths]
        if len(self.paths) != len(self.stepper.rows):
            raise ValueError("one session path per row")
        self.writers: list[SessionWriter | None] = [None] * len(self.paths)
        self._written = [0] * len(self.paths)
        settings = self.stepper.settings
        self.counterfactual = bool(getattr(settings, "counterfactual", False)) and settings.mode == "free"
        self.branches: list = [None] * len(self.paths)  # engine.branch.Branch per row, once computed

    @property
    def finished(self) -> bool:
        return self.stepper.finished

    @property
    def started(self) -> bool:
        return any(w is not None for w in self.writers)

    def header(self, b: int) -> dict:
        s = self.stepper
        return session_header(s.pair, s.settings, s.rows[b], (s.tie_margin, s.tie_margin_source))

    def step(self) -> list[dict | None]:
        """One step of every unfinished row, written before it is returned."""
        records = self.stepper.step()
        for b, record in enumerate(records):
            if record is not None:
                self._flush(b)
        if self.counterfactual and self.stepper.finished:
            self._close_with_branches()
        return records

    def _close_with_branches(self) -> None:
        """Step every row's counterfactual branch, then close each file with its summary and branch."""
        from engine.branch import branch_summary, counterfactuals
        from engine.summary import summarize

        if all(w is None or w.closed for w in self.writers):
            return
        self.branches = counterfactuals(self.stepper.pair, self.stepper)
        for writer, row, branch in zip(self.writers, self.stepper.rows, self.branches):
            if writer is None or writer.closed:
                continue
            summary = {**summarize(row.records, self.stepper.settings.mode), **branch_summary(branch)}
            writer.close(summary, branch.to_dict() if branch is not None else None)

    def _flush(self, b: int) -> None:
        """Write row b's records not yet in its file (opening it first), and its summary once it finished."""
        from engine.summary import summarize

        row = self.stepper.rows[b]
        if self.writers[b] is None:
            self.writers[b] = SessionWriter(self.paths[b], self.header(b))
        writer = self.writers[b]
        for record in row.records[self._written[b] :]:
            writer.write_step(record)
        self._written[b] = len(row.records)
        if row.finished and not self.counterfactual:  # counterfactual: closed with the branches (step)
            writer.close(summarize(row.records, self.stepper.settings.mode))

    def run(self, callback=None, stop=None) -> list[Session]:
        """Step to the end (or until `stop()` is true); `callback(row_index, record)` after each record.

        Ctrl-C or an error keeps every step written so far, without a summary (an interrupted run)."""
        try:
            while not self.finished:
                if stop is not None and stop():
                    break
                for b, record in enumerate(self.step()):
                    if record is not None and callback is not None:
                        callback(b, record)
        finally:
            self.close(summary=False)
        return self.sessions()

    def close(self, summary: bool) -> None:
        """End every open session; with `summary`, each gets its closing summary over the steps taken."""
        from engine.summary import summarize

        for b, writer in enumerate(self.writers):
            if writer is None or writer.closed:
                continue
            row = self.stepper.rows[b]
            writer.close(summarize(row.records, self.stepper.settings.mode) if summary else None)

    def sessions(self) -> list[Session]:
        """What each row's file holds now (rows never recorded have an empty session)."""
        out = []
        for b, row in enumerate(self.stepper.rows):
            writer = self.writers[b]
            out.append(
                Session(
                    path=self.paths[b],
                    header=writer.header if writer else self.header(b),
                    steps=list(row.records),
                    summary=writer.summary if writer else None,
                    branch=self.branches[b] if writer and writer.summary is not None else None,
                )
            )
        return out
