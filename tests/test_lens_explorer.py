"""The logit lens behind the explorer's stepping (issue 26): a session's lens lines (written when a step's lens is
computed, merged into the step when read back) and the explorer's lens worker, which fills the layer × step map
behind the stepping loop, the selected step first."""

import asyncio
import json
import math
import threading

import pytest

from engine.errors import HieruiError
from engine.record.paths import WriteFailed
from engine.record.schema import LENS_FIELDS
from engine.record.session import SessionWriter, load_session

LAYERS = 3


def _values(step: int) -> dict:
    return {
        "lens_kl": [0.1 * step, 0.2, None],
        "lens_top1_agree": [True, False, None],
        "lens_dense_final_kl": [0.3, 0.01 * step, 0.0],
    }


def _step(step: int) -> dict:
    return {"step": step, "token_d": 1, "token_p": 2, "kl": 0.5, **{name: None for name in LENS_FIELDS}}


def _writer(path, steps: int = 3) -> SessionWriter:
    writer = SessionWriter(path, {"model": "tiny-random", "prompt": "x", "layers": LAYERS})
    for step in range(steps):
        writer.write_step(_step(step))
    return writer


def test_lens_lines_are_merged_into_their_steps_before_and_after_the_closing_line(tmp_path):
    """Guards SessionWriter.write_lens and load_session's lens lines: lines in any order after their step, one
    after the closing summary (a run that finished before its lens), read back into the steps they name; a step
    no lens line completes stays null."""
    path = tmp_path / "s.jsonl"
    writer = _writer(path, steps=4)
    writer.write_lens(2, _values(2))
    writer.write_lens(0, _values(0))
    writer.close({"steps": 4})
    writer.write_lens(1, {**_values(1), "lens_kl": [math.nan, 0.2, None]})  # appended to the closed file
    session = load_session(path)
    assert session.complete and len(session.steps) == 4 and not session.warnings
    for step in (0, 2):
        assert {name: session.steps[step][name] for name in LENS_FIELDS} == _values(step)
    assert session.steps[1]["lens_kl"] == [None, 0.2, None]  # NaN written as null
    assert all(session.steps[3][name] is None for name in LENS_FIELDS)
    assert session.steps[2]["kl"] == 0.5  # the step's own fields kept
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [("lens_of" in line, "end" in line) for line in lines[-2:]] == [(False, True), (True, False)]


BAD_LENS = {
    "before-its-step": ({"lens_of": 5, **_values(0)}, "line 5: lens_of is 5, expected a step of an earlier line"),
    "not-a-step": ({"lens_of": "two", **_values(0)}, 'line 5: lens_of is "two", expected an integer'),
    "missing-field": ({"lens_of": 1, "lens_kl": [0.1, 0.2, 0.3]}, "line 5: lens_top1_agree is null, expected a list"),
    "per-layer": ({"lens_of": 1, **_values(0), "lens_kl": [0.1, 0.2]}, "line 5: lens_kl is [0.1,0.2], expected one"),
    "not-finite": ({"lens_of": 1, **_values(0), "lens_kl": [0.1, "Infinity", 0.3]}, 'lens_kl[1] is "Infinity"'),
    "agree-not-bool": ({"lens_of": 1, **_values(0), "lens_top1_agree": [True, "yes", None]}, "lens_top1_agree[1]"),
}


@pytest.mark.parametrize("kind", sorted(BAD_LENS))
def test_a_bad_lens_line_is_one_line_naming_the_file_and_line(tmp_path, kind):
    """Guards the lens line's checks (engine.record.validate.check_lens): a lens line is untrusted input like any
    other line; each problem is one HieruiError naming the file, the line and the field."""
    line, expected = BAD_LENS[kind]
    path = tmp_path / f"{kind}.jsonl"
    _writer(path).close()
    with path.open("a") as f:
        f.write(json.dumps(line) + "\n")
    with pytest.raises(HieruiError) as info:
        load_session(path)
    assert str(path) in str(info.value) and expected in str(info.value) and "\n" not in str(info.value)


