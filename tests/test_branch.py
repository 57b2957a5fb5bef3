"""Branches (engine.run.branch): the free-mode counterfactual at the first divergence, recorded in the session's closing
line, summarized as recovered/recovery_steps, shown, rerun and swept; and a branch from an alternative token."""

import json

import pyarrow.parquet as pq
import pytest

from engine.errors import HieruiError
from engine.record.branches import Branch, branch_prefix, branch_summary, recovery
from engine.record.session import load_session
from engine.record.settings import StepSettings
from engine.run import rerun as R
from engine.run.branch import branches_at, counterfactuals
from engine.run.recorder import SessionRecorder

PROMPTS = ["Hello there", "The capital of France is", "one two three"]
MAX = 8


def _steps(*same):
    """Hand-made branch steps: `same` per step (None: a model had ended, nothing compared)."""
    return [{"step": i, "same_token": s} for i, s in enumerate(same)]


def assert_dense_reproduced(branch, parent_steps):
    """The branch's dense tokens are the parent's after the branch point. Either run can be the longer: the parent
    stops when both its models have ended, the branch when both of its have (or both at the token limit); once the
    dense model has ended, its tokens are None in both."""
    dense = [s["token_d"] for s in branch.steps]
    parent = [r["token_d"] for r in parent_steps[branch.start_step :]]
    n = min(len(dense), len(parent))
    assert dense[:n] == parent[:n]
    assert all(t is None for t in dense[n:] + parent[n:])


# ------------------------------------------------------------------ definitions (no model)


@pytest.mark.parametrize(
    "same, expected",
    [
        ((True, True, True), (True, 0)),  # follows the dense text at once
        ((False, False, True, True, True, True), (True, 2)),  # disagrees, then agrees to the end (RESYNC = 4 steps)
        ((True, False, True, True, True, True), (True, 2)),  # agreement counts from the last disagreement
        ((False, False, True, True), (False, None)),  # agrees for fewer than RESYNC steps at the end: a coincidence
        ((True, True, False), (False, None)),  # ends disagreeing
        ((False, True, True, True, True, None, None), (True, 1)),  # steps after a model ended compare nothing
        ((False, True, True, None, None), (False, None)),  # … and do not count towards RESYNC
        ((None,), (None, None)),
        ((), (None, None)),  # no steps (a branch at the last step)
    ],
)
def test_recovery_on_hand_made_steps(same, expected):
    assert recovery(_steps(*same)) == expected


def test_branch_round_trips_and_summarizes():
    steps = [{**s, "kl": kl, "first_divergence": 1} for s, kl in zip(_steps(True, False, True), (0.1, 0.2, 0.3))]
    branch = Branch(at=2, token=7, text=" x", start_step=3, steps=steps, recovered=True, recovery_steps=2)
    assert Branch.from_dict(json.loads(json.dumps(branch.to_dict()))) == branch
    assert branch.summary() == pytest.approx(
        {"recovered": True, "recovery_steps": 2, "branch_divergence": 1, "branch_kl_mean": 0.2}
    )
    assert branch_summary(None) == dict.fromkeys(("recovered", "recovery_steps", "branch_divergence", "branch_kl_mean"))


def test_branch_prefix_continues_the_perturbed_text():
    steps = [{"step": i, "fed": [10 + i, 20 + i]} for i in range(4)]
    assert branch_prefix({}, steps, 0, 99) == ([99], 1)
    assert branch_prefix({}, steps, 2, 99) == ([20, 21, 99], 3)
    # a branch of a branch: its own prefix first, steps counted from its own start
    assert branch_prefix({"prefix_ids": [1, 2], "start_step": 5}, steps, 1, 99) == ([1, 2, 20, 99], 7)
    with pytest.raises(HieruiError, match="no step 4"):
        branch_prefix({}, steps, 4, 99)
    ended = steps[:2] + [{"step": 2, "fed": [12, None]}, {"step": 3, "fed": [13, None]}]
    with pytest.raises(HieruiError, match="ended"):
        branch_prefix({}, ended, 3, 99)


# ------------------------------------------------------------------ the counterfactual on tiny-random


@pytest.fixture(scope="module")
def pruned(tiny):
    from engine.perturb import perturb

    return perturb(tiny, "magnitude:0.5", use_cache=False)


