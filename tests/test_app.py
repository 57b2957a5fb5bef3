"""The explorer driven through Textual's Pilot, on tiny-random (live) and on recorded sessions (replay)."""

import asyncio
import re

import pytest

from engine.record.session import load_session
from engine.record.settings import StepSettings
from engine.run.recorder import SessionRecorder
from engine.run.stepper import Stepper
from hierui.explorer.app import HieruiApp
from hierui.format import ended_note, metric
from hierui.tokentext import running

SIZE = (120, 40)


def run(coro):
    return asyncio.run(coro)


@pytest.fixture(scope="module")
def tiny_pair(tiny):
    from engine.perturb import perturb

    return perturb(tiny, "magnitude:0.5", use_cache=False)


def live_app(tiny_pair, tmp_path, **settings):
    opts = {"max_new_tokens": 12, "choices": ["A", "B"], **settings}
    return HieruiApp(
        pair_factory=lambda progress: tiny_pair,
        prompt="Hello there",
        settings=StepSettings(**opts),
        session_dir=tmp_path,
    )


async def settle(app, pilot):
    await pilot.pause()
    await app.workers.wait_for_complete()
    await pilot.pause()


def text_of(app, selector) -> str:
    widget = app.query_one(selector)
    content = widget.content if hasattr(widget, "content") else widget.render()
    return content.plain if hasattr(content, "plain") else str(content)


def notes_of(app) -> list[str]:
    return [n.message for n in app._notifications]


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
            assert text_of(app, "#dense") == "".join(running(r["text_d"]) for r in records)
            assert text_of(app, "#perturbed") == "".join(running(r["text_p"]) for r in records)
            assert "step 4/4" in text_of(app, "#info")
            topk = app.query_one("#topk")
            assert len(topk.rows) == 5 and topk.rows[0][2] == f"{records[3]['topk_d'][0][2]:.3f}"
            assert metric("kl", records[3]["kl"]) in _rendered(app, "#spaces")
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
            assert metric("kl", rec["kl"]) in _rendered(app, "#spaces")
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
            app.live.stepper.batch.eos = set()  # tiny-random may say </s> early: keep it going
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
    SessionRecorder(Stepper(tiny_pair, "Replay me", StepSettings(max_new_tokens=6, mode="free")), [path]).run()
    session = load_session(path)
    app = HieruiApp(session=session)

    async def scenario():
        async with app.run_test(size=SIZE) as pilot:
            await pilot.pause()
            assert app.state == "replay" and len(app.records) == 6
            assert text_of(app, "#dense") == "".join(running(s["text_d"]) for s in session.steps)
            assert metric("kl", session.steps[-1]["kl"]) in _rendered(app, "#spaces")
            await pilot.press("left")
            await pilot.pause()
            assert metric("kl", session.steps[-2]["kl"]) in _rendered(app, "#spaces")
            await pilot.press("m")  # refused in replay, and said so
            await pilot.pause()
            assert app.settings.mode == "free" and any("cannot switch mode" in n for n in notes_of(app))
            await pilot.press("space")  # every recorded step is shown: stepping past the end says so
            await pilot.pause()
            assert len(app.records) == 6 and any("end of the recording" in n for n in notes_of(app))

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
            shown, last = text_of(app, "#dense"), session.steps[-1]
            assert shown.startswith("".join(running(s["text_d"]) for s in session.steps))
            if last.get("end_d") is not None:  # the dense model ended its text: the panel says where
                assert f"end (step {last['end_d'] + 1})" in shown
            assert metric("kl", last["kl"]) in _rendered(app, "#spaces")
            assert metric("sub_kl", last["sub_kl"]) in _rendered(app, "#subspace")
            assert "wanda:0.5" in text_of(app, "#info") and "SmolLM2" in text_of(app, "#info")
            rewinds, rewind = [], app.source.rewind
            app.source.rewind = lambda: (rewinds.append(len(app.records)), rewind())[1]
            await pilot.press("r")  # play back from the start (how far it got by now depends on the machine's load)
            await pilot.pause()
            assert rewinds == [len(session.steps)] and app.source.records[: len(app.records)] == app.records

    run(scenario())