def test_a_non_finite_lens_value_as_json_spells_it_is_refused(tmp_path):
    """Guards the finite-or-null rule of lens values against NaN spelled as JSON allows it (not only strings)."""
    path = tmp_path / "nan.jsonl"
    _writer(path).close()
    with path.open("a") as f:
        f.write(
            '{"lens_of": 0, "lens_kl": [NaN, 0, 0], "lens_top1_agree": [true, true, true], '
            '"lens_dense_final_kl": [0, 0, 0]}\n'
        )
    with pytest.raises(HieruiError, match=r"line 5: lens_kl\[0\] is NaN, expected a list of finite numbers"):
        load_session(path)


def test_a_lens_given_twice_is_refused(tmp_path):
    """Guards against a lens line overwriting values already read (its step's own line or an earlier lens line)."""
    path = tmp_path / "twice.jsonl"
    writer = _writer(path)
    writer.write_lens(1, _values(1))
    writer.write_lens(1, _values(1))
    writer.close()
    with pytest.raises(HieruiError, match="line 6 gives the lens of step 1 again"):
        load_session(path)


def test_a_truncated_lens_line_is_dropped_with_a_warning(tmp_path):
    """Guards the crash rule for lens lines: a last line cut short is dropped with a warning, every step kept."""
    path = tmp_path / "cut.jsonl"
    writer = _writer(path)
    writer.write_lens(0, _values(0))
    writer.close()
    text = path.read_text()
    path.write_text(text + json.dumps({"lens_of": 1, **_values(1)})[:30])
    session = load_session(path)
    assert len(session.steps) == 3 and session.steps[0]["lens_kl"] == _values(0)["lens_kl"]
    assert session.steps[1]["lens_kl"] is None and "truncated last line" in session.warnings[0]


def test_a_lens_line_after_the_file_was_removed_fails_and_makes_no_file(tmp_path):
    """Guards write_lens after close: the closed file is appended to, never made anew (a file of a lens line
    alone is no session); its loss is WriteFailed naming the file."""
    path = tmp_path / "gone.jsonl"
    writer = _writer(path)
    writer.close({"steps": 3})
    path.unlink()
    with pytest.raises(WriteFailed, match="gone.jsonl"):
        writer.write_lens(0, _values(0))
    assert not path.exists()


def test_steps_and_lens_lines_from_two_threads_never_interleave(tmp_path):
    """Guards the writer's lock: the stepping thread's step lines and the lens worker's lens lines, written at
    once, are each whole (every line reads back)."""
    path = tmp_path / "threads.jsonl"
    writer = _writer(path, steps=0)
    wide = {name: [v] * 400 for name, v in (("lens_kl", 0.5), ("lens_top1_agree", True), ("lens_dense_final_kl", 1.0))}
    count = 300
    written = threading.Semaphore(0)

    def lens():
        for step in range(count):
            written.acquire()
            writer.write_lens(step, wide)

    thread = threading.Thread(target=lens)
    thread.start()
    for step in range(count):
        writer.write_step({**_step(step), "text_d": "x" * 4000})
        written.release()
    thread.join()
    writer.close()
    header = json.loads(path.read_text().splitlines()[0])
    header["layers"] = 400
    lines = path.read_text().splitlines()
    path.write_text("\n".join([json.dumps(header), *lines[1:]]) + "\n")
    session = load_session(path)
    assert len(session.steps) == count and all(s["lens_kl"] == wide["lens_kl"] for s in session.steps)


# ------------------------------------------------------------------ the explorer: the map filled behind the stepping

SIZE = (120, 40)


@pytest.fixture(scope="module")
def tiny_pair(tiny):
    from engine.perturb import perturb

    return perturb(tiny, "magnitude:0.5", use_cache=False)


def _app(tiny_pair, tmp_path, **settings):
    from engine.record.settings import StepSettings
    from hierui.explorer.app import HieruiApp

    opts = {"max_new_tokens": 12, "choices": ["A", "B"], **settings}
    app = HieruiApp(
        pair_factory=lambda progress: tiny_pair,
        prompt="Hello there",
        settings=StepSettings(**opts),
        session_dir=tmp_path,
    )
    return app


