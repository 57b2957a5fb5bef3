"""The explorer: one screen over a step source, live (`hierui explore`) or recorded (`hierui replay`).

The app holds reactive state (the state, the records, the selected step, the settings, the header);
each panel is data-bound to what it shows and renders it. All model work (loading, stepping) runs in
thread workers that post messages (hierui.messages); one `Worker.StateChanged` handler reports any worker
failure. A restart (mode, temperature, prompt) never waits: the old run is closed without blocking and
finishes its step in flight on its own thread.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from enum import Enum
from functools import partial
from pathlib import Path

from textual import on, work
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import Container, Horizontal, Vertical, VerticalScroll
from textual.reactive import reactive
from textual.widgets import Footer, Input, ProgressBar, Static
from textual.worker import Worker, WorkerState, get_current_worker

from engine.settings import StepSettings
from hierui.messages import LoadProgress, PairReady, StepDone
from hierui.sources import RecordedRun, StepSource
from hierui.widgets.chart import SeriesChart
from hierui.widgets.continuation import Continuation
from hierui.widgets.info import InfoBar
from hierui.widgets.layers import LayerPanel
from hierui.widgets.scale import kl_legend
from hierui.widgets.spaces import SpacesPanel
from hierui.widgets.subspace import SubspacePanel
from hierui.widgets.topk import TopKTable

PairFactory = Callable[[Callable[[str, int, int], None]], object]
COMPACT_WIDTH, COMPACT_HEIGHT = 110, 34  # below either, the panels stack (hierui.tcss: -narrow, -short)


class AppState(str, Enum):
    LOADING = "loading"
    READY = "ready"
    RUNNING = "running"
    PAUSED = "paused"
    DONE = "done"
    FAILED = "failed"
    REPLAY = "replay"
    PLAYING = "playing"


class HieruiApp(App):
    TITLE = "hierui"
    CSS_PATH = "hierui.tcss"
    AUTO_FOCUS = None  # keys drive the explorer; the prompt takes focus only with `e`
    BINDINGS = [
        Binding("space", "step", "Step", tooltip="advance one token (replay: one recorded step)"),
        Binding("r", "toggle_run", "Run/Pause", tooltip="step continuously, or pause"),
        Binding("left", "scrub(-1)", "◀", tooltip="select the step before"),
        Binding("right", "scrub(1)", "▶", tooltip="select the step after"),
        Binding("home", "scrub_to(0)", "First", show=False, tooltip="select step 1"),
        Binding("end", "scrub_to(-1)", "Last", show=False, tooltip="select the newest step"),
        Binding("m", "switch_mode", "Mode", tooltip="switch shared ⇄ free, restarting from the prompt"),
        Binding("e", "edit_prompt", "Prompt", tooltip="edit the prompt; enter restarts"),
        Binding("plus,equals_sign", "temperature(1)", "T+", show=False, tooltip="raise T by 0.1, restarting"),
        Binding("minus", "temperature(-1)", "T−", show=False, tooltip="lower T by 0.1, restarting"),
        Binding(
            "s",
            "where",
            "Session file",
            tooltip="say where this run's session file is (every step is written as it is taken)",
        ),
        Binding("pagedown", "scroll_panels(1)", "Panels ↓", show=False, tooltip="scroll the panels below the texts"),
        Binding("pageup", "scroll_panels(-1)", "Panels ↑", show=False, tooltip="scroll the panels back up"),
        Binding("q", "quit", "Quit", tooltip="quit; the session file keeps every step"),
        Binding("escape", "leave_prompt", "Leave prompt", show=False, tooltip="leave the prompt unchanged"),
    ]
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (COMPACT_WIDTH, "-wide")]
    VERTICAL_BREAKPOINTS = [(0, "-short"), (COMPACT_HEIGHT, "-tall")]
    # bindings the command palette leaves out (Textual's own palette has Quit; escape belongs to the prompt)
    PALETTE_SKIP = ("quit", "leave_prompt")

    state: reactive[AppState] = reactive(AppState.LOADING)
    records: reactive[list] = reactive(list, always_update=True)
    selected: reactive[int | None] = reactive(None)
    record: reactive[dict | None] = reactive(None)
    settings: reactive[StepSettings] = reactive(StepSettings)
    header: reactive[dict] = reactive(dict)
    total: reactive[int] = reactive(0)
    status: reactive[str] = reactive("")

    def __init__(
        self,
        *,
        pair_factory: PairFactory | None = None,
        session=None,
        prompt: str = "",
        settings: StepSettings | None = None,
        session_dir: str | Path = "sessions",
        title_hint: str = "",
        autorun: bool = False,
    ):
        super().__init__()
        if (pair_factory is None) == (session is None):
            raise ValueError("give either a pair factory (explore) or a session (replay)")
        self.pair_factory = pair_factory
        self.session_dir = Path(session_dir)
        self.title_hint = title_hint
        self.autorun = autorun
        self.pair = None
        self.source: StepSource | None = RecordedRun(session) if session is not None else None
        self.prompt = session.header.get("prompt", "") if session is not None else prompt
        self.run_id = 0
        self.follow = True
        self._go = threading.Event()  # set while running continuously
        self._stage = ""  # the loading stage in progress
        self._queued = ""  # what space or r asked for while loading: done when the models are ready
        self._pending_settings = settings or StepSettings()

    # a crash inside the app (a widget raising): kept for the command's one error line (hierui.cli.run_app)
    failure: BaseException | None = None

    def _handle_exception(self, error: Exception) -> None:
        if self.failure is None:
            self.failure = error
        super()._handle_exception(error)  # the app exits, with return_code 1

    def _print_error_renderables(self) -> None:
        """Textual prints a crash's traceback after the screen closes; hierui prints one line instead
        (HIERUI_TRACEBACK=1 keeps the traceback)."""
        import os

        if os.environ.get("HIERUI_TRACEBACK"):
            super()._print_error_renderables()
        else:
            self._exit_renderables.clear()

    @property
    def replay(self) -> bool:
        return self.source is not None and not self.source.live

    @property
    def live(self):
        """The live run (hierui.live.LiveRun), or None before the models are ready and in replay."""
        return self.source if self.source is not None and self.source.live else None

    # ------------------------------------------------------------ layout

    def compose(self) -> ComposeResult:
        cls = HieruiApp
        yield InfoBar(self.title_hint, id="info").data_bind(
            cls.state, cls.header, cls.settings, cls.records, cls.selected, cls.total
        )
        with Horizontal(id="loading"):
            yield Static("", id="status")
            yield ProgressBar(id="progress", show_eta=True, show_percentage=True)
        with Horizontal(id="prompt-row"):
            yield Input(
                value=self.prompt, placeholder="prompt (e to edit, enter to restart)", id="prompt", disabled=self.replay
            )
            yield Static(kl_legend(), id="legend")
        with Horizontal(id="texts"):
            yield Continuation("d", id="dense").data_bind(cls.records, cls.selected, cls.settings, cls.header)
            yield Continuation("p", id="perturbed").data_bind(cls.records, cls.selected, cls.settings, cls.header)
        with VerticalScroll(id="panels", can_focus=False):
            with Container(id="row"):
                yield SpacesPanel(id="spaces").data_bind(cls.record)
                with Vertical(id="right"):
                    yield TopKTable(id="topk").data_bind(cls.record)
                    yield SubspacePanel(id="subspace").data_bind(cls.record, cls.settings)
                yield LayerPanel(id="layers").data_bind(cls.record)
            yield SeriesChart(id="chart").data_bind(cls.records, cls.selected)
            yield Static(kl_legend(), id="legend-below")  # the compact layout's legend, at the end of the panels
        yield Footer(compact=True)

    def on_mount(self) -> None:
        if self.replay:
            self._adopt(self.source)
            self.state = AppState.REPLAY
        else:
            self.settings = self._pending_settings
            self.total = self.settings.max_new_tokens
            self.status = "loading the model…"
            self._load_pair()

    # ------------------------------------------------------------ reactive state

    def compute_record(self) -> dict | None:
        if self.selected is None or not self.records:
            return None
        return self.records[min(self.selected, len(self.records) - 1)]

    def watch_status(self, status: str) -> None:
        self.query_one("#loading").display = bool(status)
        self.query_one("#status", Static).update(status)

    # ------------------------------------------------------------ workers

    @on(Worker.StateChanged)
    def _on_worker_state(self, event: Worker.StateChanged) -> None:
        """Every worker failure lands here: none is silent."""
        if event.state != WorkerState.ERROR:
            return
        from engine.errors import one_line

        text = one_line(event.worker.error)
        self._go.clear()
        self.state = AppState.FAILED
        title = "loading failed" if event.worker.group == "load" else "stepping failed"
        if event.worker.group == "load":
            self.status = f"error: {text}"
        self.notify(text, title=title, severity="error", timeout=30)

    @work(thread=True, exclusive=True, group="load", exit_on_error=False)
    def _load_pair(self) -> None:
        pair = self.pair_factory(lambda stage, done=0, total=0: self.post_message(LoadProgress(stage, done, total)))
        self.post_message(PairReady(pair))

    @on(LoadProgress)
    def _on_load_progress(self, message: LoadProgress) -> None:
        bar = self.query_one("#progress", ProgressBar)
        if message.stage != self._stage:  # a new stage: its own bar, percentage and ETA
            self._stage = message.stage
            bar.update(total=None, progress=0)
        self.status = f"{message.stage}…" + (f" ({self._queued})" if self._queued else "")
        if message.total > 0:
            bar.update(total=message.total, progress=message.done)

    @on(PairReady)
    def _on_pair_ready(self, message: PairReady) -> None:
        self.pair = message.pair
        self.status = ""
        self._new_run(self.settings)
        queued, self._queued = self._queued, ""
        if self.autorun or queued == "will run when ready":
            self.action_toggle_run()
        elif queued == "will step when ready":
            self.action_step()

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

    @on(StepDone)
    def _on_step(self, message: StepDone) -> None:
        if message.run != self.run_id:
            return  # a step of a run that was restarted
        self.records = [*self.records, message.record]
        if self.follow:
            self.selected = len(self.records) - 1
        if message.finished:
            self._go.clear()
            self.state = AppState.REPLAY if self.replay else AppState.DONE
        elif not self._go.is_set():
            self.state = AppState.REPLAY if self.replay else AppState.PAUSED

    # ------------------------------------------------------------ runs

    def _adopt(self, source: StepSource) -> None:
        """Show `source` from now on: its header, settings, records and notes."""
        self.run_id += 1
        self.source = source
        self.header = dict(source.header)
        self.settings = source.settings
        self.total = source.total
        self.records = list(source.records)
        self.selected = len(self.records) - 1 if self.records else None
        self.follow = True
        for note in source.notes:
            self.notify(note, severity="warning", timeout=10)

    def _new_run(self, settings: StepSettings) -> None:
        """Close the current live run (never waiting for a step in flight) and start a fresh one."""
        from engine.errors import HieruiError
        from hierui.live import LiveRun

        self._go.clear()
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

    # ------------------------------------------------------------ actions

    def _queue(self, what: str) -> bool:
        """While the models load, remember a step or a run for when they are ready, and say so."""
        if self.source is not None or self.state != AppState.LOADING:
            return False
        self._queued = "" if self._queued == what else what  # pressing it again cancels
        self.notify(f"the models are loading: {what}" if self._queued else "cancelled: will wait when ready")
        self.status = f"{self._stage or 'loading'}…" + (f" ({self._queued})" if self._queued else "")
        return True

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

    @on(Input.Submitted, "#prompt")
    def _on_prompt(self, event: Input.Submitted) -> None:
        self.prompt = event.value
        self.set_focus(None)
        if self.pair is not None:
            self._new_run(self.settings)

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
        if self.source is not None:
            self.source.close()  # a step in flight finishes and closes the session on its own thread
        self.exit()

    def _refuse_in_replay(self, what: str) -> bool:
        if self.replay:
            self.notify(f"replay shows a recorded session: cannot {what}", severity="warning")
        return self.replay

    def get_system_commands(self, screen):
        """Textual's own commands, then one per key binding (its description and tooltip)."""
        yield from super().get_system_commands(screen)
        for binding in self.BINDINGS:
            if binding.action.split("(")[0] in self.PALETTE_SKIP:
                continue
            yield SystemCommand(binding.description, binding.tooltip, partial(self.run_action, binding.action))
