"""The explorer driven through Textual's Pilot, on tiny-random (live) and on recorded sessions (replay)."""

import asyncio

import pytest

from engine.session import load_session, record_run
from engine.stepper import Stepper, StepSettings
from hierui.app import HieruiApp

SIZE = (120, 40)


def run(coro):
    return asyncio.run(coro)


@pytest.fixture(scope="module")
def tiny_pair(tiny):
    from engine.perturb import perturb

    return perturb(tiny, "magnitude:0.5", use_cache=False)


def live_app(tiny_pair, tmp_path, **settings):
    opts = {"max_new_tokens": 12, "choices": ["A", "B"], **settings}
    return HieruiApp(pair_factory=lambda progress: tiny_pair, prompt="Hello there",
                     settings=StepSettings(**opts), session_dir=tmp_path)


async def settle(app, pilot):
    await pilot.pause()
    await app.workers.wait_for_complete()
    await pilot.pause()


def text_of(app, selector) -> str:
    widget = app.query_one(selector)
    content = widget.content
    return content.plain if hasattr(content, "plain") else str(content)


def test_stepping_fills_every_panel(tiny_pair, tmp_path):
    app = live_app(tiny_pair, tmp_path)

    async def scenario():
        async with app.run_test(size=SIZE) as pilot:
            await settle(app, pilot)
            assert app.state == "ready"
            for _ in range(4):
                await pilot.press("space")
                await settle(app, pilot)
            records = app.records
            assert len(records) == 4 and app.selected == 3
            assert text_of(app, "#dense") == "".join(r["text_d"] for r in records).replace("\n", "⏎\n")
            assert text_of(app, "#perturbed") == "".join(r["text_p"] for r in records).replace("\n", "⏎\n")
            assert "step 4/4" in text_of(app, "#info")
            topk = app.query_one("#topk")
            assert len(topk.rows) == 5 and topk.rows[0][2] == f"{records[3]['topk_d'][0][2]:.3f}"
            assert f"{records[3]['kl']:.4f}" in _rendered(app, "#spaces")
            assert f"{records[3]['emb_cos'][1]:.5f}" in text_of(app, "#layers")
            assert "sub KL" in _rendered(app, "#subspace")

    run(scenario())


def _rendered(app, selector) -> str:
    """Text of a widget whose content is a rich renderable (tables)."""
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(app.query_one(selector).content)
    return console.export_text()


def test_scrubbing_changes_the_selected_step_everywhere(tiny_pair, tmp_path):
    app = live_app(tiny_pair, tmp_path)

    async def scenario():
        async with app.run_test(size=SIZE) as pilot:
            await settle(app, pilot)
            for _ in range(5):
                await pilot.press("space")
                await settle(app, pilot)
            await pilot.press("left", "left")
            await pilot.pause()
            assert app.selected == 2
            rec = app.records[2]
            assert "step 3/5" in text_of(app, "#info")
            assert f"{rec['kl']:.4f}" in _rendered(app, "#spaces")
            assert f"{rec['emb_cos'][-1]:.5f}" in text_of(app, "#layers")
            assert app.query_one("#topk").rows[0][2] == f"{rec['topk_d'][0][2]:.3f}"
            await pilot.press("home")
            await pilot.pause()
            assert app.selected == 0 and "step 1/5" in text_of(app, "#info")
            await pilot.press("end")
            await pilot.pause()
            assert app.selected == 4

    run(scenario())


def test_run_then_pause_stops(tiny_pair, tmp_path):
    app = live_app(tiny_pair, tmp_path, max_new_tokens=400)

    async def scenario():
        async with app.run_test(size=SIZE) as pilot:
            await settle(app, pilot)
            app.live.stepper._eos = set()  # tiny-random may say </s> early: keep it going
            await pilot.press("r")
            for _ in range(50):
                await asyncio.sleep(0.05)
                if len(app.records) >= 3:
                    break
            await pilot.press("r")
            await settle(app, pilot)
            count = len(app.records)
            assert 3 <= count < 400 and app.state == "paused"
            await asyncio.sleep(0.3)
            await pilot.pause()
            assert len(app.records) == count

    run(scenario())


def test_save_writes_a_session_that_show_reads(tiny_pair, tmp_path):
    from typer.testing import CliRunner

    from hierui.cli import app as cli_app

    app = live_app(tiny_pair, tmp_path)

    async def scenario():
        async with app.run_test(size=SIZE) as pilot:
            await settle(app, pilot)
            for _ in range(3):
                await pilot.press("space")
                await settle(app, pilot)
            await pilot.press("s")
            await pilot.pause()
            return app.live.path, list(app.records)

    path, records = run(scenario())
    session = load_session(path)
    assert [s["token_d"] for s in session.steps] == [r["token_d"] for r in records]
    result = CliRunner().invoke(cli_app, ["show", str(path)])
    assert result.exit_code == 0, result.output
    assert "magnitude:0.5" in result.output


def test_quitting_while_running_leaves_a_valid_session(tiny_pair, tmp_path):
    app = live_app(tiny_pair, tmp_path, max_new_tokens=400)

    async def scenario():
        async with app.run_test(size=SIZE) as pilot:
            await settle(app, pilot)
            await pilot.press("r")
            for _ in range(50):
                await asyncio.sleep(0.05)
                if len(app.records) >= 2:
                    break
            path = app.live.path
            await pilot.press("q")
            return path

    path = run(scenario())
    session = load_session(path)
    assert len(session.steps) >= 2 and session.summary is not None
    assert session.summary["steps"] == len(session.steps)


