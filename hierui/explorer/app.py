"""The explorer: one screen over a step source, live (`hierui explore`) or recorded (`hierui replay`).

The app holds reactive state (the state, the records, the selected step, the settings, the header);
each panel is data-bound to what it shows and renders it. This module is its table of contents: the keys,
the layout and the message handlers; the work is elsewhere in hierui.explorer: the thread workers (loading,
stepping, the lens behind the stepping, attributing: workers) post messages (messages), the runs and their keys
(runs), where it breaks (breaks), the texts around the continuations (texts). One `Worker.StateChanged` handler
reports any worker failure. A restart (mode, temperature, prompt) never waits: the old run is closed without
blocking and finishes its step in flight on its own thread.

The logit lens of a live run with the lens "all" is computed behind the stepping by its own worker (group
"lens"), started when a step arrives and none is running for the run shown; it takes the selected step first
and ends when no step is pending. Each LensDone is merged into its step's record (a new record and list, so the
panels refresh); one of a run no longer shown is ignored (its run id), and a step not shown yet gets its values
from the run when it arrives (LiveRun.with_lens).

Where it breaks (docs/design.md): the layer × step map of the logit lens (`v` switches lens KL ⇄ dense
final KL); `a` attributes the selected step by patching, in a worker, the result replacing the chart until
`a` again; `b` branches from a top-k alternative of the selected step into a new run and session linked to
its parent (`u` goes back to the parent, which was kept open); with `--counterfactual` a finished free run
shows its counterfactual branch under the texts (the recorder steps it with the run's last step).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from functools import partial
from pathlib import Path

from textual import on
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import Container, Horizontal, Vertical, VerticalScroll
from textual.reactive import reactive
from textual.widgets import ContentSwitcher, Footer, Input, ProgressBar, Static
from textual.worker import Worker, WorkerState

from engine.record.header import SessionHeader, header_of
from engine.record.settings import StepSettings
from hierui.explorer.breaks import BreakActions
from hierui.explorer.messages import AttributionDone, LensDone, LoadProgress, PairReady, StepDone
from hierui.explorer.runs import RunActions
from hierui.explorer.sources import RecordedRun, StepSource
from hierui.explorer.state import AppState
from hierui.explorer.texts import counterfactual_line
from hierui.explorer.widgets.attribution import AttributionPanel
from hierui.explorer.widgets.chart import SeriesChart
from hierui.explorer.widgets.continuation import Continuation
from hierui.explorer.widgets.heatmap import HeatmapPanel
from hierui.explorer.widgets.info import InfoBar
from hierui.explorer.widgets.layers import LayerPanel
from hierui.explorer.widgets.scale import kl_legend
from hierui.explorer.widgets.spaces import SpacesPanel
from hierui.explorer.widgets.subspace import SubspacePanel
from hierui.explorer.widgets.topk import TopKTable
from hierui.explorer.workers import Workers

PairFactory = Callable[[Callable[[str, int, int], None]], object]
COMPACT_WIDTH, COMPACT_HEIGHT = 110, 34  # below either, the panels stack (hierui.tcss: -narrow, -short)


class HieruiApp(RunActions, BreakActions, Workers, App):
    """The explorer's screen: its keys, layout, reactive state and message handlers. The key actions come from
    RunActions (hierui.explorer.runs) and BreakActions (hierui.explorer.breaks), the thread workers from Workers
    (hierui.explorer.workers)."""

    TITLE = "hierui"
    CSS_PATH = "hierui.tcss"
    AUTO_FOCUS = None  # keys drive the explorer; the prompt takes focus only with `e`
    BINDINGS = [
        Binding("space", "step", "Step", tooltip="advance one token (replay: one recorded step)"),
        Binding("r", "toggle_run", "Run", tooltip="step continuously, or pause"),
        Binding("left", "scrub(-1)", "◀", tooltip="select the step before"),
        Binding("right", "scrub(1)", "▶", tooltip="select the step after"),
        Binding(
            "a",
            "attribute",
            "Attribute",
            tooltip="attribute the selected step: patch each sublayer's dense output into the perturbed model "
            "and rank the units by the KL they remove (a again: back to the chart)",
        ),
        Binding(
            "b",
            "branch",
            "Branch",
            tooltip="pick a top-k alternative at the selected step and continue from it: a new run and session",
        ),
        Binding("u", "parent", "Parent", tooltip="leave this branch: back to the run it branched from"),
        Binding(
            "v",
            "heat_view",
            "Map: lens ⇄ final",
            show=False,
            tooltip="the layer × step map: KL between the two lenses per layer ⇄ KL from the dense final output",
        ),
        Binding("home", "scrub_to(0)", "First", show=False, tooltip="select step 1"),
        Binding("end", "scrub_to(-1)", "Last", show=False, tooltip="select the newest step"),
        Binding("m", "switch_mode", "Mode", tooltip="switch shared ⇄ free, restarting from the prompt"),
        Binding("e", "edit_prompt", "Prompt", show=False, tooltip="edit the prompt; enter restarts"),
        Binding("plus,equals_sign", "temperature(1)", "T+", show=False, tooltip="raise T by 0.1, restarting"),
        Binding("minus", "temperature(-1)", "T−", show=False, tooltip="lower T by 0.1, restarting"),
        Binding(
            "s",
            "where",
            "Session file",
            show=False,
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
    header: reactive[SessionHeader] = reactive(SessionHeader)
    total: reactive[int] = reactive(0)
    status: reactive[str] = reactive("")
    lead: reactive[tuple] = reactive(tuple)  # a branch: (the context's text before it, the chosen token's text)
    validate_header = staticmethod(header_of)  # a source's header given as a dict is read as a SessionHeader

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
        self.prompt = (session.header.prompt or "") if session is not None else prompt
        self.run_id = 0
        self.follow = True
        self._go = threading.Event()  # set while running continuously
        self._stage = ""  # the loading stage in progress
        self._queued = ""  # what space or r asked for while loading: done when the models are ready
        self._pending_settings = settings or StepSettings()
        self._parents: list[tuple[StepSource, int | None, tuple]] = []  # the runs branched from: (run, step, lead)
        # (id of the run, step) → (the run, its attribution): kept while the run is open, a parent's too
        self._attributions: dict[tuple[int, int], tuple[object, object]] = {}
        self._lens_worker: tuple[object, Worker] | None = None  # (the run, its lens worker) last started

    # a crash inside the app (a widget raising): kept for the command's one error line (hierui.cli.launch.run_app)
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
        """The live run (hierui.explorer.live.LiveRun), or None before the models are ready and in replay."""
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
            yield Continuation("d", id="dense").data_bind(cls.records, cls.selected, cls.settings, cls.header, cls.lead)
            yield Continuation("p", id="perturbed").data_bind(
                cls.records, cls.selected, cls.settings, cls.header, cls.lead
            )
        yield Static("", id="counterfactual")
        with VerticalScroll(id="panels", can_focus=False):
            with Container(id="row"):
                yield SpacesPanel(id="spaces").data_bind(cls.record)
                with Vertical(id="right"):
                    yield TopKTable(id="topk").data_bind(cls.record)
                    yield SubspacePanel(id="subspace").data_bind(cls.record, cls.settings)
                yield LayerPanel(id="layers").data_bind(cls.record)
            with Container(id="lower"):
                yield HeatmapPanel(id="heatmap").data_bind(cls.records, cls.selected, cls.header)
                with ContentSwitcher(initial="chart", id="switch"):
                    yield SeriesChart(id="chart").data_bind(cls.records, cls.selected)
                    yield AttributionPanel(id="attribution")
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

    # ------------------------------------------------------------ messages

    @on(Worker.StateChanged)
    def _on_worker_state(self, event: Worker.StateChanged) -> None:
        """Every worker failure lands here: none is silent. A lens worker that ended looks again for pending steps
        (a step may have arrived as it was ending)."""
        group = event.worker.group
        if group == "lens" and event.state == WorkerState.SUCCESS:
            self._lens_behind()
        if event.state != WorkerState.ERROR:
            return
        from engine.errors import one_line

        text = one_line(event.worker.error)
        if group == "lens":  # the steps go on; the map keeps the steps not computed as pending
            self.notify(text, title="logit lens failed", severity="error", timeout=30)
            return
        if group == "attribute":  # the run itself is fine: say so in the panel, and once as a notice
            self.query_one("#attribution", AttributionPanel).note(f"attribution failed: {text}", title="attribution")
            self.notify(text, title="attribution failed", severity="error", timeout=30)
            return
        self._go.clear()
        self.state = AppState.FAILED
        title = "loading failed" if group == "load" else "stepping failed"
        if group == "load":
            self.status = f"error: {text}"
        self.notify(text, title=title, severity="error", timeout=30)

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

    @on(StepDone)
    def _on_step(self, message: StepDone) -> None:
        if message.run != self.run_id:
            return  # a step of a run that was restarted
        live = self.live
        record = live.with_lens(message.record) if live is not None and live.lens_later else message.record
        self.records = [*self.records, record]
        if self.follow:
            self.selected = len(self.records) - 1
        self._lens_behind()
        if message.finished:
            self._go.clear()
            self.state = AppState.REPLAY if self.replay else AppState.DONE
            if self.live is not None and self.settings.counterfactual and self.settings.mode == "free":
                # the recorder stepped the branch with the run's last step (engine.run.recorder.SessionRecorder)
                self._show_counterfactual(counterfactual_line(self.live.recorder.branches[0]))
        elif not self._go.is_set():
            self.state = AppState.REPLAY if self.replay else AppState.PAUSED

    @on(LensDone)
    def _on_lens(self, message: LensDone) -> None:
        if message.run != self.run_id or message.step >= len(self.records):
            return  # a run no longer shown; a step not shown yet (its StepDone brings the values)
        records = list(self.records)
        records[message.step] = {**records[message.step], **message.values}
        self.records = records

    def _lens_behind(self) -> None:
        """Start the lens worker for the live run shown where it has pending steps and none runs for it."""
        live = self.live
        if live is None or not live.lens_later:
            return
        if self._lens_worker is not None:
            run, worker = self._lens_worker
            if run is live and not worker.is_finished:
                return
        if live.lens_pending():
            self._lens_worker = (live, self._computing_lens(live, self.run_id))

    @on(AttributionDone)
    def _on_attribution(self, message: AttributionDone) -> None:
        self._attributions[(id(message.source), message.step)] = (message.source, message.result)
        if message.run != self.run_id:
            return
        panel = self.query_one("#attribution", AttributionPanel)
        if panel.step == message.step:
            panel.show_result(message.step, message.result, self.records[message.step])

    @on(Input.Submitted, "#prompt")
    def _on_prompt(self, event: Input.Submitted) -> None:
        self.prompt = event.value
        self.set_focus(None)
        if self.pair is not None:
            self._new_run(self.settings)

    # ------------------------------------------------------------ the keys shown and the command palette

    def check_action(self, action: str, parameters: tuple) -> bool | None:
        if action == "parent":
            return bool(self._parents)  # shown (and active) in a branch only
        return True

    def get_system_commands(self, screen):
        """Textual's own commands, then one per key binding (its description and tooltip)."""
        yield from super().get_system_commands(screen)
        for binding in self.BINDINGS:
            if binding.action.split("(")[0] in self.PALETTE_SKIP:
                continue
            yield SystemCommand(binding.description, binding.tooltip, partial(self.run_action, binding.action))