@pytest.fixture(scope="module")
def recorded(pruned, tmp_path_factory):
    """Three free-mode runs of a pair that splits, stepped together with the counterfactual on."""
    from engine.run.stepper import BatchStepper

    folder = tmp_path_factory.mktemp("branch")
    stepper = BatchStepper(pruned, PROMPTS, StepSettings(mode="free", max_new_tokens=MAX, counterfactual=True))
    recorder = SessionRecorder(stepper, [folder / f"p{i}.jsonl" for i in range(len(PROMPTS))])
    recorder.run()
    return stepper, recorder, folder


def test_the_branch_starts_at_the_first_divergence_and_reproduces_the_dense_text(recorded):
    stepper, recorder, _ = recorded
    assert any(b is not None and b.steps for b in recorder.branches), "the test needs a split"
    for row, branch in zip(stepper.rows, recorder.branches):
        at = row.first_divergence
        if at is None:
            assert branch is None
            continue
        assert (branch.at, branch.start_step) == (at, at + 1)
        assert branch.token == row.records[at]["token_d"] != row.records[at]["token_p"]
        assert branch.text == row.records[at]["text_d"]
        ended = bool(branch.steps) and None not in (branch.steps[-1]["end_d"], branch.steps[-1]["end_p"])
        assert len(branch.steps) == MAX - at - 1 or (ended and len(branch.steps) < MAX - at - 1)
        # the perturbed model fed the dense token: the dense side goes on exactly as in the parent
        assert_dense_reproduced(branch, row.records)
        assert all(s["fed"][1] == s["token_p"] for s in branch.steps if s["token_p"] is not None)  # free mode
        assert (branch.recovered, branch.recovery_steps) == recovery(branch.steps)


def test_the_branch_is_stored_in_the_closing_line_and_read_back(recorded):
    stepper, recorder, folder = recorded
    for i, (row, branch) in enumerate(zip(stepper.rows, recorder.branches)):
        path = folder / f"p{i}.jsonl"
        closing = json.loads(path.read_text(encoding="utf-8").splitlines()[-1])
        assert set(closing) == ({"end", "summary", "branch"} if branch else {"end", "summary"})
        session = load_session(path)
        assert session.header["counterfactual"] is True
        assert session.steps == row.records
        assert session.branch == branch
        assert {"recovered", "recovery_steps", "branch_divergence", "branch_kl_mean"} <= set(session.summary)
        assert session.summary["recovered"] == (branch.recovered if branch else None)
        assert session.summary["branch_divergence"] == (branch.steps[-1]["first_divergence"] if branch.steps else None)
        assert recorder.sessions()[i].branch == branch


def test_a_sampled_branch_keeps_the_parents_noise_stream(pruned):
    """Sampled: the branch draws the parent's noise from its start step on, so its dense side still reproduces
    the parent's dense text."""
    from engine.run.stepper import BatchStepper

    settings = StepSettings(mode="free", max_new_tokens=MAX, sample=True, seed=5, temperature=1.5)
    stepper = BatchStepper(pruned, PROMPTS, settings)
    stepper.run()
    branches = counterfactuals(pruned, stepper)
    assert any(b is not None and b.steps for b in branches), "the test needs a split"
    for row, branch in zip(stepper.rows, branches):
        if branch is not None:
            assert_dense_reproduced(branch, row.records)


def test_a_model_that_ended_has_no_top_k_and_deviates_by_nothing():
    ended = {"step": 0, "token_d": None, "token_p": 5, "fed": [None, 5], "topk_d": None, "kl": None}
    assert R.deviations([ended], [dict(ended)])["topk_d"] == 0.0
    assert R.deviations([ended], [{**ended, "topk_d": [[5, "a", 0.5]]}])["topk_d"] == float("inf")


def test_a_tampered_branch_is_one_error_line(recorded, tmp_path):
    _, recorder, folder = recorded
    i = next(i for i, b in enumerate(recorder.branches) if b is not None and b.steps)
    lines = (folder / f"p{i}.jsonl").read_text(encoding="utf-8").splitlines()
    for tamper, message in (
        (lambda c: c["branch"]["steps"][0].update(kl="high"), r"branch\.steps\[0\]\.kl is \"high\""),
        (lambda c: c["branch"]["steps"][0].update(step=3), r"branch\.steps\[0\]\.step is 3, expected step 0"),
        (lambda c: c["branch"].pop("at"), r"branch\.at"),
        (lambda c: c.update(branch=[1]), r"branch is \[1\], expected an object"),
    ):
        closing = json.loads(lines[-1])
        tamper(closing)
        bad = tmp_path / "bad.jsonl"
        bad.write_text("\n".join([*lines[:-1], json.dumps(closing)]) + "\n", encoding="utf-8")
        with pytest.raises(HieruiError, match=message):
            load_session(bad)


