"""Snapshots of the explorer, one per screen state (pytest-textual-snapshot).

Every state is built from a recorded session (the shipped example of the embedded model under
wanda:0.5), so no snapshot depends on floating-point noise: the live states play that session through a
scripted live source. Update after an intended change with
`pytest tests/test_snapshots.py --snapshot-update`, and look at every SVG before accepting it.
"""

import json
import threading
from pathlib import Path

import pytest

from engine.record.session import load_session
from hierui.explorer.app import HieruiApp

EXAMPLE = Path(__file__).resolve().parent.parent / "sessions" / "factual-wanda-0.5-shared.jsonl"
# the same prompt recorded with the logit lens (and a tie margin of 0.1, so that three flips are near ties), and
# the attribution of its step 26 by the real engine; tests/data/README.md says how they were made
LENS = Path(__file__).resolve().parent / "data" / "lens-wanda-0.5-shared.jsonl"
ATTRIBUTION = Path(__file__).resolve().parent / "data" / "attribution-wanda-0.5-shared.json"


class ScriptedRun:
    """A live step source whose steps are a recorded session's: it behaves like hierui.explorer.live.LiveRun (live,
    restartable) but its numbers are fixed. With `hold_after`, the step after that many waits (up to a few
    seconds) so a snapshot can catch the app while it is running."""

    live = True
    lens_later = False  # the recorded steps hold their lens
    pace = 0.0

    def __init__(self, session, hold_after: int | None = None):
        from engine.run.rerun import settings_from_header

        self.session, self.path, self.header = session, session.path, dict(session.header)
        self.settings = settings_from_header(self.header, len(session.steps))
        self.position, self.hold_after, self.closed = 0, hold_after, False
        self.release = threading.Event()
        self.written = False

    records = property(lambda self: self.session.steps[: self.position])
    total = property(lambda self: len(self.session.steps))
    notes = property(lambda self: [])
    finished = property(lambda self: self.closed or self.position >= len(self.session.steps))

    def step(self):
        if self.finished:
            return None
        if self.hold_after is not None and self.position >= self.hold_after:
            self.release.wait(3)
            return None
        self.position += 1
        self.written = True
        return self.session.steps[self.position - 1]

    def close(self):
        self.closed = True
        self.release.set()


def live_app(monkeypatch, hold_after=None, example=EXAMPLE):
    session = load_session(example)
    runs = []

    def scripted(pair, prompt, settings, session_dir):
        runs.append(ScriptedRun(session, hold_after))
        return runs[-1]

    monkeypatch.setattr("hierui.explorer.live.LiveRun", scripted)
    app = HieruiApp(
        pair_factory=lambda progress: object(), prompt=session.header["prompt"], title_hint="smollm2-135m · wanda:0.5"
    )
    return app, runs


async def settle(pilot):
    await pilot.pause()
    await pilot.app.workers.wait_for_complete()
    await pilot.pause()


@pytest.mark.parametrize("size", [(120, 40), (80, 24)])
def test_replay_screen(snap_compare, size):
    """Replay of the shipped session with step 38 of 48 selected (ten steps back from the last): the header
    says `↺ replay` and `step 38/48`; the selected token is highlighted in both texts; every panel shows
    step 38's values (hierarchy, top-k, layers); the chart marks step 38; the layer × step map beside it says
    the session has no logit-lens data (it was recorded before the lens). At 80×24 the compact layout: the
    state still visible in the header, the panels stacked below the texts. The footer: space Step, r Run, ← ◀,
    → ▶, a Attribute, b Branch, m Mode, q Quit, ^p palette."""

    async def select_a_middle_step(pilot):
        await pilot.pause()
        for _ in range(10):
            await pilot.press("left")
        await pilot.pause()

    assert snap_compare(HieruiApp(session=load_session(EXAMPLE)), terminal_size=size, run_before=select_a_middle_step)


def test_live_ready_screen(snap_compare, monkeypatch):
    """Live explorer once the pair is ready, before any step: header `● ready` and `step –/0 (max 48)`, the
    prompt in its box, both texts saying how to start (space / r), the panels empty ("no step selected", the
    map "layer × step: no step yet")."""
    app, _ = live_app(monkeypatch)
    assert snap_compare(app, terminal_size=(120, 40), run_before=settle)