def test_first_frame_comes_before_the_models(tiny_pair, tmp_path):
    """The UI is up and says it is loading while the (here: blocked) model loading runs in its worker."""
    import threading

    release = threading.Event()

    def slow_factory(progress):
        progress("loading a big model", 0, 0)
        release.wait(10)
        return tiny_pair

    app = HieruiApp(
        pair_factory=slow_factory,
        prompt="Hi",
        settings=StepSettings(max_new_tokens=3),
        session_dir=tmp_path,
        title_hint="big-model · wanda:0.5",
    )

    async def scenario():
        async with app.run_test(size=SIZE) as pilot:
            await pilot.pause()
            await asyncio.sleep(0.2)
            assert app.state == "loading" and "loading" in text_of(app, "#info")
            assert "loading a big model" in text_of(app, "#status")
            await pilot.press("space")  # queued while loading goes on, and the screen says so
            await pilot.pause()
            assert app.records == [] and "will step when ready" in text_of(app, "#status")
            assert any("will step when ready" in n for n in notes_of(app))
            release.set()
            await settle(app, pilot)
            assert app.state == "paused" and len(app.records) == 1  # the queued step was taken
            await pilot.press("space")
            await settle(app, pilot)
            assert len(app.records) == 2

    run(scenario())


def test_quit_does_not_wait_for_a_step_in_flight(tiny_pair, tmp_path):
    """A slow step (a big model) holds the run; quitting returns at once and the step still lands in the file."""
    import threading
    import time

    from hierui.explorer.live import LiveRun

    live = LiveRun(tiny_pair, "Hello", StepSettings(max_new_tokens=5), tmp_path)
    live.step()
    entered, release = threading.Event(), threading.Event()
    original = live.stepper.batch.step

    def slow_step():
        entered.set()
        release.wait(10)
        return original()

    live.stepper.batch.step = slow_step
    worker = threading.Thread(target=live.step)
    worker.start()
    entered.wait(5)
    started = time.perf_counter()
    live.close()
    assert time.perf_counter() - started < 0.5 and not live.closed
    release.set()
    worker.join(10)
    session = load_session(live.path)
    assert live.closed and len(session.steps) == 2 and session.summary["steps"] == 2
    assert live.step() is None


def test_settings_are_frozen_and_a_restart_closes_the_old_run_with_its_own_settings(tiny_pair, tmp_path):
    """Switching mode makes new settings; the old session keeps its mode, in its header and its summary."""
    import dataclasses

    with pytest.raises(dataclasses.FrozenInstanceError):
        StepSettings().mode = "free"
    app = live_app(tiny_pair, tmp_path)

    async def scenario():
        async with app.run_test(size=SIZE) as pilot:
            await settle(app, pilot)
            for _ in range(2):
                await pilot.press("space")
                await settle(app, pilot)
            old = app.live
            await pilot.press("m")
            await settle(app, pilot)
            assert app.settings.mode == "free" and app.live.settings.mode == "free" and app.live is not old
            assert old.settings.mode == "shared"
            return old.path

    session = load_session(run(scenario()))
    assert session.header["mode"] == "shared" and len(session.steps) == 2
    assert session.summary is not None and "first_divergence" not in session.summary  # a shared-mode summary


def test_a_restart_never_waits_for_a_step_in_flight(tiny_pair, tmp_path):
    """`m` while a (slow) step is in flight restarts at once; the old step lands in the old file on its thread."""
    import threading

    app = live_app(tiny_pair, tmp_path)
    entered, release, returned = threading.Event(), threading.Event(), threading.Event()

    async def scenario():
        async with app.run_test(size=SIZE) as pilot:
            await settle(app, pilot)
            await pilot.press("space")
            await settle(app, pilot)
            old = app.live
            original = old.stepper.batch.step

            def slow_step():
                entered.set()
                release.wait(10)
                try:
                    return original()
                finally:
                    returned.set()

            old.stepper.batch.step = slow_step
            await pilot.press("space")
            await asyncio.to_thread(entered.wait, 5)
            await pilot.press("m")
            await pilot.pause()
            in_flight = not returned.is_set()
            assert app.settings.mode == "free" and app.live is not old and app.records == []
            release.set()
            await settle(app, pilot)
            await asyncio.to_thread(returned.wait, 5)
            assert app.records == []  # the old run's late step is not shown in the new one
            return in_flight, old

    in_flight, old = run(scenario())
    assert in_flight, "the UI waited for the step in flight before restarting"
    session = load_session(old.path)
    assert old.closed and len(session.steps) == 2 and session.summary["steps"] == 2