def test_replay_rerun_recomputes_the_run_and_its_branch(recorded, tiny):
    stepper, recorder, folder = recorded
    i = next(i for i, b in enumerate(recorder.branches) if b is not None and b.steps)
    session = load_session(folder / f"p{i}.jsonl")
    new = R.rerun_session(session, loaded=tiny, use_cache=False)
    assert R.compare(session.steps, new.steps).ok(1e-4)
    branch = R.compare_branch(session.branch, new.branch)
    assert branch.tokens_match and branch.ok(1e-4), (branch.notes, branch.deviations)
    assert R.compare_branch(session.branch, None).ok(1e-4) is False


def test_show_prints_the_branch(cli, recorded):
    _, recorder, folder = recorded
    i = next(i for i, b in enumerate(recorder.branches) if b is not None and b.steps)
    branch = recorder.branches[i]
    run = cli("show", str(folder / f"p{i}.jsonl"))
    assert run.returncode == 0, run.stderr
    assert f"counterfactual branch: from step {branch.start_step + 1}" in run.stdout
    assert f"at step {branch.at + 1}," in run.stdout
    verdict = {True: "recovered", False: "not recovered", None: "no step to compare"}[branch.recovered]
    assert verdict in run.stdout and "recovery_steps" in run.stdout


def test_a_pair_that_never_splits_has_no_branch_and_recovers_at_once_when_branched(tiny, tmp_path):
    from engine.perturb import perturb
    from engine.run.stepper import BatchStepper

    pair = perturb(tiny, "none")
    settings = StepSettings(mode="free", max_new_tokens=6, counterfactual=True)
    stepper = BatchStepper(pair, PROMPTS[:2], settings)
    recorder = SessionRecorder(stepper, [tmp_path / "a.jsonl", tmp_path / "b.jsonl"])
    recorder.run()
    assert recorder.branches == [None, None]
    for name in ("a", "b"):
        session = load_session(tmp_path / f"{name}.jsonl")
        assert session.branch is None and session.summary["recovered"] is None  # nothing to recover from
    assert counterfactuals(pair, stepper) == [None, None]
    for at in (0, 3):  # an explicit branch at any step: the perturbed model (the same) follows at once
        branches = branches_at(pair, stepper, [at, at])
        for branch, row in zip(branches, stepper.rows):
            assert (branch.recovered, branch.recovery_steps) == (True, 0)
            assert len(branch.steps) == 6 - at - 1 and all(s["kl"] == 0 for s in branch.steps)
            assert [s["token_d"] for s in branch.steps] == [r["token_d"] for r in row.records[at + 1 :]]
    last = branches_at(pair, stepper, [5, None])  # at the last step: nothing left to step
    assert last[1] is None and (last[0].steps, last[0].recovered, last[0].recovery_steps) == ([], None, None)


def test_counterfactual_needs_free_mode():
    class Shared:
        settings = StepSettings(mode="shared", counterfactual=True)
        rows = []

    with pytest.raises(HieruiError, match="free mode"):
        counterfactuals(None, Shared())


# ------------------------------------------------------------------ a branch from an alternative token


def test_a_branch_from_an_alternative_links_its_parent_and_reruns(cli, pruned, recorded, tmp_path):
    from engine.run.stepper import Stepper

    _, _, folder = recorded
    parent_path = folder / "p0.jsonl"
    parent = load_session(parent_path)
    s = 2
    # with the perturbed model's own token the branch continues the parent's perturbed text exactly
    prefix, start = branch_prefix(parent.header, parent.steps, s, parent.steps[s]["token_p"])
    settings = StepSettings(mode="free", max_new_tokens=MAX - start)
    same = Stepper(pruned, parent.header["prompt"], settings, prefix=prefix, start_step=start).run()
    assert [r["token_p"] for r in same] == [r["token_p"] for r in parent.steps[start:]]
    # another token: a new session whose header links the parent
    token = next(t for t, _text, _p in parent.steps[s]["topk_p"] if t != parent.steps[s]["token_p"])
    prefix, start = branch_prefix(parent.header, parent.steps, s, token)
    link = {"session": str(parent_path), "step": s, "token": token}
    stepper = Stepper(pruned, parent.header["prompt"], settings, prefix=prefix, start_step=start, parent=link)
    path = tmp_path / "alt.jsonl"
    SessionRecorder(stepper, [path]).run()
    header = load_session(path).header
    assert header["parent"] == link and header["start_step"] == start and header["prefix_ids"] == prefix
    assert header["prompt_ids"][-len(prefix) :] == prefix
    run = cli("replay", str(path), "--rerun", "--device", "cpu", "--tol", "1e-4")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "rerun matches the recording" in run.stdout
    refused = cli("batch", "--from", str(path), "-p", "none", "--out", str(tmp_path / "from"))
    assert refused.returncode == 2 and "is a branch of another run" in refused.stderr