async def _settle(app, pilot):
    """Every worker done, the lens worker too (it is started again by the last StepDone)."""
    for _ in range(20):
        await pilot.pause()
        await app.workers.wait_for_complete()
        await pilot.pause()
        if not any(w.is_running for w in app.workers):
            return


async def _steps(app, pilot, count: int) -> None:
    """Press space `count` times, each step shown before the next (the stepping worker only: the lens may lag)."""
    for _ in range(count):
        want = len(app.records) + 1
        await pilot.press("space")
        for _ in range(400):
            await asyncio.sleep(0.005)
            await pilot.pause()
            if len(app.records) >= want and not any(w.is_running for w in app.workers if w.group == "step"):
                break
        assert len(app.records) == want


class Gate:
    """Wraps a live run's lens computation: records the order of the steps computed, and holds the first one
    until `open()` (so a test can step, select and restart while the lens is behind)."""

    def __init__(self, live, values=None):
        self.batch = live.stepper.batch
        self.compute = self.batch.compute_lens
        self.order: list[int] = []
        self.event = threading.Event()
        self.values = values
        self.batch.compute_lens = self

    def __call__(self, row, step):
        self.order.append(step)
        if len(self.order) == 1:
            assert self.event.wait(20), "the gate was never opened"
        values = self.compute(row, step)
        return values if self.values is None or values is None else self.values

    def open(self):
        self.event.set()


def _lens(record: dict) -> dict:
    return {name: record[name] for name in LENS_FIELDS}


def _close(a, b, tol=1e-6) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], tol) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_close(x, y, tol) for x, y in zip(a, b))
    if a is None or b is None or isinstance(a, bool):
        return a == b
    return abs(a - b) <= tol


def test_the_map_fills_in_behind_stepping_equal_to_the_lens_in_the_step(tiny_pair, tmp_path):
    """Guards the explorer's lens worker (issue 26): stepping with the lens "all" does not compute it in the step
    (the records arrive with it null), yet every step gets its column, equal to a stepper computing the lens in
    the step to 1e-6; the session file, read back, holds what was shown (its lens lines merged)."""
    from engine.record.settings import StepSettings
    from engine.run.stepper import Stepper

    app = _app(tiny_pair, tmp_path)
    arrived = []

    async def scenario():
        async with app.run_test(size=SIZE) as pilot:
            await _settle(app, pilot)
            app.live.stepper.batch.eos = set()
            step = app.live.stepper.batch.step

            def spy():
                records = step()
                arrived.extend(r for r in records if r is not None)
                return records

            app.live.stepper.batch.step = spy
            await _steps(app, pilot, 6)
            await _settle(app, pilot)
            heatmap = app.query_one("#heatmap")
            assert heatmap.shown["pending"] == [] and heatmap.shown["layers"] == 4
            assert "░" not in "".join(_heatmap_rows(app))
            shown = list(app.records), app.live.path
            await pilot.press("q")  # the session closed with its summary
            return shown

    records, path = asyncio.run(scenario())
    assert len(records) == 6 and all(r["lens_kl"] is None for r in arrived)  # not computed in the step
    reference = Stepper(tiny_pair, "Hello there", StepSettings(max_new_tokens=12, choices=["A", "B"], lens="all"))
    reference.batch.eos = set()
    for _ in range(6):
        reference.step()
    for shown, sync in zip(records, reference.records):
        assert shown["token_d"] == sync["token_d"] and _close(_lens(shown), _lens(sync)), shown["step"]
    session = load_session(path)
    assert session.complete and [_lens(s) for s in session.steps] == [_lens(r) for r in records]


def _subtitle(heatmap) -> str:
    """The map's bottom border as text (Textual keeps it as markup)."""
    from rich.text import Text

    return Text.from_markup(str(heatmap.border_subtitle)).plain


def _heatmap_rows(app) -> list[str]:
    widget = app.query_one("#heatmap")
    return widget.content.plain.splitlines() if hasattr(widget.content, "plain") else str(widget.content).splitlines()