def test_mode_switch_restarts_in_free_mode(tiny_pair, tmp_path):
    app = live_app(tiny_pair, tmp_path)

    async def scenario():
        async with app.run_test(size=SIZE) as pilot:
            await settle(app, pilot)
            await pilot.press("space")
            await settle(app, pilot)
            await pilot.press("m")
            await pilot.pause()
            assert app.records == [] and app.settings.mode == "free"
            for _ in range(3):
                await pilot.press("space")
                await settle(app, pilot)
            assert len(app.records) == 3 and "first_divergence" in app.records[0]
            assert app.live.header["mode"] == "free"

    run(scenario())


def test_replay_shows_recorded_tokens_and_metrics(tiny_pair, tmp_path):
    path = tmp_path / "rec.jsonl"
    record_run(Stepper(tiny_pair, "Replay me", StepSettings(max_new_tokens=6, mode="free")), path)
    session = load_session(path)
    app = HieruiApp(session=session)

    async def scenario():
        async with app.run_test(size=SIZE) as pilot:
            await pilot.pause()
            assert app.state == "replay" and len(app.records) == 6
            assert text_of(app, "#dense") == "".join(s["text_d"] for s in session.steps).replace("\n", "⏎\n")
            assert f"{session.steps[-1]['kl']:.4f}" in _rendered(app, "#spaces")
            await pilot.press("left")
            await pilot.pause()
            assert f"{session.steps[-2]['kl']:.4f}" in _rendered(app, "#spaces")
            await pilot.press("m")  # refused in replay
            await pilot.pause()
            assert app.settings.mode == "free"

    run(scenario())


def test_shipped_example_sessions_replay():
    from pathlib import Path

    folder = Path(__file__).resolve().parent.parent / "sessions"
    examples = sorted(folder.glob("*.jsonl"))
    assert len(examples) >= 6
    modes, specs, with_choices = set(), set(), 0
    for path in examples:
        session = load_session(path)
        assert session.complete and session.steps and not session.warnings
        modes.add(session.header["mode"])
        specs.add(session.header["perturbation"]["spec"])
        with_choices += bool(session.header.get("choices"))
    assert modes == {"shared", "free"} and "wanda:0.5" in specs and any("drop" in s for s in specs) and with_choices

    session = load_session(folder / "choice-wanda-0.5-shared.jsonl")
    app = HieruiApp(session=session)

    async def scenario():
        async with app.run_test(size=SIZE) as pilot:
            await pilot.pause()
            assert text_of(app, "#dense") == "".join(s["text_d"] for s in session.steps).replace("\n", "⏎\n")
            last = session.steps[-1]
            assert f"{last['kl']:.4f}" in _rendered(app, "#spaces")
            assert f"{last['sub_kl']:.4f}" in _rendered(app, "#subspace")
            assert "wanda:0.5" in text_of(app, "#info") and "SmolLM2" in text_of(app, "#info")
            await pilot.press("r")  # play back from the start
            await pilot.pause()
            assert len(app.records) < len(session.steps)

    run(scenario())


def test_first_frame_comes_before_the_models(tiny_pair, tmp_path):
    """The UI is up and says it is loading while the (here: blocked) model loading runs in its worker."""
    import threading

    release = threading.Event()

    def slow_factory(progress):
        progress("loading a big model", 0, 0)
        release.wait(10)
        return tiny_pair

    app = HieruiApp(pair_factory=slow_factory, prompt="Hi", settings=StepSettings(max_new_tokens=3),
                    session_dir=tmp_path, title_hint="big-model · wanda:0.5")

    async def scenario():
        async with app.run_test(size=SIZE) as pilot:
            await pilot.pause()
            await asyncio.sleep(0.2)
            assert app.state == "loading" and "loading" in text_of(app, "#info")
            assert "loading a big model" in text_of(app, "#status")
            await pilot.press("space")  # keys answer (nothing to step yet) while loading goes on
            assert app.records == []
            release.set()
            await settle(app, pilot)
            assert app.state == "ready"
            await pilot.press("space")
            await settle(app, pilot)
            assert len(app.records) == 1

    run(scenario())


def test_quit_does_not_wait_for_a_step_in_flight(tiny_pair, tmp_path):
    """A slow step (a big model) holds the run; quitting returns at once and the step still lands in the file."""
    import threading
    import time

    from hierui.live import LiveRun

    live = LiveRun(tiny_pair, "Hello", StepSettings(max_new_tokens=5), tmp_path)
    live.step()
    entered, release = threading.Event(), threading.Event()
    original = live.stepper.step

    def slow_step():
        entered.set()
        release.wait(10)
        return original()

    live.stepper.step = slow_step
    worker = threading.Thread(target=live.step)
    worker.start()
    entered.wait(5)
    started = time.perf_counter()
    live.close(wait=False)
    assert time.perf_counter() - started < 0.5 and not live.closed
    release.set()
    worker.join(10)
    session = load_session(live.path)
    assert live.closed and len(session.steps) == 2 and session.summary["steps"] == 2
    assert live.step() is None
