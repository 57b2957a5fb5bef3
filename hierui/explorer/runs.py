"""The explorer's runs: showing a step source, starting a fresh live run, and the keys that step, run, scrub,
restart (mode, temperature, prompt), say where the session file is and quit."""

from __future__ import annotations

from textual.containers import VerticalScroll
from textual.widgets import ContentSwitcher, Input

from engine.record.settings import StepSettings
from hierui.explorer.sources import StepSource
from hierui.explorer.state import AppState
from hierui.explorer.texts import branch_lead, recorded_counterfactual
from hierui.explorer.widgets.attribution import AttributionPanel
from hierui.explorer.widgets.heatmap import HeatmapPanel


class RunActions:
    """Mixed into hierui.explorer.app.HieruiApp: sets its reactive state (source, header, settings, records,
    selected, state) and starts its step worker (hierui.explorer.workers)."""

    def _adopt(self, source: StepSource, notes: bool = True, lead: tuple = ()) -> None:
        """Show `source` from now on: its header, settings, records and notes (a branch: the text it continues)."""
        self.run_id += 1
        self.source = source
        self.header = source.header
        self.settings = source.settings
        self.total = source.total
        self.lead = lead or branch_lead(self.header)
        self.records = list(source.records)
        self.selected = len(self.records) - 1 if self.records else None
        self.follow = True
        self.query_one("#switch", ContentSwitcher).current = "chart"
        self.query_one("#attribution", AttributionPanel).note("")
        self._show_counterfactual(recorded_counterfactual(source))
        self.refresh_bindings()
        self.query_one("#heatmap", HeatmapPanel).live = source.live
        for note in source.notes if notes else []:
            self.notify(note, severity="warning", timeout=10)
        self._lens_behind()  # a run shown again (a parent) may have steps whose lens is still to compute

    def _new_run(self, settings: StepSettings) -> None:
        """Close the current live run (never waiting for a step in flight) and start a fresh one."""
        from engine.errors import HieruiError
        from hierui.explorer.live import LiveRun

        self._go.clear()
        self._close_parents()
        self._attributions.clear()
        if self.source is not None:
            self.source.close()
        try:
            run = LiveRun(self.pair, self.prompt, settings, self.session_dir)
        except HieruiError as e:
            self.source = None
            self.state = AppState.FAILED
            self.notify(str(e), title="cannot start", severity="error", timeout=30)
            return
        self._adopt(run)
        self.state = AppState.READY

    def _close_parents(self) -> None:
        while self._parents:
            self._parents.pop()[0].close()

    def _queue(self, what: str) -> bool:
        """While the models load, remember a step or a run for when they are ready, and say so."""
        if self.source is not None or self.state != AppState.LOADING:
            return False
        self._queued = "" if self._queued == what else what  # pressing it again cancels
        self.notify(f"the models are loading: {what}" if self._queued else "cancelled: will wait when ready")
        self.status = f"{self._stage or 'loading'}…" + (f" ({self._queued})" if self._queued else "")
        return True

    def _pause(self, why: str) -> None:
        if self._go.is_set():
            self._go.clear()
            self.state = AppState.PAUSED
            self.notify(f"paused to {why}")

    def _refuse_in_replay(self, what: str) -> bool:
        if self.replay:
            self.notify(f"replay shows a recorded session: cannot {what}", severity="warning")
        return self.replay

    # ------------------------------------------------------------ stepping and running

    def action_step(self) -> None:
        if self._queue("will step when ready") or self.source is None:
            return
        if self._go.is_set():  # step while running = pause
            self.action_toggle_run()
            return
        if self.source.finished:
            what = "the end of the recording" if self.replay else "the end of this run"
            self.notify(f"at {what}: r plays it again" if self.replay else f"at {what}: e or m starts another")
            return
        self.follow = True
        self._stepping(self.source, self.run_id, 1)

    def action_toggle_run(self) -> None:
        if self._queue("will run when ready") or self.source is None:
            return
        if self._go.is_set():
            self._go.clear()
            self.state = AppState.REPLAY if self.replay else AppState.PAUSED
            return
        if self.source.finished:
            if not self.replay:
                return
            self.source.rewind()  # play the recording again from the start
            self.records = []
            self.selected = None
        self._go.set()
        self.follow = True
        self.state = AppState.PLAYING if self.replay else AppState.RUNNING
        self._stepping(self.source, self.run_id, None)

    # ------------------------------------------------------------ the selection

    def action_scroll_panels(self, direction: int) -> None:
        panels = self.query_one("#panels", VerticalScroll)
        panels.scroll_page_down() if direction > 0 else panels.scroll_page_up()

    def action_scrub(self, delta: int) -> None:
        if not self.records:
            return
        current = len(self.records) - 1 if self.selected is None else self.selected
        self.selected = max(0, min(len(self.records) - 1, current + delta))
        self.follow = self.selected == len(self.records) - 1

    def action_scrub_to(self, index: int) -> None:
        if not self.records:
            return
        self.selected = len(self.records) - 1 if index < 0 else min(index, len(self.records) - 1)
        self.follow = self.selected == len(self.records) - 1

    # ------------------------------------------------------------ restarts: mode, prompt, temperature

    def action_switch_mode(self) -> None:
        if self._refuse_in_replay("switch mode") or self.pair is None:
            return
        settings = self.settings.other_mode()
        self.notify(f"mode: {settings.mode} (restarted from the prompt)")
        self._new_run(settings)

    def action_edit_prompt(self) -> None:
        if self._refuse_in_replay("edit the prompt"):
            return
        self.query_one("#prompt", Input).focus()

    def action_leave_prompt(self) -> None:
        prompt = self.query_one("#prompt", Input)
        if prompt.has_focus:
            prompt.value = self.prompt
            self.set_focus(None)

    def action_temperature(self, direction: int) -> None:
        if self._refuse_in_replay("change the temperature") or self.pair is None:
            return
        settings = self.settings.nudged_temperature(direction)
        self.notify(f"temperature {settings.temperature:g} (restarted from the prompt)")
        self._new_run(settings)

    # ------------------------------------------------------------ the session file, quitting

    def action_where(self) -> None:
        if self.replay:
            self.notify(f"replaying {self.source.path}")
        elif self.live is None or not self.live.written:
            self.notify(
                "nothing recorded yet: step first (every step is written to the session file as it is taken)",
                severity="warning",
            )
        else:
            self.notify(f"session file: {self.live.path} ({len(self.records)} steps, written as taken)")

    async def action_quit(self) -> None:
        self._go.clear()
        self._close_parents()
        if self.source is not None:
            self.source.close()  # a step in flight finishes and closes the session on its own thread
        self.exit()
