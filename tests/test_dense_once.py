"""The dense side once in a sweep (engine.run.trajectory): a sweep of several specs runs the dense model once per chunk
of prompts and mode, replaying its recorded trajectory for the other specs, with results equal to the same specs
swept one at a time; in memory or spilled to files (none left behind), interrupted and resumed, streamed."""

import json

import pytest

from engine.record.session import load_session
from engine.run import trajectory as T
from engine.run.stepper import BatchStepper
from engine.sweep.runner import DENSE_FOLDER, run_sweep
from engine.sweep.sweeps import SweepHooks, plan_sweep

SPECS = ["magnitude:0.3", "magnitude:0.6", "attndrop:1"]
PROMPTS = ["The quick brown fox", "Once upon a time", "Hello"]


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("dense-once") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS), encoding="utf-8")
    return path


def plan(prompts, specs=SPECS, **kw):
    modes = ["shared", "free"]
    return plan_sweep(prompts_file=prompts, model="tiny-random", specs=specs, modes=modes, device="cpu", **kw)


@pytest.fixture()
def dense_calls(monkeypatch):
    """How many forward passes each model made, by kind: {"dense": n, "perturbed": n} (BatchStepper._forward)."""
    calls = {"dense": 0, "perturbed": 0}
    forward = BatchStepper._forward

    def counted(self, model, ids, cache, **kwargs):
        calls["dense" if model is self.pair.dense else "perturbed"] += 1
        return forward(self, model, ids, cache, **kwargs)

    monkeypatch.setattr(BatchStepper, "_forward", counted)
    return calls


def sessions(out) -> dict:
    """run id → (its step records, its summary)."""
    found = {}
    for path in sorted((out / "sessions").glob("*.jsonl")):
        session = load_session(path)
        found[path.stem] = (session.steps, session.summary)
    return found


def one_at_a_time(prompts, tmp_path, dense_calls, **kw) -> tuple[dict, list[int]]:
    """Each spec swept alone: the sessions of all, and the dense forward passes of each sweep."""
    runs, counts = {}, []
    for n, spec in enumerate(SPECS):
        before = dense_calls["dense"]
        run_sweep(plan(prompts, [spec], **kw), tmp_path / f"alone-{n}", batch_size=2)
        counts.append(dense_calls["dense"] - before)
        runs.update(sessions(tmp_path / f"alone-{n}"))
    return runs, counts


