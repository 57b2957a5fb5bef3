"""The one progress reporter of every command: what a long stage is doing, how far it is, and the time left.

The engine reports `progress(stage, done, total)`: `stage` a short label ("calibrating", "pruning", or a
sentence such as "loading SmolLM2-135M-Instruct (embedded)"), `total` 0 when the size of the stage is not
known (then only its elapsed time is shown). A new stage ends the one before it. `Reporter` shows the
stages on a console (stderr):

- in a terminal: rich bars with the percentage, the counts, the elapsed and the remaining time (rich's
  TimeRemainingColumn), and one line left behind for each finished stage (`pruning: 100% (30/30 layers),
  done in 9.8 s`);
- anywhere else (a file, a pipe, CI): plain lines from `StageLines` and never a control character: one when
  a stage starts, one about every 10% or every 30 s, one when it ends, e.g.
  `calibrating: 40% (1612/4032 tokens), 12 s elapsed, ~18 s left`.

`stage_progress` is the form the prune, replay and models commands use; hierui.views.bars.BatchBars (hierui
batch) adds the sweep's runs and tokens to the same reporter. Rich is imported only when a terminal is drawn on.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

# the unit of a stage's counts, by the stage's first word ("bytes" are shown in MB)
UNITS = {
    "calibrating": "tokens",
    "pruning": "layers",
    "scoring": "batches",
    "fetching": "bytes",
    "de-quantizing": "tensors",
    "recomputing": "steps",
}
LINE_STEP = 0.1  # without a terminal: a line at every 10% ...
LINE_EVERY = 30.0  # ... and at least every 30 s while a stage lasts


def duration(seconds: float) -> str:
    """2.3 s, 12 s, 2 m 05 s, 1 h 02 m."""
    seconds = max(0.0, seconds)
    if seconds < 9.95:
        return f"{seconds:.1f} s"
    if seconds < 59.5:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        m, s = divmod(round(seconds), 60)
        return f"{m} m {s:02d} s"
    h, m = divmod(round(seconds / 60), 60)
    return f"{h} h {m:02d} m"


def counts(stage: str, done: int, total: int) -> str:
    """`done/total unit` for a stage: "1612/4032 tokens", "37.2/92.9 MB", "3/4"."""
    unit = UNITS.get(stage.split(" ", 1)[0].lower().rstrip(":"), "")
    if unit == "bytes":
        return f"{done / 1e6:.1f}/{total / 1e6:.1f} MB"
    return f"{done}/{total}" + (f" {unit}" if unit else "")


def percent(done: int, total: int) -> int:
    return int(100 * min(done, total) / total) if total > 0 else 0


@dataclass
class _Stage:
    started: float
    done: int = 0
    total: int = 0
    exclusive: bool = True
    step: int = -1  # the last LINE_STEP a line was printed for
    last_line: float = 0.0


class StageLines:
    """The stages as plain lines through `write` (no terminal needed): a line when a stage starts, one at
    about every `step` of its total or every `every` seconds, and one when it ends. `clock` is a monotonic
    time in seconds (a test's fake clock). With `start_lines=False, progress_lines=False` it only keeps
    the time of each stage and writes its end line (what a terminal leaves behind its bars)."""

    def __init__(
        self,
        write: Callable[[str], None],
        clock: Callable[[], float] = time.monotonic,
        step: float = LINE_STEP,
        every: float = LINE_EVERY,
        start_lines: bool = True,
        progress_lines: bool = True,
        on_end: Callable[[str], None] | None = None,
    ):
        self.write, self.clock, self.step, self.every = write, clock, step, every
        self.start_lines, self.progress_lines = start_lines, progress_lines
        self.on_end = on_end
        self.open: dict[str, _Stage] = {}

    # the lines ------------------------------------------------------------

    def progress_line(self, stage: str, st: _Stage, now: float) -> str:
        elapsed = now - st.started
        if st.total <= 0:
            return f"{stage}: {duration(elapsed)} elapsed"
        line = (
            f"{stage}: {percent(st.done, st.total)}% ({counts(stage, st.done, st.total)}), {duration(elapsed)} elapsed"
        )
        if 0 < st.done < st.total:
            line += f", ~{duration(elapsed * (st.total - st.done) / st.done)} left"
        return line

    def start_line(self, stage: str, st: _Stage) -> str:
        if st.total <= 0:
            return stage
        return f"{stage}: {percent(st.done, st.total)}% ({counts(stage, st.done, st.total)})"

    def end_line(self, stage: str, st: _Stage, now: float) -> str:
        took = duration(now - st.started)
        if st.total <= 0:
            return f"{stage}: done in {took}"
        where = f"{percent(st.done, st.total)}% ({counts(stage, st.done, st.total)})"
        if st.done >= st.total:
            return f"{stage}: {where}, done in {took}"
        return f"{stage}: stopped at {where} after {took}"

    # the stages -----------------------------------------------------------

    def update(self, stage: str, done: int = 0, total: int = 0, exclusive: bool = True) -> None:
        """Stage `stage` is at `done` of `total`. A new exclusive stage ends the other exclusive ones."""
        now = self.clock()
        total = max(int(total or 0), 0)
        st = self.open.get(stage)
        if st is None:
            if exclusive:
                self.end_stages()
            st = self.open[stage] = _Stage(now, done, total, exclusive, last_line=now)
            if total > 0:
                st.step = self._step_of(st)
            if self.start_lines:
                self.write(self.start_line(stage, st))
        else:
            if st.total <= 0 < total:  # its size is known now: say so at once
                st.step = -1
            st.done, st.total = done, total
        if total > 0 and done >= total:
            self.end(stage)
            return
        if total > 0 and self._step_of(st) > st.step:
            st.step = self._step_of(st)
            self._progress(stage, st, now)
        elif now - st.last_line >= self.every:
            self._progress(stage, st, now)

    def tick(self) -> None:
        """A line for every open stage that has said nothing for `every` seconds (call it often)."""
        now = self.clock()
        for stage, st in list(self.open.items()):
            if now - st.last_line >= self.every:
                self._progress(stage, st, now)

    def end(self, stage: str, quiet: bool = False) -> None:
        st = self.open.pop(stage, None)
        if st is None:
            return
        if not quiet:
            self.write(self.end_line(stage, st, self.clock()))
        if self.on_end:
            self.on_end(stage)

    def end_stages(self, exclusive_only: bool = True, quiet: bool = False) -> None:
        for stage, st in list(self.open.items()):
            if st.exclusive or not exclusive_only:
                self.end(stage, quiet)

    def _step_of(self, st: _Stage) -> int:
        return int(min(st.done, st.total) / st.total / self.step + 1e-9) if st.total > 0 else -1

    def _progress(self, stage: str, st: _Stage, now: float) -> None:
        st.last_line = now
        if self.progress_lines:
            self.write(self.progress_line(stage, st, now))


class Reporter:
    """Stages on `console`: rich bars when it is a terminal, else StageLines (see the module's docstring).

    `stage(name, done, total)` moves a stage (a new one ends the one before, unless `exclusive=False`: the
    runs of a sweep last across its stages); `message(text)` prints a note; `bar(key, description, done,
    total)` is a bar drawn only in a terminal (a sweep's tokens), which without one only lets StageLines
    say how long the open stages have lasted; `close()` ends it all (`failed=True`: no end lines)."""

    def __init__(self, console, clock: Callable[[], float] = time.monotonic, terminal: bool | None = None):
        self.console = console
        self.terminal = console.is_terminal if terminal is None else terminal
        self.tasks: dict[str, object] = {}
        self.progress = None
        self.closed = False
        self.lines = StageLines(
            self._write,
            clock,
            start_lines=not self.terminal,
            progress_lines=not self.terminal,
            on_end=self._remove_task,
        )

    def _write(self, text: str) -> None:
        from rich.text import Text

        if self.terminal:
            self.console.print(Text(text, style="dim"), highlight=False, soft_wrap=True)
        else:
            self.console.print(Text(text), highlight=False, soft_wrap=True, emoji=False)

    def _live(self):
        if self.progress is None:
            from rich.progress import Progress

            self.progress = Progress(*_columns(), console=self.console, transient=True)
            self.progress.start()
        return self.progress

    def _remove_task(self, key: str) -> None:
        task = self.tasks.pop(key, None)
        if task is not None and self.progress is not None:
            self.progress.remove_task(task)

    def stage(self, name: str, done: int = 0, total: int = 0, exclusive: bool = True) -> None:
        total = max(int(total or 0), 0)
        if self.terminal:
            if name not in self.tasks and exclusive:
                self.lines.end_stages()  # the stage before ends: its line stays, its bar goes
            progress = self._live()
            if name not in self.tasks:
                self.tasks[name] = progress.add_task(name, total=None, counts="")
            shown = counts(name, done, total) if total else ""
            progress.update(self.tasks[name], completed=done, total=total or None, counts=shown)
        self.lines.update(name, done, total, exclusive)  # ends the stage (and its bar) when done reaches total

    def message(self, text: str) -> None:
        self._write(text)

    def bar(self, key: str, description: str, done: int, total: int) -> None:
        if not self.terminal:
            self.lines.tick()
            return
        progress = self._live()
        if key not in self.tasks:
            self.tasks[key] = progress.add_task(description, total=total or None, counts="")
        progress.update(
            self.tasks[key], description=description, completed=done, total=total or None, counts=f"{done}/{total}"
        )

    def tick(self) -> None:
        self.lines.tick()

    def close(self, failed: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        self.lines.end_stages(exclusive_only=False, quiet=failed)
        if self.progress is not None:
            self.progress.stop()


def _columns():
    from rich.progress import (
        BarColumn,
        SpinnerColumn,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.table import Column
    from rich.text import Text

    class Remaining(TimeRemainingColumn):
        """Time left where the total is known; nothing for a stage of unknown size."""

        def render(self, task):
            return Text("") if task.total is None or task.time_remaining is None else super().render(task)

    return (
        SpinnerColumn(),
        TextColumn("{task.description}", table_column=Column(no_wrap=True, overflow="ellipsis", max_width=36)),
        BarColumn(bar_width=20),
        TaskProgressColumn(),
        TextColumn("{task.fields[counts]}", table_column=Column(no_wrap=True)),
        TimeElapsedColumn(),
        Remaining(),
    )


@contextmanager
def stage_progress(console, clock: Callable[[], float] = time.monotonic) -> Iterator[tuple]:
    """Yields (say, step): `say(message)` starts a stage of unknown size (loading, measuring, ...);
    `step(stage, done=0, total=0)` moves a stage (engine progress callbacks take it as it is).

    Nothing is drawn before the first stage, so a run that fails before any slow stage prints only its error;
    a stage cut short by an error leaves no "done" line."""
    reporter = Reporter(console, clock)

    def say(message: str, done: int = 0, total: int = 0) -> None:
        reporter.stage(message, done, total)

    try:
        yield say, reporter.stage
    except BaseException:
        reporter.close(failed=True)
        raise
    reporter.close()