def test_live_running_screen(snap_compare, monkeypatch):
    """Live explorer while running (r pressed; the seventh step is in flight): header `▶ running` and
    `step 6/6`, six tokens in each text coloured by their KL, the panels on step 6, the chart with six
    points per series."""
    app, runs = live_app(monkeypatch, hold_after=6)

    async def run_six(pilot):
        await settle(pilot)
        await pilot.press("r")
        for _ in range(100):
            await pilot.pause()
            if len(app.records) >= 6:
                break
        await pilot.pause()

    try:
        assert snap_compare(app, terminal_size=(120, 40), run_before=run_six)
    finally:
        for run in runs:
            run.release.set()


def test_live_compact_screen(snap_compare, monkeypatch):
    """Live explorer at 100×30 (narrower than 110 columns: the compact layout) after eight steps, paused on
    the last: the header keeps model, spec, mode, step and `⏸ paused`; the hierarchy and top-k side by side,
    the layer panel and the chart below them (the lower part scrolls)."""
    app, _ = live_app(monkeypatch)

    async def step_eight(pilot):
        await settle(pilot)
        for _ in range(8):
            await pilot.press("space")
            await settle(pilot)

    assert snap_compare(app, terminal_size=(100, 30), run_before=step_eight)


def recorded_attribution():
    """The attribution of the LENS session's step 26 as the engine computed it (engine.run.attribution.Attribution)."""
    from engine.run.attribution import Attribution, UnitResult

    data = json.loads(ATTRIBUTION.read_text())
    units = [UnitResult(**unit) for unit in data.pop("units")]
    step = data.pop("step")
    return step, Attribution(units=units, **data)


@pytest.mark.parametrize("size", [(120, 40), (80, 24)])
def test_layer_map_screen(snap_compare, size):
    """Replay of the lens session (the embedded model under wanda:0.5, 48 steps) with step 26 selected: the map
    titled `lens KL · layer × step · 30 layers → 12 rows (max)` (120×40; at 80×24, 16 rows, scrolled into
    view below the top-k), rows labelled by their first layer, one column per step (all 48 at 120×40), coloured
    on the log scale of the legend in its bottom border (`nats █1e-4██…10█ · v: dense final`); ✗ over the flip
    steps and ≈ over the three near ties (steps 18, 20, 32); step 26's column marked ▼ (reversed ✗: it is a
    flip) above and `▲26` on the step axis below; the header says `step 26/48`."""

    async def select_step_26(pilot):
        await pilot.pause()
        pilot.app.action_scrub_to(25)
        await pilot.pause()
        pilot.app.query_one("#heatmap").scroll_visible(animate=False)
        await pilot.pause()

    assert snap_compare(HieruiApp(session=load_session(LENS)), terminal_size=size, run_before=select_step_26)


@pytest.mark.parametrize("size", [(120, 40), (80, 24)])
def test_attribution_screen(snap_compare, monkeypatch, size):
    """Live explorer (scripted from the lens session) after all 48 steps, step 26 selected and `a` pressed: the
    attribution panel in the chart's place, titled `attribution · step 26 · a: back to the chart`; its first line
    `KL 1.…` with the dense and perturbed top-1 tokens; the sublayers ranked by the share of the step's KL their
    dense output removes (bars, percentages, ✓ where one alone restores the dense top-1, ● on attn.19, the
    minimal set), the blocks ranked beside them (120×40) or on one line below (80×24, scrolled into view);
    the last line `minimal set: attn.19 restores the dense top-1`."""
    step, result = recorded_attribution()
    monkeypatch.setattr("engine.run.attribution.attribute", lambda pair, context, temperature=1.0, greedy=True: result)
    app, _ = live_app(monkeypatch, example=LENS)

    async def attribute_step_26(pilot):
        await settle(pilot)
        await pilot.press("r")
        for _ in range(200):
            await pilot.pause()
            if len(pilot.app.records) >= 48:
                break
        await settle(pilot)
        pilot.app.action_scrub_to(step)
        await pilot.press("a")
        await settle(pilot)

    assert snap_compare(app, terminal_size=size, run_before=attribute_step_26)