def test_worker_failures_are_shown_not_silent(tiny_pair, tmp_path):
    def broken(progress):
        raise RuntimeError("the weights are on fire")

    app = HieruiApp(pair_factory=broken, prompt="Hi", settings=StepSettings(max_new_tokens=3), session_dir=tmp_path)

    async def loading():
        async with app.run_test(size=SIZE) as pilot:
            await settle(app, pilot)
            assert app.state == "failed" and "the weights are on fire" in text_of(app, "#status")
            assert any("RuntimeError: the weights are on fire" in n for n in notes_of(app))

    run(loading())
    stepping = live_app(tiny_pair, tmp_path)

    async def step_fails():
        async with stepping.run_test(size=SIZE) as pilot:
            await settle(stepping, pilot)

            def bad_step():
                raise ValueError("a shape went wrong")

            stepping.live.stepper.batch.step = bad_step
            await pilot.press("space")
            await settle(stepping, pilot)
            assert stepping.state == "failed"
            assert any("ValueError: a shape went wrong" in n for n in notes_of(stepping))

    run(step_fails())


def test_command_palette_lists_every_binding(tiny_pair, tmp_path):
    app = live_app(tiny_pair, tmp_path)

    async def scenario():
        async with app.run_test(size=SIZE) as pilot:
            await settle(app, pilot)
            commands = {c.title: c for c in app.get_system_commands(app.screen)}
            for binding in app.BINDINGS:
                if binding.action.split("(")[0] in app.PALETTE_SKIP:
                    continue
                assert commands[binding.description].help == binding.tooltip
            await commands["Mode"].callback()
            await pilot.pause()
            assert app.settings.mode == "free"
            await commands["Session file"].callback()
            await pilot.pause()
            assert any("nothing recorded yet" in n for n in notes_of(app))

    run(scenario())


def test_replay_in_the_ui_and_a_bad_model_on_explore_import_no_torch(tmp_path):
    """`python -X importtime`: the explorer replaying a session, and explore refusing a bad model, load no torch."""
    import subprocess
    import sys
    from pathlib import Path

    example = Path(__file__).resolve().parent.parent / "sessions" / "factual-wanda-0.5-shared.jsonl"
    script = (
        "import asyncio\n"
        "from engine.record.session import load_session\n"
        "from hierui.explorer.app import HieruiApp\n"
        f"app = HieruiApp(session=load_session({str(example)!r}))\n"
        "async def go():\n"
        "    async with app.run_test(size=(120, 40)) as pilot:\n"
        "        await pilot.press('left', 'r')\n"
        "        await pilot.pause()\n"
        "asyncio.run(go())\n"
    )

    def imported(*args):
        done = subprocess.run([sys.executable, "-X", "importtime", *args], capture_output=True, text=True, timeout=120)
        names = {
            line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")
        }
        return done, names

    done, names = imported("-c", script)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "textual" in names and "torch" not in names and "transformers" not in names
    done, names = imported("-m", "hierui", "explore", "--model", "llama-9000")
    assert done.returncode == 2 and "unknown model 'llama-9000'" in done.stderr
    assert "torch" not in names and "transformers" not in names


def test_a_multi_token_choice_is_reported_in_the_explorer_and_in_show(tiny_pair, tmp_path, cli):
    """A choice of several tokens is read through its first token: the user is told, live and in `show`."""
    app = live_app(tiny_pair, tmp_path, choices=["A", "Bc"])

    async def scenario():
        async with app.run_test(size=SIZE) as pilot:
            await settle(app, pilot)
            assert any("'Bc' is 2 tokens; its first token stands for it" in n for n in notes_of(app))
            await pilot.press("space")
            await settle(app, pilot)
            return app.live.path

    path = run(scenario())
    assert load_session(path).header["choice_notes"] == ["choice 'Bc' is 2 tokens; its first token stands for it"]
    shown = cli("show", path)
    assert shown.returncode == 0 and "note: choice 'Bc' is 2 tokens" in shown.stdout


