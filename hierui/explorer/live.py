"""The explorer's live step source: a Stepper recorded by the SessionRecorder, made safe to close from the UI thread.

`step()` runs in a worker thread; `close()` comes from the UI thread (quit, restart) and never waits: a
lock keeps a closing from interleaving with a half-written step, and when a step is in flight the
stepping thread closes the session itself as soon as that step is written.

The models are used by one thread at a time: a step, an attribution (patching hooks on the perturbed model)
or a counterfactual branch holds MODEL_LOCK while it runs the pair, always in a worker thread, never the UI's.
A branch (`prefix`, `start_step`, `parent`) is a run that continues another run's context from one of its
steps with a chosen token (engine.run.stepper.Stepper); its session header names the parent.

The logit lens off the stepping loop. With the lens "all" the stepper steps without it (`lens_later`: each
record's lens fields null, what the lens needs kept) and a second worker (hierui.explorer.workers) computes the
pending steps behind the loop: `compute_lens(step)` runs outside both locks (the lens reads the final norm and
the head without hooks, engine.run.lens), keeps the values (`records` and `with_lens` merge them into the step
records) and writes the step's lens line (engine.record.session.SessionWriter.write_lens) under the run's lock,
so after the step's own line. A run the user ends (quit, restart, leaving a branch) computes no more lens: the
steps not reached stay null in its file. A run that ends by itself keeps computing until every step has its
lens; the lines after the closing summary are appended to the closed file.
"""

from __future__ import annotations

import threading
from pathlib import Path

from engine.record.session import SessionWriter, default_session_path
from engine.record.settings import StepSettings
from engine.run.recorder import SessionRecorder
from engine.run.stepper import Stepper

MODEL_LOCK = threading.Lock()  # held while a worker runs the pair (a step, an attribution, a counterfactual)


class LiveRun:
    live = True
    pace = 0.0  # seconds between steps when running: as fast as the models go

    def __init__(
        self,
        pair,
        prompt: str,
        settings: StepSettings,
        session_dir: str | Path,
        prefix: list[int] | None = None,
        start_step: int = 0,
        parent: dict | None = None,
    ):
        self.lens_later = settings.lens == "all"  # the lens computed behind the stepping (compute_lens)
        self.stepper = Stepper(
            pair, prompt, settings, prefix=prefix, start_step=start_step, parent=parent, lens_later=self.lens_later
        )
        self._lens: dict[int, dict] = {}  # step → its lens values, computed behind the stepping
        name = f"branch {parent['step'] + 1} {prompt}" if parent else prompt  # a branch's file says so
        self._name = (name, f"{pair.spec}-{settings.mode}", session_dir)
        self.path = default_session_path(*self._name)
        self.recorder = SessionRecorder(self.stepper, [self.path])
        self.header = self.recorder.header(0)
        self._lock = threading.Lock()
        self._close_requested = False
        self.closed = False

    @property
    def settings(self) -> StepSettings:
        return self.stepper.settings

    @property
    def records(self) -> list[dict]:
        """The step records, each with its lens values where computed."""
        return [self.with_lens(record) for record in self.stepper.records]

    def with_lens(self, record: dict) -> dict:
        """`record` with its step's lens values where they were computed (a new dict), else itself."""
        values = self._lens.get(record["step"])
        return {**record, **values} if values is not None else record

    @property
    def total(self) -> int:
        return self.settings.max_new_tokens

    @property
    def notes(self) -> list[str]:
        from engine.perturb.checkpoint import structure_note

        report = getattr(self.stepper.pair, "report", None)
        note = structure_note(getattr(report, "details", None))
        return list(self.stepper.notes) + ([note] if note else [])

    @property
    def finished(self) -> bool:
        return self.stepper.finished or self.closed or self._close_requested

    @property
    def written(self) -> bool:
        return self.recorder.started

    def step(self) -> dict | None:
        """One step, written to the session before it is returned; None when the run is over."""
        with self._lock:
            if self.finished:
                if self._close_requested:
                    self._close_locked()
                return None
            self._open_session()
            with MODEL_LOCK:
                record = self.recorder.step()[0]
            if self.stepper.finished or self._close_requested:
                self._close_locked()
        if self._close_requested and not self.closed:  # asked while this step was being written
            self.close()
        return record

    def lens_pending(self) -> list[int]:
        """The steps whose lens is still to compute, oldest first; none once the user ended the run."""
        if not self.lens_later or self._close_requested:
            return []
        return [step for _row, step in self.stepper.batch.lens_pending()]

    def compute_lens(self, step: int) -> dict | None:
        """Compute step `step`'s lens (in the calling worker thread, never holding a lock the stepping loop takes
        while it computes), keep it and write its lens line; None where there is nothing to compute."""
        values = self.stepper.batch.compute_lens(0, step)
        if values is None:
            return None
        with self._lock:  # a step being recorded writes its own line first
            self._lens[step] = values
            writer = self.recorder.writers[0]
            if writer is not None:
                writer.write_lens(step, values)
        if self._close_requested and not self.closed:  # asked while the line was being written
            self.close()
        return values

    def _open_session(self) -> None:
        """Create the session file at the first step, exclusively (O_EXCL): two explorers never share a file;
        a name another one took meanwhile (same second, spec and prompt) moves on to the next free name."""
        while self.recorder.writers[0] is None:
            try:
                self.recorder.writers[0] = SessionWriter(self.path, self.header, exclusive=True)
            except FileExistsError:
                self.path = default_session_path(*self._name)
                self.recorder.paths[0] = self.path

    def close(self) -> None:
        """End the run, its session closed with a summary over the steps taken. Never blocks: with a
        step in flight, the stepping thread writes that step and closes the session when it ends."""
        self._close_requested = True
        if self._lock.acquire(blocking=False):
            try:
                self._close_locked()
            finally:
                self._lock.release()

    def _close_locked(self) -> None:
        if not self.closed:
            self.closed = True
            self.recorder.close(summary=True)