def test_the_selected_step_is_computed_first_and_stepping_never_waits(tiny_pair, tmp_path):
    """Guards the lens worker's order and the loop's independence: with the lens of step 1 held, five more steps
    are taken (the loop does not wait), their columns pending (░, said in the border); selecting step 3 makes it
    the next computed, then the oldest first."""
    app = _app(tiny_pair, tmp_path)

    async def scenario():
        async with app.run_test(size=SIZE) as pilot:
            await _settle(app, pilot)
            app.live.stepper.batch.eos = set()
            gate = Gate(app.live)
            await _steps(app, pilot, 5)
            heatmap = app.query_one("#heatmap")
            assert gate.order == [0] and heatmap.shown["pending"] == [0, 1, 2, 3, 4]
            assert heatmap.shown["layers"] == 4 and "5 computing" in _subtitle(heatmap)
            assert all(row[5:].startswith("░░░░░") for row in _heatmap_rows(app)[1:5])
            await pilot.press("left", "left")
            await pilot.pause()
            assert app.selected == 2
            gate.open()
            await _settle(app, pilot)
            assert gate.order == [0, 2, 1, 3, 4]
            assert heatmap.shown["pending"] == [] and all(r["lens_kl"] is not None for r in app.records)
            assert "computing" not in _subtitle(heatmap)

    asyncio.run(scenario())


def test_a_restart_mid_lens_applies_no_stale_values(tiny_pair, tmp_path):
    """Guards the run id on LensDone: the old run's lens finishing after a restart (m) changes nothing in the new
    run's map, no worker fails, and the old session is closed with its summary."""
    app = _app(tiny_pair, tmp_path)
    stale = {name: [123.0] * 4 if name != "lens_top1_agree" else [False] * 4 for name in LENS_FIELDS}

    async def scenario():
        async with app.run_test(size=SIZE) as pilot:
            await _settle(app, pilot)
            old = app.live
            gate = Gate(old, values=stale)
            await _steps(app, pilot, 3)
            await pilot.press("m")  # a restart in free mode, the old run's lens of step 1 still computing
            await pilot.pause()
            assert app.live is not old and app.records == []
            await _steps(app, pilot, 2)
            gate.open()
            await _settle(app, pilot)
            assert all(r["lens_kl"] is not None and r["lens_kl"] != stale["lens_kl"] for r in app.records)
            assert gate.order == [0]  # the old run computed nothing more once it was closed
            errors = [n for n in app._notifications if n.severity == "error"]
            assert not errors and app.state != "failed"
            return old.path

    old_path = asyncio.run(scenario())
    session = load_session(old_path)
    assert session.complete and len(session.steps) == 3
    assert [s["lens_kl"] for s in session.steps] == [stale["lens_kl"], None, None]  # the rest never computed
    _replay_shows_not_computed(session)


def _replay_shows_not_computed(session):
    """The replay of a run closed before its lens: the steps never computed are ░ columns, "uncomputed"."""
    from hierui.explorer.app import HieruiApp

    app = HieruiApp(session=session)

    async def scenario():
        async with app.run_test(size=SIZE) as pilot:
            await pilot.pause()
            heatmap = app.query_one("#heatmap")
            subtitle = _subtitle(heatmap)
            assert heatmap.shown["pending"] == [1, 2] and "░ 2 uncomputed" in subtitle and "computing" not in subtitle

    asyncio.run(scenario())


def test_only_a_step_the_lens_will_fill_is_pending():
    """Guards the pending look against the other nulls: a step of a `--lens sampled` run left out, or a step after
    a model ended, is · (nothing to show), not ░."""
    from hierui.explorer.widgets.heatmap import pending

    step = {"token_d": 5, "token_p": 6, "lens_kl": None}
    assert pending(step, "lens_kl", "all")
    assert not pending(step, "lens_kl", "sampled") and not pending(step, "lens_kl", None)
    assert not pending({**step, "token_d": None}, "lens_kl", "all")  # the dense model had ended
    assert not pending({"token_d": 5, "token_p": 6}, "lens_kl", "all")  # no lens fields at all
    assert not pending({**step, "lens_kl": [0.1]}, "lens_kl", "all")