def test_resizing_the_terminal_switches_the_layout():
    """Narrower than 110 columns or shorter than 34 rows, the panels stack; back to wide, they sit side by side."""
    from pathlib import Path

    session = load_session(Path(__file__).resolve().parent.parent / "sessions" / "factual-wanda-0.5-shared.jsonl")
    app = HieruiApp(session=session)

    async def scenario():
        async with app.run_test(size=SIZE) as pilot:
            await pilot.pause()
            row = app.query_one("#row")
            assert {"-wide", "-tall"} <= app.screen.classes and len(row.styles.grid_columns) == 3
            await pilot.resize_terminal(80, 24)
            await pilot.pause()
            assert {"-narrow", "-short"} <= app.screen.classes and len(row.styles.grid_columns) == 2
            await pilot.resize_terminal(120, 30)
            await pilot.pause()
            assert "-short" in app.screen.classes and len(row.styles.grid_columns) == 2
            await pilot.resize_terminal(120, 40)
            await pilot.pause()
            assert len(row.styles.grid_columns) == 3

    run(scenario())


def _rendered_at_width(app, selector) -> str:
    """A panel's content rendered at the panel's own width (what the screen shows, cut or not)."""
    from rich.console import Console

    widget = app.query_one(selector)
    console = Console(width=widget.content_size.width, record=True)
    console.print(widget.content)
    return console.export_text()


@pytest.mark.parametrize("name", ["story-wanda-0.5-free.jsonl", "choice-wanda-0.5-shared.jsonl"])
def test_the_hierarchy_and_top_k_cut_nothing_at_120x40(name):
    """Every label and value of the hierarchy panel shows whole at every step of a shipped session (free and
    shared mode); the final layer's cosine is in view in the layer panel without scrolling."""
    from pathlib import Path

    session = load_session(Path(__file__).resolve().parent.parent / "sessions" / name)
    app = HieruiApp(session=session)

    async def scenario():
        async with app.run_test(size=SIZE) as pilot:
            await pilot.pause()
            for index in range(len(session.steps)):
                app.selected = index
                await pilot.pause()
                shown = _rendered_at_width(app, "#spaces")
                assert "…" not in shown, (index, shown)
                step = session.steps[index]
                if ended_note(step):  # a model had ended: the panel says so instead of comparing
                    assert "nothing to compare" in shown, shown
                elif step.get("first_divergence") is not None:
                    assert re.search(rf"texts split\s+step {step['first_divergence'] + 1}\b", shown), shown
            # the layer panel at the last step that compares both models (after a model ended there is nothing)
            compared = max(i for i, step in enumerate(session.steps) if not ended_note(step))
            app.selected = compared
            await pilot.pause()
            layers = app.query_one("#layers")
            assert layers.scroll_y == 0
            top = text_of(app, "#layers").splitlines()[: layers.content_size.height]
            assert any(line.strip().startswith("out") and "← final" in line for line in top)
            last_layer = f"{len(session.steps[compared]['emb_cos']) - 2:>5} "
            assert any(line.startswith(last_layer) for line in text_of(app, "#layers").splitlines())

    run(scenario())


def test_the_header_keeps_the_state_at_80_columns(tiny_pair, tmp_path):
    """At 80×24 the header drops detail (calibration, what T changes, the step limit) and shortens the
    model's name before it would lose the state."""
    from hierui.explorer.widgets.info import InfoBar

    app = live_app(tiny_pair, tmp_path)

    async def scenario():
        async with app.run_test(size=(80, 24)) as pilot:
            await settle(app, pilot)
            info = app.query_one("#info", InfoBar)
            assert info.line().endswith("● ready") and len(info.line()) <= 78
            info.header = {**info.header, "model_display": "SmolLM2-135M-Instruct (embedded) with a long name"}
            await pilot.press("space")
            await settle(app, pilot)
            line = info.line()
            assert line.endswith("⏸ paused") and "step 1/1" in line and len(line) <= 78

    async def wide():
        wide_app = live_app(tiny_pair, tmp_path)
        async with wide_app.run_test(size=(160, 40)) as pilot:
            await settle(wide_app, pilot)
            assert "T=1 (probabilities; greedy)" in wide_app.query_one("#info", InfoBar).line()

    run(scenario())
    run(wide())


