"""Messages the workers post to the app (models loading, steps arriving, lens values computed behind them,
attributions).
Failures reach the app as Textual's own `Worker.StateChanged`, handled in one place."""

from __future__ import annotations

from textual.message import Message


class LoadProgress(Message):
    """A loading stage moved on: `stage` with `done` of `total` (total 0: a status line only)."""

    def __init__(self, stage: str, done: int = 0, total: int = 0) -> None:
        super().__init__()
        self.stage, self.done, self.total = stage, done, total


class PairReady(Message):
    """The dense model is loaded and perturbed; stepping can start."""

    def __init__(self, pair) -> None:
        super().__init__()
        self.pair = pair


class StepDone(Message):
    """One more step record of run number `run` (steps of a run that was restarted are ignored)."""

    def __init__(self, run: int, record: dict, finished: bool) -> None:
        super().__init__()
        self.run, self.record, self.finished = run, record, finished


class LensDone(Message):
    """The logit lens of step `step` of run number `run`, computed behind the stepping (hierui.explorer.live):
    `values` holds its lens fields as a step record does (a restarted run's are ignored)."""

    def __init__(self, run: int, step: int, values: dict) -> None:
        super().__init__()
        self.run, self.step, self.values = run, step, values


class AttributionDone(Message):
    """The attribution (engine.run.attribution.Attribution) of step `step` of run number `run` (the step source
    `source`, kept with the result so that going back to a parent run finds it)."""

    def __init__(self, run: int, step: int, result, source=None) -> None:
        super().__init__()
        self.run, self.step, self.result, self.source = run, step, result, source
