"""Snapshots of the explorer's main screen (pytest-textual-snapshot): replay of a shipped session, live tiny-random.

Update after an intended change with `pytest tests/test_snapshots.py --snapshot-update` and look at the SVGs.
"""

from pathlib import Path

import pytest

from engine.session import load_session
from engine.stepper import StepSettings
from hierui.app import HieruiApp

EXAMPLE = Path(__file__).resolve().parent.parent / "sessions" / "factual-wanda-0.5-shared.jsonl"


def replay_app():
    return HieruiApp(session=load_session(EXAMPLE))


@pytest.mark.parametrize("size", [(120, 40), (80, 24)])
def test_replay_screen(snap_compare, size):
    async def select_a_middle_step(pilot):
        await pilot.pause()
        for _ in range(10):
            await pilot.press("left")
        await pilot.pause()

    assert snap_compare(replay_app(), terminal_size=size, run_before=select_a_middle_step)


def test_live_screen_after_steps(snap_compare, tiny, tmp_path):
    from engine.perturb import perturb

    pair = perturb(tiny, "magnitude:0.5", use_cache=False)
    app = HieruiApp(pair_factory=lambda progress: pair, prompt="Hello there",
                    settings=StepSettings(max_new_tokens=16, choices=["A", "B"]), session_dir=tmp_path)

    async def step_a_few(pilot):
        await pilot.pause()
        await app.workers.wait_for_complete()
        for _ in range(5):
            await pilot.press("space")
            await pilot.pause()
            await app.workers.wait_for_complete()
        await pilot.pause()

    assert snap_compare(app, terminal_size=(120, 40), run_before=step_a_few)