def test_chart_legend_space_tokens_and_whole_top_k_tokens(tiny_pair, tmp_path):
    """The chart names its five series in its border at every size; a token of spaces shows as ␣; a top-k
    token longer than the old 10-character cut shows whole when the panel has room."""
    from hierui.explorer.widgets.chart import SERIES
    from hierui.tokentext import token

    assert token(" ") == "␣" and token("  ") == "␣␣" and token(" a") == " a" and token("\n") == "⏎\n"
    record = {"step": 0, "topk_d": [[1, " wonderful,", 0.5]], "topk_p": [[2, " internationally", 0.4]], "kl": 0.1}
    for size in ((120, 40), (80, 24)):
        app = live_app(tiny_pair, tmp_path)

        async def scenario(app=app, size=size):
            async with app.run_test(size=size) as pilot:
                await settle(app, pilot)
                legend = app.query_one("#chart").border_subtitle
                assert all(label in str(legend) for label, *_ in SERIES)
                app.records = [record]
                app.selected = 0
                await pilot.pause()
                topk = app.query_one("#topk")
                return topk.token_width(), topk.rows[0][1].plain, topk.rows[0][3].plain

        width, dense, perturbed = run(scenario())
        if size == (120, 40):
            assert width >= 11 and dense == "·wonderful,"  # the old fixed cut showed "·wonderfu…"
        assert dense == ("·wonderful," if width >= 11 else "·wonderful,"[: width - 1] + "…")
        assert perturbed == "·internationally"[: width - 1] + "…"


def test_free_mode_marks_where_a_model_ended_and_the_other_goes_on(tiny_pair, tmp_path):
    probe = Stepper(tiny_pair, "Hello there", StepSettings(mode="free", max_new_tokens=8)).run()
    target = probe[2]["token_d"]
    app = live_app(tiny_pair, tmp_path, mode="free", max_new_tokens=8, choices=None)

    async def scenario():
        async with app.run_test(size=SIZE) as pilot:
            await settle(app, pilot)
            app.live.stepper.batch.eos = {target}
            for _ in range(8):
                await pilot.press("space")
                await settle(app, pilot)
            records = app.records
            end = next(r["end_d"] for r in records if r["end_d"] is not None)
            assert records[end]["token_d"] == target
            after = [r for r in records if r["step"] > end]
            assert len(records) == 8 and after and all(r["token_p"] is not None for r in after)  # it went on
            assert all(r["kl"] is None and r["text_d"] == "" for r in after)
            assert f"⏹ end (step {end + 1})" in text_of(app, "#dense")
            assert f"dense ended at step {end + 1}: nothing to compare" in _rendered(app, "#spaces")

    run(scenario())


# ------------------------------------------------------------------ where it breaks: map, attribution, branches


def _heatmap_rows(app) -> list[str]:
    return text_of(app, "#heatmap").splitlines()


def test_the_layer_map_fills_live_and_toggles_to_dense_final(tiny_pair, tmp_path):
    """The layer × step map shows a column per step and a row per layer (tiny-random: 4); `v` switches it from
    lens KL to the dense-final KL and back, its title saying which; the selected step is marked on the axis."""
    app = live_app(tiny_pair, tmp_path, choices=None)

    async def scenario():
        async with app.run_test(size=SIZE) as pilot:
            await settle(app, pilot)
            for _ in range(3):
                await pilot.press("space")
                await settle(app, pilot)
            heatmap = app.query_one("#heatmap")
            assert heatmap.view == "lens" and heatmap.border_title.startswith("lens KL")
            assert heatmap.shown["steps"] == (0, 3) and heatmap.shown["layers"] == 4
            rows = _heatmap_rows(app)
            assert [r.split()[0] for r in rows[1:5]] == ["1", "2", "3", "4"] and "▲3" in rows[-1]
            lens_cells = rows[1:5]
            await pilot.press("v")
            await pilot.pause()
            assert heatmap.view == "final" and heatmap.border_title.startswith("dense final KL")
            assert _heatmap_rows(app)[1:5] == lens_cells  # the same glyphs; the colours are the other field's
            await pilot.press("left")
            await pilot.pause()
            assert "▲2" in _heatmap_rows(app)[-1]
            await pilot.press("v")
            await pilot.pause()
            assert heatmap.view == "lens"

    run(scenario())


