"""Where the explorer's steps come from: the StepSource protocol, and the recorded source that plays back a session.

The explorer drives one screen from either source: `hierui explore` steps a live pair (hierui.explorer.live.LiveRun),
`hierui replay` plays a recorded session (RecordedRun, torch-free: no model is loaded).
"""

from __future__ import annotations

from typing import Protocol

from engine.record.header import SessionHeader
from engine.record.session import Session
from engine.record.settings import StepSettings
from engine.run.rerun import settings_from_header

PLAYBACK_SECONDS = 0.15


class StepSource(Protocol):
    live: bool  # True: steps are computed (restarts, mode and temperature changes make sense)
    # True: the lens of each step is computed behind the stepping (hierui.explorer.live.LiveRun: lens_pending,
    # compute_lens, with_lens)
    lens_later: bool
    pace: float  # seconds between steps when running continuously
    header: SessionHeader
    settings: StepSettings
    path: object  # the session file

    @property
    def records(self) -> list[dict]: ...
    @property
    def total(self) -> int: ...  # the most steps this source can give
    @property
    def notes(self) -> list[str]: ...  # warnings to show once (multi-token choices, a truncated file)
    @property
    def finished(self) -> bool: ...
    def step(self) -> dict | None: ...  # the next step, None when there is none
    def close(self) -> None: ...  # never blocks


class RecordedRun:
    """A recorded session as a step source: it starts with every step shown; `rewind()` plays it again."""

    live = False
    lens_later = False
    pace = PLAYBACK_SECONDS

    def __init__(self, session: Session):
        self.session = session
        self.path = session.path
        self.header = session.header
        steps = len(session.steps)
        self.settings = settings_from_header(self.header, max(steps, 1))
        self.position = steps

    @property
    def records(self) -> list[dict]:
        return self.session.steps[: self.position]

    @property
    def total(self) -> int:
        return len(self.session.steps)

    @property
    def notes(self) -> list[str]:
        from engine.perturb.checkpoint import structure_note

        note = structure_note(self.header.perturbation.details)
        return list(self.session.warnings) + list(self.header.choice_notes or ()) + ([note] if note else [])

    @property
    def finished(self) -> bool:
        return self.position >= len(self.session.steps)

    def rewind(self) -> None:
        self.position = 0

    def step(self) -> dict | None:
        if self.finished:
            return None
        self.position += 1
        return self.session.steps[self.position - 1]

    def close(self) -> None:
        pass