# ------------------------------------------------------------------ hierui batch --counterfactual


def test_batch_counterfactual_tables_and_resume(cli, tmp_path, monkeypatch):
    prompts = tmp_path / "p.txt"
    prompts.write_text("Hello there\nThe capital of France is\n", encoding="utf-8")
    out = tmp_path / "out"
    args = ["batch", "-m", "tiny-random", "--prompts", prompts, "-p", "magnitude:0.5", "--mode", "shared"]
    args += ["--mode", "free", "--max-new-tokens", "5", "--counterfactual", "-b", "1", "--out", out]
    import hierui.views.bars  # Ctrl-C in the last free run: its session has no closing line, rerun on resume

    def ctrl_c(self, run, record):
        if run.run_id == "p001-magnitude-0.5-free" and record["step"] == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(hierui.views.bars.BatchBars, "step", ctrl_c)
    cut = cli(*args)
    assert cut.returncode == 130, cut.stderr
    assert load_session(out / "sessions" / "p001-magnitude-0.5-free.jsonl").summary is None
    monkeypatch.undo()
    resumed = cli(*args)
    assert resumed.returncode == 0 and "(1 computed, 3 already complete)" in resumed.stdout, resumed.stderr
    assert json.loads((out / "batch.json").read_text())["settings"]["counterfactual"] is True

    rows = {r["run_id"]: r for r in pq.read_table(out / "summary.parquet").to_pylist()}
    assert len(rows) == 4
    for run_id, row in rows.items():
        session = load_session(out / "sessions" / f"{run_id}.jsonl")
        if row["mode"] == "shared":  # the counterfactual applies to the free runs only
            assert row["recovered"] is None and "counterfactual" not in session.header
            assert "recovered" not in session.summary
            continue
        assert session.header["counterfactual"] is True
        expected = branch_summary(session.branch)
        assert {k: row[k] for k in expected} == pytest.approx(expected)
        if session.branch is not None:  # the resumed run's branch too: the dense side reproduces the parent's
            assert_dense_reproduced(session.branch, session.steps)
    assert any(r["recovered"] is not None for r in rows.values()), "the test needs a branch"

    shared_only = cli("batch", "-m", "tiny-random", "--prompts", prompts, "--counterfactual", "--out", tmp_path / "s")
    assert shared_only.returncode == 2 and "add --mode free" in shared_only.stderr


# ------------------------------------------------------------------ the embedded model


@pytest.mark.slow
def test_the_embedded_model_under_wanda_recovers_or_not(embedded, tmp_path):
    """Wanda 0.5, free mode, greedy: where the texts split, is it a single bad step or compounding damage?"""
    from engine.perturb import perturb
    from engine.run.stepper import BatchStepper

    pair = perturb(embedded, "wanda:0.5", calib_options={"samples": 16, "length": 64, "seed": 0})
    prompts = ["What is the capital of France?", "Write a short poem about the sea.", "Explain how a bicycle works."]
    stepper = BatchStepper(pair, prompts, StepSettings(mode="free", max_new_tokens=32, counterfactual=True))
    recorder = SessionRecorder(stepper, [tmp_path / f"e{i}.jsonl" for i in range(len(prompts))])
    recorder.run()
    for row, branch in zip(stepper.rows, recorder.branches):
        at = row.first_divergence
        print(f"{row.prompt!r}: split at {at}", end="; ")
        if branch is None:
            print("no branch")
            continue
        print(
            f"branch of {len(branch.steps)} steps: recovered {branch.recovered} after {branch.recovery_steps}, "
            f"splits again at {branch.summary()['branch_divergence']}, branch KL {branch.summary()['branch_kl_mean']}"
        )
        assert_dense_reproduced(branch, row.records)
        assert load_session(tmp_path / f"e{stepper.rows.index(row)}.jsonl").branch == branch