def close(a, b, tol=1e-5) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k], tol) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(close(x, y, tol) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= tol * max(1.0, abs(a), abs(b))
    return a == b


@pytest.mark.parametrize("sample", [False, True], ids=["greedy", "sampled"])
def test_sweep_equals_the_specs_one_at_a_time_and_runs_the_dense_model_once(prompts, tmp_path, dense_calls, sample):
    """Guards the dense side once: 3 specs × shared and free × 3 prompts (chunks of 2 and 1) give the very records
    of each spec swept alone (bitwise), while the dense model runs as often as for one spec (not three times)."""
    kw = {"max_new_tokens": 4, "sample": sample, "seed": 3}
    alone, counts = one_at_a_time(prompts, tmp_path, dense_calls, **kw)
    assert len(set(counts)) == 1 and counts[0] > 0
    before = dict(dense_calls)
    run_sweep(plan(prompts, **kw), tmp_path / "sweep", batch_size=2)
    assert dense_calls["dense"] - before["dense"] == counts[0]
    together = sessions(tmp_path / "sweep")
    assert together.keys() == alone.keys() and len(together) == len(SPECS) * len(PROMPTS) * 2
    assert together == alone  # every metric of every step, and every summary: the same numbers
    assert not (tmp_path / "sweep" / DENSE_FOLDER).exists()


def test_spilled_trajectories_give_the_same_results_and_leave_no_files(prompts, tmp_path, dense_calls, monkeypatch):
    """Guards the spill path: with no host memory for trajectories, each is written to files under OUT, read back
    with mmap, gives the records of the in-memory sweep, and no file is left once the sweep ends."""
    kw = {"max_new_tokens": 4}
    run_sweep(plan(prompts, **kw), tmp_path / "memory", batch_size=2)
    monkeypatch.setattr(T, "default_budget", lambda: 0)
    written = []
    write = T.DenseStore._write
    monkeypatch.setattr(T.DenseStore, "_write", lambda self, t, n: (written.append(n), write(self, t, n)))
    before = dense_calls["dense"]
    run_sweep(plan(prompts, **kw), tmp_path / "spilled", batch_size=2)
    assert written, "nothing was spilled"
    alone = dense_calls["dense"] - before
    run_sweep(plan(prompts, SPECS[:1], **kw), tmp_path / "one", batch_size=2)
    assert alone == dense_calls["dense"] - before - alone  # replayed from the files, not run again
    assert sessions(tmp_path / "spilled") == sessions(tmp_path / "memory")
    assert not (tmp_path / "spilled" / DENSE_FOLDER).exists()


class StopAt(SweepHooks):
    """Ctrl-C at step `step` of the run `run_id` (its chunk's sessions are then all incomplete)."""

    def __init__(self, run_id, step):
        self.run_id, self.at = run_id, step

    def step(self, run, record):
        if run.run_id == self.run_id and record["step"] == self.at:
            raise KeyboardInterrupt


def test_interrupted_sweep_leaves_no_spill_files_and_resumes(prompts, tmp_path, monkeypatch):
    """Guards the interruption and the resume: Ctrl-C in the second spec leaves no trajectory file; the resumed
    sweep, where one spec's chunk is part complete (another composition: recorded anew, not replayed from another),
    equals an uninterrupted sweep to 1e-5."""
    kw = {"max_new_tokens": 4}
    whole = tmp_path / "whole"
    run_sweep(plan(prompts, **kw), whole, batch_size=2)
    monkeypatch.setattr(T, "default_budget", lambda: 0)  # every trajectory spilled: files to leave behind
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run_sweep(plan(prompts, **kw), out, hooks=StopAt("p000-magnitude-0.6-shared", 1), batch_size=2)
    assert not (out / DENSE_FOLDER).exists()
    done = sessions(out)
    assert done["p000-magnitude-0.3-free"][1] is not None and done["p001-magnitude-0.6-shared"][1] is None
    (out / "sessions" / "p000-magnitude-0.3-shared.jsonl").unlink()  # the first chunk of the first spec: part done
    result = run_sweep(plan(prompts, **kw), out, batch_size=2)
    assert "p000-magnitude-0.3-shared" in result.computed and "p001-magnitude-0.3-shared" in result.skipped
    assert not (out / DENSE_FOLDER).exists()
    resumed, expected = sessions(out), sessions(whole)
    assert resumed.keys() == expected.keys()
    assert all(close(resumed[k], expected[k]) for k in expected)


def test_a_recording_replays_only_into_the_same_rows(tiny):
    """Guards the fingerprint: a trajectory recorded for some rows refuses a stepper of other rows (a bug, not a
    silent mix of two runs), and replays bit-exact, in the logits' own dtype, into the same rows."""
    from engine.perturb import perturb
    from engine.record.settings import StepSettings

    pair = perturb(tiny, "magnitude:0.5", use_cache=False)
    settings = StepSettings(max_new_tokens=3, lens=False)
    recording = T.DenseTrajectory()
    live = BatchStepper(pair, PROMPTS[:2], settings, dense_trajectory=recording).run()
    recording.complete = True
    assert recording.parts[0][0][1].dtype == tiny.model.dtype
    assert BatchStepper(pair, PROMPTS[:2], settings, dense_trajectory=recording).run() == live
    recording.rewind()
    with pytest.raises(ValueError, match="same rows|rows and settings"):
        BatchStepper(pair, PROMPTS[1:], settings, dense_trajectory=recording).run()


@pytest.mark.slow
@pytest.mark.usefixtures("keep_the_allocator")
def test_streamed_dense_model_is_replayed_too(prompts, tmp_path, dense_calls):
    """Guards the streamed placement: a sweep whose plan streams the layers replays the dense trajectory (the
    streamed dense model runs for one spec only) and gives the records of the sweep in memory."""
    kw = {"max_new_tokens": 3}
    run_sweep(plan(prompts, SPECS[:2], **kw), tmp_path / "memory", batch_size=2)
    sweep = plan(prompts, SPECS[:2], **kw)
    sweep.plan = {"placement": "streamed"}
    before = dense_calls["dense"]
    run_sweep(sweep, tmp_path / "streamed", batch_size=2)
    streamed = dense_calls["dense"] - before
    sweep = plan(prompts, SPECS[:1], **kw)
    sweep.plan = {"placement": "streamed"}
    run_sweep(sweep, tmp_path / "one", batch_size=2)
    assert streamed == dense_calls["dense"] - before - streamed
    a, b = sessions(tmp_path / "streamed"), sessions(tmp_path / "memory")
    assert a.keys() == b.keys() and all(close(a[k], b[k]) for k in a)


def test_ray_worker_replays_the_chunks_it_stepped_for_another_spec(prompts, tmp_path, dense_calls, monkeypatch):
    """Guards the Ray worker path (engine.sweep.worker, without Ray): a worker handed the same chunk for two specs
    (the driver says two uses) runs the dense model for the first only (replaying its spilled trajectory), records
    what the local sweep records, and leaves no trajectory folder once closed."""
    from engine.sweep.runner import chunks_of
    from engine.sweep.worker import PROBE, PairWorker

    sweep = plan(prompts, SPECS[:2], max_new_tokens=3)
    local = tmp_path / "local"
    run_sweep(sweep, local, batch_size=2)
    out = tmp_path / "ray"
    out.mkdir()
    (out / PROBE).write_text("probe\n")
    worker = PairWorker(sweep, str(out), "probe", "shared", True)
    worker.scratch_root = lambda: tmp_path / "scratch"  # the worker's TMP/hierui-ray-<probe>, here
    worker._node = lambda: None  # outside Ray (asking for the node would start a Ray instance)
    monkeypatch.setattr(T, "default_budget", lambda: 0)  # spilled to the worker's folder
    counts = []
    for n, spec in enumerate(sweep.specs):
        before = dense_calls["dense"]
        for chunk in chunks_of(sweep, spec, sweep.runs(), 2):
            uses = len(sweep.specs) - n
            worker.work({"kind": "runs", "spec": str(spec), "runs": [r.run_id for r in chunk], "dense_uses": uses})
        counts.append(dense_calls["dense"] - before)
        if n == 0:
            assert list((tmp_path / "scratch").glob("dense-*/*.pt"))
    assert counts[0] > 0 and counts[1] == 0
    worker.close()
    assert not (tmp_path / "scratch").exists()
    assert sessions(out) == sessions(local)
