"""The explorer: a Textual app over a live ModelPair (`hierui explore`) or a recorded session (`hierui replay`).

All model work runs in thread workers that post messages (hierui.messages); the UI only renders step
records. A live run writes its session file step by step (hierui.live.LiveRun), so quitting or a crash
keeps every step that was shown.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable

from textual import on, work
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import Container, Horizontal, Vertical
from textual.widgets import Footer, Input, ProgressBar, Static
from textual.worker import get_current_worker

from engine.stepper import StepSettings
from hierui.messages import LoadFailed, LoadProgress, PairReady, StepDone, StepFailed
from hierui.widgets.chart import SeriesChart
from hierui.widgets.continuation import Continuation
from hierui.widgets.layers import LayerPanel
from hierui.widgets.scale import kl_legend
from hierui.widgets.spaces import SpacesPanel
from hierui.widgets.subspace import SubspacePanel
from hierui.widgets.topk import TopKTable

PairFactory = Callable[[Callable[[str, int, int], None]], object]
PLAYBACK_SECONDS = 0.15
COMPACT_WIDTH, COMPACT_HEIGHT = 110, 34


class HieruiApp(App):
    TITLE = "hierui"
    CSS_PATH = "hierui.tcss"
    AUTO_FOCUS = None  # keys drive the explorer; the prompt takes focus only with `e`
    BINDINGS = [
        Binding("space", "step", "Step"),
        Binding("r", "toggle_run", "Run/Pause"),
        Binding("left", "scrub(-1)", "◀", show=True),
        Binding("right", "scrub(1)", "▶", show=True),
        Binding("home", "scrub_to(0)", "First", show=False),
        Binding("end", "scrub_to(-1)", "Last", show=False),
        Binding("m", "switch_mode", "Mode"),
        Binding("e", "edit_prompt", "Prompt"),
        Binding("plus,equals_sign", "temperature(1)", "T+", show=False),
        Binding("minus", "temperature(-1)", "T−", show=False),
        Binding("s", "save", "Save"),
        Binding("q", "quit", "Quit"),
        Binding("escape", "leave_prompt", "Leave prompt", show=False),
    ]

    def __init__(self, *, pair_factory: PairFactory | None = None, session=None, prompt: str = "",
                 settings: StepSettings | None = None, session_dir: str | Path = "sessions",
                 title_hint: str = "", autorun: bool = False):
        super().__init__()
        if (pair_factory is None) == (session is None):
            raise ValueError("give either a pair factory (explore) or a session (replay)")
        self.pair_factory = pair_factory
        self.session = session
        self.replay = session is not None
        self.settings = settings or StepSettings()
        self.prompt = session.header.get("prompt", "") if session is not None else prompt
        self.session_dir = Path(session_dir)
        self.title_hint = title_hint
        self.autorun = autorun
        self.pair = None
        self.live = None
        self.run_id = 0
        self.records: list[dict] = []
        self.selected: int | None = None
        self.follow = True
        self.state = "loading"
        self.status_text = ""
        self._go = threading.Event()
        self.header_info: dict = dict(session.header) if session is not None else {}
        if self.replay:
            self.settings = StepSettings(mode=self.header_info.get("mode", "shared"),
                                         temperature=self.header_info.get("temperature", 1.0),
                                         max_new_tokens=self.header_info.get("max_new_tokens", len(session.steps)),
                                         choices=self.header_info.get("choices"))

    # ------------------------------------------------------------ layout

    def compose(self) -> ComposeResult:
        yield Static(id="info")
        with Horizontal(id="loading"):
            yield Static("", id="status")
            yield ProgressBar(id="progress", show_eta=False)
        with Horizontal(id="prompt-row"):
            yield Input(value=self.prompt, placeholder="prompt (e to edit, enter to restart)", id="prompt",
                        disabled=self.replay)
            yield Static(kl_legend(), id="legend")
        with Horizontal(id="texts"):
            yield Continuation("d", id="dense")
            yield Continuation("p", id="perturbed")
        with Vertical(id="panels"):
            with Container(id="row"):
                yield SpacesPanel(id="spaces")
                with Vertical(id="right"):
                    yield TopKTable(id="topk")
                    yield SubspacePanel(id="subspace")
                yield LayerPanel(id="layers")
            yield SeriesChart(id="chart")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#dense").border_title = "dense"
        self.query_one("#perturbed").border_title = "perturbed"
        self.query_one("#layers").border_title = "embedding space: cos per layer"
        self.query_one("#spaces").border_title = "hierarchy: measured vs theory"
        self.query_one("#topk").border_title = "top-k"
        self.query_one("#chart").border_title = "over steps"
        self._apply_size()
        if self.replay:
            self._start_replay()
        else:
            self.state = "loading"
            self.status_text = "loading the model…"
            self._load_pair()
        self.refresh_view()

    def on_resize(self, _event) -> None:
        self._apply_size()

    def _apply_size(self) -> None:
        compact = self.size.width < COMPACT_WIDTH or self.size.height < COMPACT_HEIGHT
        self.screen.set_class(compact, "-compact")

    # ------------------------------------------------------------ loading (explore)

    @work(thread=True, exclusive=True, group="load", exit_on_error=False)
    def _load_pair(self) -> None:
        def progress(stage: str, done: int = 0, total: int = 0) -> None:
            self.post_message(LoadProgress(stage, done, total))

        try:
            pair = self.pair_factory(progress)
        except Exception as e:  # noqa: BLE001 - shown to the user as one line
            from engine.errors import HieruiError

            text = str(e) if isinstance(e, HieruiError) else f"{type(e).__name__}: {e}"
            self.post_message(LoadFailed(text.splitlines()[0] if text else type(e).__name__))
            return
        self.post_message(PairReady(pair))

    @on(LoadProgress)
    def _on_load_progress(self, message: LoadProgress) -> None:
        self.status_text = f"{message.stage}…"
        bar = self.query_one("#progress", ProgressBar)
        if message.total > 0:
            bar.update(total=message.total, progress=message.done)
        self.refresh_view()

    @on(LoadFailed)
    def _on_load_failed(self, message: LoadFailed) -> None:
        self.state = "failed"
        self.status_text = f"error: {message.text}"
        self.notify(message.text, title="loading failed", severity="error", timeout=30)
        self.refresh_view()

    @on(PairReady)
    def _on_pair_ready(self, message: PairReady) -> None:
        self.pair = message.pair
        self.status_text = ""
        self._new_run()
        if self.autorun:
            self.action_toggle_run()

    # ------------------------------------------------------------ runs

    def _new_run(self) -> None:
        from hierui.live import LiveRun

        from engine.errors import HieruiError

        self._stop_run()
        self.run_id += 1
        try:
            self.live = LiveRun(self.pair, self.prompt, self.settings, self.session_dir)
        except HieruiError as e:
            self.live = None
            self.state = "failed"
            self.notify(str(e), title="cannot start", severity="error", timeout=30)
            self.refresh_view()
            return
        self.header_info = dict(self.live.header)
        self.records = []
        self.selected = None
        self.follow = True
        self.state = "ready"
        self.refresh_view()

    def _stop_run(self, wait: bool = True) -> None:
        self._go.clear()
        if self.live is not None:
            self.live.close(wait=wait)

    @work(thread=True, exclusive=True, group="step", exit_on_error=False)
    def _stepping(self, live, run_id: int, count: int | None) -> None:
        worker = get_current_worker()
        done = 0
        while not live.finished and not worker.is_cancelled:
            if count is not None and done >= count:
                break
            if count is None and not self._go.is_set():
                break
            try:
                record = live.step()
            except Exception as e:  # noqa: BLE001
                self.post_message(StepFailed(run_id, f"{type(e).__name__}: {e}"))
                return
            if record is None:
                break
            done += 1
            self.post_message(StepDone(run_id, record, live.finished))

    @on(StepDone)
    def _on_step(self, message: StepDone) -> None:
        if message.run != self.run_id:
            return
        self.records.append(message.record)
        if self.follow:
            self.selected = len(self.records) - 1
        if message.finished:
            self._go.clear()
            self.state = "done"
        elif self.state != "running":
            self.state = "paused" if not self._go.is_set() else "running"
        self.refresh_view()

    @on(StepFailed)
    def _on_step_failed(self, message: StepFailed) -> None:
        if message.run != self.run_id:
            return
        self._go.clear()
        self.state = "failed"
        self.notify(message.text, title="stepping failed", severity="error", timeout=30)
        self.refresh_view()

    # ------------------------------------------------------------ replay

    def _start_replay(self) -> None:
        self.records = list(self.session.steps)
        self.selected = len(self.records) - 1 if self.records else None
        self.state = "replay"
        for warning in self.session.warnings:
            self.notify(warning, severity="warning")

    def _playback_tick(self) -> None:
        if not self._go.is_set():
            return
        total = len(self.session.steps)
        if len(self.records) < total:
            self.records.append(self.session.steps[len(self.records)])
            self.selected = len(self.records) - 1
            self.refresh_view()
            self.set_timer(PLAYBACK_SECONDS, self._playback_tick)
        else:
            self._go.clear()
            self.state = "replay"
            self.refresh_view()

    # ------------------------------------------------------------ actions

    def action_step(self) -> None:
        if self.replay:
            self._go.clear()
            if len(self.records) < len(self.session.steps):
                self.records.append(self.session.steps[len(self.records)])
                self.selected = len(self.records) - 1
            self.state = "replay"
            self.refresh_view()
            return
        if self.live is None or self.live.finished:
            return
        if self._go.is_set():  # step while running = pause
            self._go.clear()
            self.state = "paused"
            self.refresh_view()
            return
        self.follow = True
        self._stepping(self.live, self.run_id, 1)

    def action_toggle_run(self) -> None:
        if self._go.is_set():
            self._go.clear()
            self.state = "paused" if not self.replay else "replay"
            self.refresh_view()
            return
        if self.replay:
            if len(self.records) >= len(self.session.steps):
                self.records = []  # play from the start
            self._go.set()
            self.state = "playing"
            self._playback_tick()
            return
        if self.live is None or self.live.finished:
            return
        self._go.set()
        self.follow = True
        self.state = "running"
        self._stepping(self.live, self.run_id, None)
        self.refresh_view()

    def action_scrub(self, delta: int) -> None:
        if not self.records:
            return
        current = len(self.records) - 1 if self.selected is None else self.selected
        self.selected = max(0, min(len(self.records) - 1, current + delta))
        self.follow = self.selected == len(self.records) - 1
        self.refresh_view()

    def action_scrub_to(self, index: int) -> None:
        if not self.records:
            return
        self.selected = len(self.records) - 1 if index < 0 else min(index, len(self.records) - 1)
        self.follow = self.selected == len(self.records) - 1
        self.refresh_view()

    def action_switch_mode(self) -> None:
        if self._refuse_in_replay("switch mode") or self.pair is None:
            return
        self.settings.mode = "free" if self.settings.mode == "shared" else "shared"
        self.notify(f"mode: {self.settings.mode} (restarted from the prompt)")
        self._new_run()

    def action_edit_prompt(self) -> None:
        if self._refuse_in_replay("edit the prompt"):
            return
        self.query_one("#prompt", Input).focus()

    @on(Input.Submitted, "#prompt")
    def _on_prompt(self, event: Input.Submitted) -> None:
        self.prompt = event.value
        self.set_focus(None)
        if self.pair is not None:
            self._new_run()

    def action_leave_prompt(self) -> None:
        prompt = self.query_one("#prompt", Input)
        if prompt.has_focus:
            prompt.value = self.prompt
            self.set_focus(None)

    def action_temperature(self, direction: int) -> None:
        if self._refuse_in_replay("change the temperature") or self.pair is None:
            return
        t = self.settings.temperature
        t = round(t + 0.1 * direction, 2) if t + 0.1 * direction > 0.05 else t
        self.settings.temperature = t
        self.notify(f"temperature {t:g} (restarted from the prompt)")
        self._new_run()

    def action_save(self) -> None:
        if self.replay:
            self.notify(f"replaying {self.session.path}: it is saved already")
            return
        if self.live is None or not self.live.written:
            self.notify("nothing recorded yet: step first", severity="warning")
            return
        self.notify(f"session saved: {self.live.path} ({len(self.records)} steps)")

    async def action_quit(self) -> None:
        self._stop_run(wait=False)  # a step in flight finishes and closes the session on its own thread
        self.exit()

    def _refuse_in_replay(self, what: str) -> bool:
        if self.replay:
            self.notify(f"replay shows a recorded session: cannot {what}", severity="warning")
        return self.replay

    def get_system_commands(self, screen):
        yield from super().get_system_commands(screen)
        yield SystemCommand("Step", "advance one token (replay: one recorded step)", self.action_step)
        yield SystemCommand("Run / pause", "step continuously, or pause", self.action_toggle_run)
        yield SystemCommand("Previous step", "select the step before", lambda: self.action_scrub(-1))
        yield SystemCommand("Next step", "select the step after", lambda: self.action_scrub(1))
        yield SystemCommand("First step", "select step 0", lambda: self.action_scrub_to(0))
        yield SystemCommand("Last step", "select the newest step", lambda: self.action_scrub_to(-1))
        yield SystemCommand("Switch mode", "shared ⇄ free, restarting from the prompt", self.action_switch_mode)
        yield SystemCommand("Edit prompt", "edit the prompt; enter restarts", self.action_edit_prompt)
        yield SystemCommand("Raise temperature", "T + 0.1, restarting", lambda: self.action_temperature(1))
        yield SystemCommand("Lower temperature", "T − 0.1, restarting", lambda: self.action_temperature(-1))
        yield SystemCommand("Save session", "say where the session file is", self.action_save)

    # ------------------------------------------------------------ rendering

    @property
    def selected_record(self) -> dict | None:
        if self.selected is None or not self.records:
            return None
        return self.records[min(self.selected, len(self.records) - 1)]

    def info_line(self) -> str:
        h = self.header_info
        pert = h.get("perturbation") or {}
        sparsity = pert.get("measured_sparsity")
        if pert.get("spec"):
            parts = [h.get("model_display") or h.get("model") or "", pert["spec"]]
        else:  # still loading: what was asked for
            parts = [self.title_hint or "hierui"]
        if self.size.width < COMPACT_WIDTH:
            parts[0] = parts[0].replace(" (embedded)", "")
        if sparsity:
            parts.append(f"sparsity {sparsity:.1%}")
        parts.append(self.settings.mode)
        parts.append(f"T={self.settings.temperature:g}")
        n = len(self.records)
        total = len(self.session.steps) if self.replay else self.settings.max_new_tokens
        step = "–" if self.selected is None else str(self.selected + 1)
        compact = self.screen.has_class("-compact") if self.is_mounted else False
        parts.append(f"step {step}/{n}" + ("" if compact else f" (max {total})"))
        icons = {"loading": "⏳ loading", "ready": "● ready", "running": "▶ running", "paused": "⏸ paused",
                 "done": "■ done", "failed": "✖ failed", "replay": "↺ replay", "playing": "▶ playing"}
        parts.append(icons.get(self.state, self.state))
        return " · ".join(parts)

    def refresh_view(self) -> None:
        self.query_one("#info", Static).update(self.info_line())
        loading = self.query_one("#loading")
        loading.display = bool(self.status_text)
        self.query_one("#status", Static).update(self.status_text)
        record = self.selected_record
        self.query_one("#dense", Continuation).show(self.records, self.selected)
        perturbed = self.query_one("#perturbed", Continuation)
        spec = (self.header_info.get("perturbation") or {}).get("spec")
        title = f"perturbed ({spec})" if spec else "perturbed"
        if self.settings.mode == "shared":
            title += " · own picks, dense context"
        perturbed.border_title = title
        perturbed.show(self.records, self.selected)
        self.query_one("#layers", LayerPanel).show(record)
        self.query_one("#spaces", SpacesPanel).show(record, self.settings.temperature)
        self.query_one("#topk", TopKTable).show(record)
        self.query_one("#subspace", SubspacePanel).show(record, self.settings.choices)
        self.query_one("#chart", SeriesChart).show(self.records, self.selected)