def test_the_layer_map_bins_many_layers_and_follows_the_selected_step():
    """Eighty layers in a short panel share rows (the largest value of each bin; the title says so); of many
    steps the newest that fit are shown, and selecting an older one moves the window just enough."""
    from hierui.explorer.widgets.heatmap import aggregate, bins, color

    assert bins(80, 12)[0] == (0, 6) and bins(80, 12)[-1] == (73, 80) and len(bins(3, 12)) == 3
    assert aggregate([0.1, None, 0.3, 0.2], [(0, 2), (2, 4)]) == [0.1, 0.3]
    assert color(None) is None and color(0.0) == color(1e-9) != color(1e-3) != color(50.0)
    records = [
        {"step": i, "kl": 0.1, "top1_agree": i % 7 != 3, "near_tie": i == 24, "lens_kl": [0.01 * k for k in range(80)]}
        for i in range(200)
    ]
    from hierui.explorer.app import HieruiApp

    session = load_session(_lens_session_path())
    app = HieruiApp(session=session)

    async def scenario():
        async with app.run_test(size=SIZE) as pilot:
            await pilot.pause()
            app.records = records
            app.selected = 199
            await pilot.pause()
            heatmap = app.query_one("#heatmap")
            first, stop = heatmap.shown["steps"]
            assert stop == 200 and 40 < stop - first < 60
            assert "80 layers →" in heatmap.border_title and "(max)" in heatmap.border_title
            app.selected = 20
            await pilot.pause()
            assert heatmap.shown["steps"][0] == 20 and "▲21" in _heatmap_rows(app)[-1]
            top = _heatmap_rows(app)[0]
            # the selected step 21 (▼), a near tie at step 25 (≈), a flip at step 32 (✗), step 33 agrees
            assert [top[LABEL_COLUMNS + i] for i in (0, 4, 11, 12)] == ["▼", "≈", "✗", " "]

    run(scenario())


LABEL_COLUMNS = 5  # hierui.explorer.widgets.heatmap.LABEL


def _lens_session_path():
    from pathlib import Path

    return Path(__file__).resolve().parent / "data" / "lens-wanda-0.5-shared.jsonl"


def test_a_replay_without_the_lens_says_so_and_attribution_needs_the_models(tiny_pair, tmp_path):
    path = tmp_path / "nolens.jsonl"
    SessionRecorder(Stepper(tiny_pair, "No lens", StepSettings(max_new_tokens=4, lens=False)), [path]).run()
    session = load_session(path)
    assert session.header.lens == "off" and "lens_kl" not in session.steps[0]
    app = HieruiApp(session=session)

    async def scenario():
        async with app.run_test(size=SIZE) as pilot:
            await pilot.pause()
            assert "the logit lens was off for this run (--lens off)" in text_of(app, "#heatmap")
            for key, what in (("a", "attribution"), ("b", "branching")):
                await pilot.press(key)
                await pilot.pause()
                assert any(n.startswith(f"{what} needs the models, and a replay loads none") for n in notes_of(app))
            assert app.query_one("#switch").current == "chart"

    run(scenario())


