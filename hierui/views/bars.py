"""`hierui batch`'s progress on stderr while it runs: BatchBars for a local sweep, RayBars for one on Ray."""

from __future__ import annotations

from rich.console import Console


class BatchBars:
    """The progress hooks of engine.sweep.runner.run_sweep on stderr, through hierui.progress.Reporter: the runs of
    the sweep, the tokens of the current batch of runs, and the slow stages (loading, calibrating, pruning)
    while they last. In a terminal: rich bars with percentage and time left; redirected: plain lines (a line
    per stage start and end, about every 10% or 30 s of the runs, never a control character)."""

    def __init__(self, target: Console, clock=None, terminal: bool | None = None):
        import time

        from hierui.progress import Reporter

        self.reporter = Reporter(target, clock or time.monotonic, terminal)
        self.runs_done = self.runs_total = 0
        self.tokens_done = self.tokens_total = 0
        self.tokens_label = ""

    def sweep_started(self, total: int, done: int) -> None:
        self.runs_done, self.runs_total = done, total
        if done < total:  # a sweep that is complete already has nothing to show
            self.reporter.stage("runs", done, total, exclusive=False)

    def message(self, text: str, done: int = 0, total: int = 0) -> None:
        """A note; with counts (a model being fetched or converted) a stage of its own."""
        if total > 0:
            self.stage(text, done, total)
        else:
            self.reporter.message(text)

    def stage(self, stage: str, done: int, total: int) -> None:
        self.reporter.stage(stage, done, total)  # a new stage ends the one before (calibrating, then pruning)

    def run_started(self, run, max_tokens: int) -> None:
        self.batch_started([run], max_tokens)

    def batch_started(self, runs, max_tokens: int) -> None:
        self.reporter.lines.end_stages()  # the slow stages are over once a batch steps
        more = f" +{len(runs) - 1}" if len(runs) > 1 else ""
        self.tokens_label, self.tokens_done, self.tokens_total = f"{runs[0].run_id}{more}", 0, max_tokens
        self.reporter.bar("tokens", self.tokens_label, 0, max_tokens)

    def step(self, run, record: dict) -> None:
        self.tokens_done += 1
        self.reporter.bar("tokens", self.tokens_label, self.tokens_done, self.tokens_total)

    def run_finished(self, run) -> None:
        self.runs_done += 1
        self.reporter.stage("runs", self.runs_done, self.runs_total, exclusive=False)

    def close(self, failed: bool | None = None) -> None:
        """Ends the bars; a stage cut short by an error or Ctrl-C (`failed`, by default: an exception is being
        handled) leaves no end line."""
        import sys

        self.reporter.close(sys.exc_info()[1] is not None if failed is None else failed)


class RayBars(BatchBars):
    """BatchBars for a sweep on Ray (engine.sweep.distributed.RayHooks): the runs of the sweep with the time left, and
    a line per worker with its state (perturbing, stepping, idle, restarting, dead), its spec and its runs done.
    Without a terminal, a line when a worker starts perturbing a spec, is restarted or given up."""

    def __init__(self, target: Console, clock=None, terminal: bool | None = None):
        super().__init__(target, clock, terminal)
        self.workers: dict[str, tuple] = {}

    def worker_state(self, worker: str, state: str, spec: str | None, runs_done: int) -> None:
        key = (state, spec, runs_done)
        if self.workers.get(worker) == key:
            return
        before = self.workers.get(worker)
        self.workers[worker] = key
        about = f"{state}" + (f" {spec}" if spec else "")
        if self.reporter.terminal:
            self.reporter.bar(f"worker {worker}", f"{worker}: {about}", runs_done, self.runs_total)
        elif (state in ("perturbing", "restarting", "dead") or state.startswith("restarted")) and (
            before is None or before[:2] != key[:2]
        ):
            self.reporter.message(f"{worker}: {about} ({runs_done} runs done)")

    def tick(self) -> None:
        self.reporter.tick()
