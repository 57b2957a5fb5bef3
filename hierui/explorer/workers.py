"""The explorer's thread workers: loading the pair, stepping a source, computing the logit lens behind the
stepping, attributing a step. Each runs off the UI thread and only posts messages (hierui.explorer.messages); a
failure reaches the app's `Worker.StateChanged` handler, by the worker's group."""

from __future__ import annotations

import time

from textual import work
from textual.worker import get_current_worker

from hierui.explorer.messages import AttributionDone, LensDone, LoadProgress, PairReady, StepDone
from hierui.explorer.sources import StepSource


class Workers:
    """Mixed into hierui.explorer.app.HieruiApp: reads its `pair_factory`, `pair`, `_go` (set while running), and for
    the lens worker `source`, `selected` and `follow`."""

    @work(thread=True, exclusive=True, group="load", exit_on_error=False)
    def _load_pair(self) -> None:
        pair = self.pair_factory(lambda stage, done=0, total=0: self.post_message(LoadProgress(stage, done, total)))
        self.post_message(PairReady(pair))

    @work(thread=True, exclusive=True, group="step", exit_on_error=False)
    def _stepping(self, source: StepSource, run_id: int, count: int | None) -> None:
        """Step `source` `count` times (None: until paused or finished), posting each record."""
        worker = get_current_worker()
        done = 0
        while not source.finished and not worker.is_cancelled:
            if count is not None and done >= count:
                break
            if count is None and not self._go.is_set():
                break
            if count is None and done and source.pace:
                time.sleep(source.pace)
            record = source.step()
            if record is None:
                break
            done += 1
            self.post_message(StepDone(run_id, record, source.finished))

    @work(thread=True, exclusive=True, group="lens", exit_on_error=False)
    def _computing_lens(self, source, run_id: int) -> None:
        """Compute the lens of the live run `source`'s pending steps (hierui.explorer.live.LiveRun.compute_lens):
        the selected step first while it is pending, else the oldest; a LensDone for each. While the run runs
        with the selection following its newest step, the oldest first: the newest is selected by default then,
        and taking it first left holes behind the loop (filled only once it stopped). Ends when none is pending
        (the app starts it again when a step arrives) or when cancelled (another run shown, quit)."""
        worker = get_current_worker()
        tried: set[int] = set()  # each step once, even where there was nothing to compute
        while not worker.is_cancelled:
            pending = [step for step in source.lens_pending() if step not in tried]
            if not pending:
                return
            chosen = self.source is source and not (self.follow and self._go.is_set())
            selected = self.selected if chosen else None
            step = selected if selected in pending else pending[0]
            tried.add(step)
            values = source.compute_lens(step)
            if values is not None:
                self.post_message(LensDone(run_id, step, values))

    @work(thread=True, group="attribute", exit_on_error=False)
    def _attribute(self, source, run_id: int, step: int) -> None:
        """Attribute step `step` of the live run `source` by patching (engine.run.attribution)."""
        from engine.run.attribution import attribute, context_at
        from hierui.explorer.live import MODEL_LOCK

        context = context_at(source.header, source.records, step)
        with MODEL_LOCK:  # never while a step runs: both hook the same modules
            result = attribute(self.pair, context, source.settings.temperature)
        self.post_message(AttributionDone(run_id, step, result, source))
