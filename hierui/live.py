"""A live stepping run for the explorer: a Stepper whose every step goes to a session file at once.

`step()` is called from a worker thread; `close()` may come from the UI thread (quit, restart): a lock
keeps them apart, so a closing never interleaves with a half-written step.
"""

from __future__ import annotations

import threading
from pathlib import Path

from engine.session import SessionWriter, default_session_path
from engine.stepper import Stepper, StepSettings
from engine.summary import summarize


class LiveRun:
    def __init__(self, pair, prompt: str, settings: StepSettings, session_dir: str | Path):
        self.stepper = Stepper(pair, prompt, settings)
        self.header = self.stepper.header()
        self.path = default_session_path(prompt, str(pair.spec), session_dir)
        self._writer: SessionWriter | None = None
        self._lock = threading.Lock()
        self._close_requested = False
        self.closed = False

    @property
    def finished(self) -> bool:
        return self.stepper.finished or self.closed

    def step(self) -> dict | None:
        """One step, written to the session before it is returned; None when the run is over."""
        with self._lock:
            if self.finished or self._close_requested:
                return None
            if self._writer is None:
                self._writer = SessionWriter(self.path, self.header)
            record = self.stepper.step()
            if record is not None:
                self._writer.write_step(record)
            if self.stepper.finished or self._close_requested:
                self._close_locked()
            return record

    def close(self, wait: bool = True) -> None:
        """End the run: the session gets its closing summary (over the steps taken so far).

        With `wait=False` (quitting) nothing blocks: if a step is in flight, the stepping thread writes it
        and closes the session itself when the step ends.
        """
        self._close_requested = True
        if self._lock.acquire(blocking=wait):
            try:
                self._close_locked()
            finally:
                self._lock.release()

    def _close_locked(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._writer is not None:
            self._writer.close(summarize(self.stepper.records, self.stepper.settings.mode))

    @property
    def written(self) -> bool:
        return self._writer is not None