def test_attribution_ranks_the_dropped_attention_first(tiny, tiny_calib, tmp_path):
    """attndrop:1 removes one attention sublayer; attributing a step ranks restoring it first (all of the KL)."""
    from engine.perturb import perturb

    pair = perturb(tiny, "attndrop:1", calibration=tiny_calib, use_cache=False)
    dropped = pair.report.details["dropped"][0]
    app = live_app(pair, tmp_path, choices=None)

    async def scenario():
        async with app.run_test(size=SIZE) as pilot:
            await settle(app, pilot)
            for _ in range(3):
                await pilot.press("space")
                await settle(app, pilot)
            await pilot.press("left", "a")
            await settle(app, pilot)
            panel = app.query_one("#attribution")
            assert app.query_one("#switch").current == "attribution" and panel.step == 1
            assert panel.lines[0] == f"attn.{dropped}" and panel.result.ranked("sublayer")[0].restored_kl > 0.99
            shown = text_of(app, "#attribution")
            assert f"attn.{dropped}" in shown.splitlines()[1] and "100%" in shown.splitlines()[1]
            assert "minimal set" in shown and "step 2" in panel.border_title
            await pilot.press("a")  # again on the same step: back to the chart
            await pilot.pause()
            assert app.query_one("#switch").current == "chart"
            await pilot.press("a")  # and again: the result is kept, no second run
            await pilot.pause()
            assert app.query_one("#switch").current == "attribution" and panel.lines[0] == f"attn.{dropped}"

    run(scenario())


def test_branching_from_an_alternative_records_a_linked_session(tiny_pair, tmp_path):
    """b at a step, then an alternative: a new run continues the perturbed context before that step with the
    chosen token (the last token of the header's prefix_ids), its header naming the parent session and step;
    u goes back to the parent, which kept its steps and can go on stepping."""
    app = live_app(tiny_pair, tmp_path, choices=None, max_new_tokens=6)

    async def scenario():
        async with app.run_test(size=SIZE) as pilot:
            await settle(app, pilot)
            app.live.stepper.batch.eos = set()  # tiny-random may say </s> early: keep it going
            for _ in range(4):
                await pilot.press("space")
                await settle(app, pilot)
            parent, parent_records = app.live, list(app.records)
            await pilot.press("left", "b")
            await pilot.pause()
            chooser = app.screen
            entry = chooser.entries[1]
            await pilot.press("2")
            await settle(app, pilot)
            branch = app.live
            assert branch is not parent and not parent.closed
            link = branch.header["parent"]
            assert link["session"] == str(parent.path) and link["step"] == 2 and link["token"] == entry["token"]
            fed = [r["fed"][1] for r in parent_records[:2]]
            assert branch.header["prefix_ids"] == [*fed, entry["token"]] and branch.header["start_step"] == 3
            assert "⑂ branch of step 3" in text_of(app, "#info") and app.records  # it ran
            assert "⑂" in text_of(app, "#dense")
            await pilot.press("u")
            await settle(app, pilot)
            assert app.live is parent and app.records == parent_records and app.selected == 2
            assert "branch" not in text_of(app, "#info") and branch.closed
            await pilot.press("space")
            await settle(app, pilot)
            assert len(app.records) == 5
            return branch.path, parent.path

    branch_path, parent_path = run(scenario())
    session = load_session(branch_path)
    assert session.header["parent"]["session"] == str(parent_path) and session.complete
    assert session.header["prefix_ids"][-1] == session.header["parent"]["token"]


def test_the_counterfactual_branch_shows_under_the_texts_live_and_in_replay(tiny_pair, tmp_path):
    """--counterfactual (free mode): when the run has finished, the line under the texts says which dense token was
    fed where the texts split, what the perturbed model wrote from there, and whether it recovered; a replay of
    the session shows the same line from the file."""
    app = live_app(tiny_pair, tmp_path, mode="free", counterfactual=True, choices=None, max_new_tokens=6)

    async def scenario():
        async with app.run_test(size=SIZE) as pilot:
            await settle(app, pilot)
            app.live.stepper.batch.eos = set()
            await pilot.press("r")
            await settle(app, pilot)
            assert app.state == "done"
            return text_of(app, "#counterfactual"), app.live.path

    line, path = run(scenario())
    session = load_session(path)
    first = session.steps[-1]["first_divergence"]
    assert session.branch is not None and session.branch.at == first
    assert line.startswith("⑂ counterfactual: fed the dense token") and f"at step {first + 1}," in line
    assert ("recover" in line) or ("nothing left" in line)
    replay = HieruiApp(session=session)

    async def replayed():
        async with replay.run_test(size=SIZE) as pilot:
            await pilot.pause()
            assert replay.query_one("#counterfactual").display and text_of(replay, "#counterfactual") == line

    run(replayed())
