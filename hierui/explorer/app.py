"""The explorer: one screen over a step source, live (`hierui explore`) or recorded (`hierui replay`).

The app holds reactive state (the state, the records, the selected step, the settings, the header);
each panel is data-bound to what it shows and renders it. All model work (loading, stepping) runs in
thread workers that post messages (hierui.explorer.messages); one `Worker.StateChanged` handler reports any worker
failure. A restart (mode, temperature, prompt) never waits: the old run is closed without blocking and
finishes its step in flight on its own thread.

Where it breaks (docs/design.md): the layer × step map of the logit lens (`v` switches lens KL ⇄ dense
final KL); `a` attributes the selected step by patching, in a worker, the result replacing the chart until
`a` again; `b` branches from a top-k alternative of the selected step into a new run and session linked to
its parent (`u` goes back to the parent, which was kept open); with `--counterfactual` a finished free run
shows its counterfactual branch under the texts.
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
from textual.widgets import ContentSwitcher, Footer, Input, ProgressBar, Static
from textual.worker import Worker, WorkerState, get_current_worker

from engine.record.branches import branch_prefix
from engine.record.header import SessionHeader, header_of
from engine.record.settings import StepSettings
from hierui.explorer.messages import AttributionDone, CounterfactualDone, LoadProgress, PairReady, StepDone
from hierui.explorer.sources import RecordedRun, StepSource
from hierui.explorer.widgets.attribution import AttributionPanel
from hierui.explorer.widgets.branch import BranchChooser
from hierui.explorer.widgets.chart import SeriesChart
from hierui.explorer.widgets.continuation import Continuation
from hierui.explorer.widgets.heatmap import HeatmapPanel
from hierui.explorer.widgets.info import InfoBar
from hierui.explorer.widgets.layers import LayerPanel
from hierui.explorer.widgets.scale import kl_legend
from hierui.explorer.widgets.spaces import SpacesPanel
from hierui.explorer.widgets.subspace import SubspacePanel
from hierui.explorer.widgets.topk import TopKTable
from hierui.format import step_label
from hierui.tokentext import cell

PairFactory = Callable[[Callable[[str, int, int], None]], object]
COMPACT_WIDTH, COMPACT_HEIGHT = 110, 34  # below either, the panels stack (hierui.tcss: -narrow, -short)


def fed_text(records: list[dict]) -> str:
    """The text the perturbed model was fed over `records` (its own picks in free mode, the dense ones in shared)."""
    out = []
    for r in records:
        fed = (r.get("fed") or [None, None])[1]
        out.append(r.get("text_d", "") if fed == r.get("token_d") else r.get("text_p", ""))
    return "".join(out)


def branch_lead(header: SessionHeader, depth: int = 0) -> tuple:
    """A branch session's (context text before the chosen token, the chosen token's text), read from its parent
    session's file where that is still there (a branch of a branch: its parents' too); () for no branch."""
    parent = header.parent
    if parent is None:
        return ()
    chosen = parent.text or ""
    before = "… "
    if depth < 8 and parent.session is not None and parent.step is not None:
        from engine.errors import HieruiError
        from engine.record.session import load_session

        try:
            session = load_session(parent.session)
        except (HieruiError, OSError):
            session = None
        if session is not None:
            lead = branch_lead(session.header, depth + 1)
            before = (lead[0] + lead[1] if lead else "") + fed_text(session.steps[: parent.step])
    return before, chosen


def counterfactual_line(branch) -> str:
    """A counterfactual branch (engine.record.branches.Branch) as the line under the texts: the dense token fed
    where the texts split, the perturbed model's text from there on, and whether it came back to the dense text."""
    from hierui.tokentext import clip, escape

    if branch is None:
        return "⑂ counterfactual: the two texts never split, nothing to branch"
    steps = branch.steps or []
    if branch.recovered is None:
        verdict = "nothing left to compare"
    elif branch.recovered:
        k = branch.recovery_steps or 0
        verdict = "recovered at once" if k == 0 else f"recovered after {k} step{'s' if k != 1 else ''}"
    else:
        verdict = f"did not recover in {len(steps)} steps"
    text = clip(escape("".join(s.get("text_p") or "" for s in steps)), 160)
    return (
        f"⑂ counterfactual: fed the dense token {cell(branch.text)} at step {step_label(branch.at)}, the perturbed "
        f"model went on “{text}” — {verdict}"
    )


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

    # ------------------------------------------------------------ workers

    @on(Worker.StateChanged)
    def _on_worker_state(self, event: Worker.StateChanged) -> None:
        """Every worker failure lands here: none is silent."""
        if event.state != WorkerState.ERROR:
            return
        from engine.errors import one_line

        text = one_line(event.worker.error)
        group = event.worker.group
        if group == "attribute":  # the run itself is fine: say so in the panel, and once as a notice
            self.query_one("#attribution", AttributionPanel).note(f"attribution failed: {text}", title="attribution")
            self.notify(text, title="attribution failed", severity="error", timeout=30)
            return
        if group == "counterfactual":
            self._show_counterfactual(f"counterfactual branch failed: {text}")
            self.notify(text, title="counterfactual branch failed", severity="error", timeout=30)
            return
        self._go.clear()
        self.state = AppState.FAILED
        title = "loading failed" if group == "load" else "stepping failed"
        if group == "load":
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
            if self.live is not None and self.settings.counterfactual and self.settings.mode == "free":
                self._show_counterfactual("⑂ counterfactual: feeding the dense token where the texts split…")
                self._counterfactual(self.live, self.run_id)
        elif not self._go.is_set():
            self.state = AppState.REPLAY if self.replay else AppState.PAUSED

    # ------------------------------------------------------------ runs

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
        self._show_counterfactual(self._recorded_counterfactual(source))
        self.refresh_bindings()
        for note in source.notes if notes else []:
            self.notify(note, severity="warning", timeout=10)

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
        self._close_parents()
        if self.source is not None:
            self.source.close()  # a step in flight finishes and closes the session on its own thread
        self.exit()

    def check_action(self, action: str, parameters: tuple) -> bool | None:
        if action == "parent":
            return bool(self._parents)  # shown (and active) in a branch only
        return True

    # ------------------------------------------------------------ where it breaks: map, attribution

    def action_heat_view(self) -> None:
        heatmap = self.query_one("#heatmap", HeatmapPanel)
        heatmap.toggle()
        self.call_after_refresh(heatmap.scroll_visible, top=True, animate=False)

    def _selected_record(self, what: str) -> dict | None:
        """The selected step's record, or None after saying why there is none."""
        if self.selected is None or not self.records:
            self.notify(f"no step selected: step first, then {what}", severity="warning")
            return None
        return self.records[min(self.selected, len(self.records) - 1)]

    def _needs_models(self, what: str) -> bool:
        """Refuse (one line) where the models are not there: a replay, or while they load."""
        if self.replay:
            spec, model = self.header.perturbation.spec or "SPEC", self.header.model or "MODEL"
            self.notify(
                f"{what} needs the models, and a replay loads none: explore this prompt live "
                f"(hierui explore --model {model} --prune {spec}) and press the key there",
                severity="warning",
                timeout=12,
            )
            return True
        if self.pair is None or self.live is None:
            self.notify(f"{what} needs the models: they are not ready yet", severity="warning")
            return True
        return False

    def _pause(self, why: str) -> None:
        if self._go.is_set():
            self._go.clear()
            self.state = AppState.PAUSED
            self.notify(f"paused to {why}")

    def action_attribute(self) -> None:
        panel = self.query_one("#attribution", AttributionPanel)
        switch = self.query_one("#switch", ContentSwitcher)
        step = self.selected
        if switch.current == "attribution" and panel.step == step and step is not None:
            switch.current = "chart"  # a again on the step shown: back to the chart
            return
        if self._needs_models("attribution") or self._selected_record("attribute it") is None:
            return
        from engine.run.attribution import same_context

        record = self.records[step]
        switch.current = "attribution"
        cached = self._attributions.get((id(self.source), step))
        if cached is not None and cached[0] is self.source:
            panel.show_result(step, cached[1], record)
        else:
            if record.get("kl") is None:
                panel.note(f"step {step_label(step)} compares nothing (a model had ended): nothing to attribute", step)
                return
            if not same_context(self.records, step):
                self.notify(
                    "the texts split before this step: both models are given the perturbed model's context",
                    severity="warning",
                )
            self._pause("attribute")
            self.follow = False  # a step in flight lands without moving the selection off the attributed one
            panel.running(step)
            self._attribute(self.live, self.run_id, step)
        self.call_after_refresh(switch.scroll_visible, top=True, animate=False)  # the compact layout scrolls

    @work(thread=True, group="attribute", exit_on_error=False)
    def _attribute(self, source, run_id: int, step: int) -> None:
        from engine.run.attribution import attribute, context_at
        from hierui.explorer.live import MODEL_LOCK

        context = context_at(source.header, source.records, step)
        with MODEL_LOCK:  # never while a step runs: both hook the same modules
            result = attribute(self.pair, context, source.settings.temperature)
        self.post_message(AttributionDone(run_id, step, result, source))

    @on(AttributionDone)
    def _on_attribution(self, message: AttributionDone) -> None:
        self._attributions[(id(message.source), message.step)] = (message.source, message.result)
        if message.run != self.run_id:
            return
        panel = self.query_one("#attribution", AttributionPanel)
        if panel.step == message.step:
            panel.show_result(message.step, message.result, self.records[message.step])

    # ------------------------------------------------------------ branches

    def action_branch(self) -> None:
        if self._needs_models("branching") or (record := self._selected_record("branch from it")) is None:
            return
        if not record.get("topk_p") and not record.get("topk_d"):
            self.notify("no top-k alternatives at this step (a model had ended)", severity="warning")
            return
        fed = (record.get("fed") or [None, None])[1]
        self.push_screen(BranchChooser(record, fed), callback=partial(self._branch_from, record["step"]))

    def _branch_from(self, step: int, choice: tuple[int, str] | None) -> None:
        """Continue the perturbed model's context before `step` with the chosen token: a new run, its session
        linked to this one; this run stays open to come back to (u)."""
        if choice is None:
            return
        from engine.errors import HieruiError
        from hierui.explorer.live import LiveRun

        token, text = choice
        parent = self.live
        prefix, start = branch_prefix(parent.header, parent.records, step, token)
        self._pause("branch")
        link = {"session": str(parent.path), "step": step, "token": int(token), "text": text}
        try:
            run = LiveRun(
                self.pair,
                parent.stepper.prompt,
                parent.settings,
                self.session_dir,
                prefix=prefix,
                start_step=start,
                parent=link,
            )
        except HieruiError as e:
            self.notify(str(e), title="cannot branch", severity="error", timeout=30)
            return
        lead = (self.lead[0] + self.lead[1] if self.lead else "") + fed_text(parent.records[:step]), text
        self._parents.append((parent, self.selected, self.lead))
        self._adopt(run, notes=False, lead=lead)
        self.state = AppState.READY
        self.notify(f"branch of step {step_label(step)} with {cell(text)}: a new session (u: back to the parent)")
        self.action_toggle_run()

    def action_parent(self) -> None:
        if not self._parents:
            self.notify("this run is not a branch", severity="warning")
            return
        branch = self.source
        self._go.clear()
        branch.close()
        parent, selected, lead = self._parents.pop()
        self._adopt(parent, notes=False, lead=lead)
        if selected is not None and self.records:
            self.selected = min(selected, len(self.records) - 1)
            self.follow = self.selected == len(self.records) - 1
        self.state = AppState.DONE if parent.finished else (AppState.PAUSED if self.records else AppState.READY)
        self.notify(f"back to the parent run; the branch is in {branch.path}")

    def _close_parents(self) -> None:
        while self._parents:
            self._parents.pop()[0].close()

    # ------------------------------------------------------------ counterfactual branch (--counterfactual)

    @work(thread=True, exclusive=True, group="counterfactual", exit_on_error=False)
    def _counterfactual(self, source, run_id: int) -> None:
        """The finished run's counterfactual branch: the recorder steps it as the run's last step is written
        (engine.run.recorder.SessionRecorder, which closes the session with it); else it is stepped here."""
        recorder = getattr(source, "recorder", None)
        if recorder is not None and getattr(recorder, "counterfactual", False):
            branches = recorder.branches
        else:
            from engine.run.branch import counterfactuals
            from hierui.explorer.live import MODEL_LOCK

            with MODEL_LOCK:
                branches = counterfactuals(self.pair, source.stepper)
        self.post_message(CounterfactualDone(run_id, branches[0] if branches else None))

    @on(CounterfactualDone)
    def _on_counterfactual(self, message: CounterfactualDone) -> None:
        if message.run == self.run_id:
            self._show_counterfactual(counterfactual_line(message.branch))

    def _recorded_counterfactual(self, source) -> str:
        """A replayed session's counterfactual branch (Session.branch), as its line; '' when it has none."""
        session = getattr(source, "session", None)
        branch = getattr(session, "branch", None)
        if branch is None and not (session is not None and session.complete and self.header.counterfactual):
            return ""
        return counterfactual_line(branch)

    def _show_counterfactual(self, line: str) -> None:
        widget = self.query_one("#counterfactual", Static)
        widget.display = bool(line)
        widget.update(line)

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
