"""Rich progress for slow engine stages (fetching, calibrating, pruning), as engine callbacks."""

from __future__ import annotations

from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn


@contextmanager
def stage_progress(console: Console):
    """Yields (say, step): `say(msg)` prints a status line; `step(stage, done, total)` drives a bar per stage.

    The bars start with the first `step`, so a run that fails before any slow stage prints only its error.
    """
    progress = Progress(
        SpinnerColumn(),
        TextColumn("{task.description:<12}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )
    tasks: dict[str, int] = {}

    def say(message: str) -> None:
        console.print(f"[dim]{message}[/]", highlight=False)

    def step(stage: str, done: int, total: int) -> None:
        if total <= 0:
            say(stage)
            return
        if not tasks:
            progress.start()
        if stage not in tasks:
            tasks[stage] = progress.add_task(stage, total=total)
        progress.update(tasks[stage], completed=done, total=total)

    try:
        yield say, step
    finally:
        if tasks:
            progress.stop()
