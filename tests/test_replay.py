"""`hierui show` / `hierui replay`: print a session without loading a model; `replay --rerun` recomputes it.

`replay --rerun` of a fresh session reports deviations below 1e-5 on CPU.
"""

import json
import math
import os
import re
import subprocess
import sys

import pytest

from engine.record.session import SessionWriter, load_session
from engine.run import rerun as R
from engine.run.recorder import SessionRecorder


def _record(tiny, path, spec="magnitude:0.5", prompt="Hello", calib=None, **settings):
    from engine.perturb import perturb
    from engine.run.stepper import Stepper, StepSettings

    pair = perturb(tiny, spec, calib_options=calib)
    stepper = Stepper(pair, prompt, StepSettings(**{"max_new_tokens": 5, **settings}))
    SessionRecorder(stepper, [path]).run()
    return path


@pytest.fixture(scope="module")
def session_file(tiny, tmp_path_factory):
    """A complete shared-mode session with choices (so sub_kl is recorded)."""
    return _record(tiny, tmp_path_factory.mktemp("replay") / "shared.jsonl", choices=["A", "B"])


def _stderr_lines(run):
    return [ln for ln in run.stderr.splitlines() if ln.strip()]


# ------------------------------------------------------------------ comparing (no model)


def _step(i, **values):
    base = {
        "step": i,
        "token_d": 5,
        "token_p": 6,
        "text_d": "a",
        "text_p": "b",
        "fed": [5, 5],
        "kl": 0.1,
        "emb_cos": [1.0, 0.9, 0.8],
        "amp": None,
        "topk_d": [[5, "a", 0.5], [6, "b", 0.25]],
        "topk_p": [[6, "b", 0.4], [5, "a", 0.3]],
        "same_token": False,
    }
    return {**base, **values}


def test_deviations_are_elementwise_maxima():
    old = [_step(0), _step(1)]
    new = [
        _step(0, kl=0.1 + 1e-3, emb_cos=[1.0, 0.9, 0.8 - 2e-3]),
        _step(1, topk_p=[[6, "b", 0.4], [5, "a", 0.3 + 5e-3]]),
    ]
    dev = R.deviations(old, new)
    assert dev["kl"] == pytest.approx(1e-3)
    assert dev["emb_cos"] == pytest.approx(2e-3)
    assert dev["topk_p"] == pytest.approx(5e-3) and dev["topk_d"] == 0.0
    assert dev["amp"] == 0.0  # null against null
    assert not {"step", "token_d", "token_p", "fed", "text_d", "text_p", "same_token"} & set(dev)
    result = R.compare(old, new)
    assert result.tokens_match and result.max_deviation == pytest.approx(5e-3)
    assert result.ok(1e-2) and not result.ok(1e-3)
    # above 1 a deviation is relative: float noise on a KL of several nats or a long run's cum_kl
    big = R.deviations([_step(0, kl=5.0, cum_kl=200.0)], [_step(0, kl=5.0 + 5e-4, cum_kl=200.0 - 0.02)])
    assert big["kl"] == pytest.approx(1e-4) and big["cum_kl"] == pytest.approx(1e-4)


def test_null_against_a_number_or_a_missing_metric_is_infinite():
    dev = R.deviations([_step(0)], [_step(0, amp=2.0)])
    assert math.isinf(dev["amp"])
    old, new = _step(0), _step(0)
    del new["kl"]
    assert math.isinf(R.deviations([old], [new])["kl"])


def test_token_mismatches_and_length_changes_fail():
    changed = R.compare([_step(0), _step(1)], [_step(0), _step(1, token_p=9)])
    assert changed.first_token_mismatch == 1 and not changed.tokens_match and not changed.ok(1.0)
    shorter = R.compare([_step(0), _step(1)], [_step(0)])
    assert shorter.first_token_mismatch == 1 and not shorter.ok(1.0) and shorter.notes
    topk = R.compare([_step(0)], [_step(0, topk_d=[[6, "b", 0.5], [5, "a", 0.25]])])
    assert topk.tokens_match and topk.topk_id_mismatches == 1


def test_settings_and_calibration_come_from_the_header():
    header = {
        "mode": "free",
        "temperature": 1.5,
        "sample": True,
        "seed": 7,
        "choices": ["A", "B"],
        "raw": True,
        "topk": 3,
        "max_new_tokens": 64,
        "calibration": {"source": "self", "samples": 4, "length": 16, "seed": 2, "from_cache": True, "seconds": 0.1},
    }
    s = R.settings_from_header(header, 9)
    assert (s.mode, s.temperature, s.max_new_tokens, s.sample, s.seed, s.choices, s.raw, s.topk) == (
        "free",
        1.5,
        9,
        True,
        7,
        ("A", "B"),
        True,
        3,
    )
    assert R.calib_options_from_header(header) == {"samples": 4, "length": 16, "seed": 2}
    assert R.calib_options_from_header(
        {"calibration": {"source": "/x/c.txt", "samples": 2, "length": 8, "seed": 0}}
    ) == {"samples": 2, "length": 8, "seed": 0, "source": "/x/c.txt"}
    assert R.calib_options_from_header({"calibration": None}) is None


# ------------------------------------------------------------------ rerun (in process)


@pytest.mark.parametrize(
    "spec, settings",
    [
        ("none", {"mode": "shared"}),
        (
            "magnitude:0.5",
            {
                "mode": "free",
                "sample": True,
                "seed": 3,
                "temperature": 1.5,
                "topk": 3,
                "choices": ["A", "B", "C"],
                "raw": True,
            },
        ),
    ],
)
def test_rerun_reproduces_the_recording(tiny, tmp_path, spec, settings):
    path = _record(tiny, tmp_path / "s.jsonl", spec=spec, max_new_tokens=6, **settings)
    session = load_session(path)
    new = R.rerun(session, loaded=tiny)
    result = R.compare(session.steps, new)
    assert result.tokens_match, result
    assert result.max_deviation < 1e-5, result.deviations
    assert len(new) == len(session.steps) == 6
    if spec == "none":
        assert all(s["kl"] == 0.0 for s in new)


def test_rerun_of_an_interrupted_session_steps_as_many_steps_as_recorded(tiny, tmp_path):
    from engine.perturb import perturb
    from engine.run.stepper import Stepper, StepSettings

    stepper = Stepper(perturb(tiny, "magnitude:0.5"), "Hi", StepSettings(max_new_tokens=20))
    SessionRecorder(stepper, [tmp_path / "stop.jsonl"]).run(stop=lambda: len(stepper.records) >= 3)
    session = load_session(tmp_path / "stop.jsonl")
    new = R.rerun(session, loaded=tiny)
    assert len(new) == 3 and R.compare(session.steps, new).ok(1e-5)


def test_rerun_of_a_session_without_steps_is_an_error(tiny, tmp_path):
    from engine.errors import HieruiError
    from engine.perturb import perturb
    from engine.run.stepper import Stepper, StepSettings

    stepper = Stepper(perturb(tiny, "none"), "Hi", StepSettings(max_new_tokens=3))
    path = tmp_path / "empty.jsonl"  # a run that ended before its first step: a header alone
    SessionWriter(path, SessionRecorder(stepper, [path]).header(0)).close()
    with pytest.raises(HieruiError, match="no recorded steps"):
        R.rerun(load_session(tmp_path / "empty.jsonl"), loaded=tiny)


# ------------------------------------------------------------------ replay --rerun (the CLI)


def _max_deviation(stdout):
    found = re.search(r"max deviation ([0-9.e+-]+|inf)", stdout)
    assert found, stdout
    return float(found.group(1))


@pytest.mark.slow
def test_replay_rerun_of_a_fresh_session_reports_deviations_below_1e_5(hierui, tiny, tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("HIERUI_HOME", str(home))
    path = _record(
        tiny,
        tmp_path / "wanda.jsonl",
        spec="wanda:0.5",
        calib={"samples": 4, "length": 16, "seed": 1},
        choices=["A", "B"],
    )
    assert load_session(path).header["calibration"]["samples"] == 4
    # --no-cache: the calibration and the pruned weights are rebuilt from the header, not read back
    run = hierui(
        "replay", str(path), "--rerun", "--device", "cpu", "--no-cache", "--tol", "1e-5", env={"HIERUI_HOME": str(home)}
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "tokens: all 5 steps match" in run.stdout and "rerun matches the recording" in run.stdout
    assert _max_deviation(run.stdout) < 1e-5
    for metric in ("emb_cos", "logit_cos", "kl", "tv", "topk_d", "sub_kl", "cum_kl"):
        assert re.search(rf"\b{metric}\b", run.stdout), metric
    assert "Traceback" not in run.stderr


def test_replay_rerun_of_a_tampered_session_exits_1(cli, session_file, tmp_path):
    lines = session_file.read_text(encoding="utf-8").splitlines()
    step = json.loads(lines[2])
    step["kl"] += 0.01
    step["token_p"] = (step["token_p"] + 1) % 256
    lines[2] = json.dumps(step)
    tampered = tmp_path / "tampered.jsonl"
    tampered.write_text("\n".join(lines) + "\n", encoding="utf-8")
    run = cli("replay", str(tampered), "--rerun", "--device", "cpu")
    assert run.returncode == 1, run.stdout + run.stderr
    # lines[2] is the record of step index 1: on screen steps count from 1, so that is step 2
    assert "tokens: differ, first at step 2" in run.stdout and "does NOT match" in run.stdout
    assert _max_deviation(run.stdout) == pytest.approx(0.01, rel=1e-3)
    assert "Traceback" not in run.stderr


# ------------------------------------------------------------------ show / replay without a model


def test_show_prints_header_tokens_and_summary(cli, session_file, tmp_path):
    from hierui.tokentext import cell as _token_cell
    from hierui.tokentext import running as _visible

    session = load_session(session_file)
    # readable token texts, so the test can look for them in the output
    lines = session_file.read_text(encoding="utf-8").splitlines()
    words = ["Paris", "Lyon", "Nice", "Lille", "Brest"]
    for i, word in enumerate(words, start=1):
        step = json.loads(lines[i])
        step["text_d"], step["text_p"] = f" {word}", f"{word.upper()}!"
        lines[i] = json.dumps(step)
    readable = tmp_path / "readable.jsonl"
    readable.write_text("\n".join(lines) + "\n", encoding="utf-8")

    run = cli("show", str(readable), "--steps")
    assert run.returncode == 0, run.stderr
    out = run.stdout
    assert " Paris Lyon Nice Lille Brest" in out  # the dense continuation
    assert "PARIS!LYON!NICE!LILLE!BREST!" in out  # the perturbed one
    for word in words:
        assert f"·{word}" in out  # the per-step table shows the leading space
    for label in (
        "tiny-random",
        "magnitude:0.5",
        "50.00%",
        "shared",
        "Hello",
        "'A', 'B'",
        "summary",
        "kl_mean",
        "logit_cos",
        "prob_cos",
        "kl_est",
        "cum_kl",
        "sub_kl",
        "emb_cos[L]",
    ):
        assert label in out, label
    assert session.header["created"] in out

    plain = cli("show", str(session_file), "--steps")
    assert plain.returncode == 0
    for step in session.steps:
        assert _token_cell(step["text_d"]) in plain.stdout
    assert "".join(_visible(s["text_d"]) for s in session.steps) in plain.stdout

    # replay --print prints the same thing (and so does replay without a terminal)
    again = cli("replay", str(readable), "--print", "--steps")
    assert again.returncode == 0 and again.stdout.replace(str(readable), "") == out.replace(str(readable), "")


def _steps_column(out: str) -> list[str]:
    """The first cell of each row of the --steps table (rich's box-drawn rows start with │)."""
    table = out.split("steps (step 1 = the first generated token)", 1)[1]
    return [line.split("│")[1].strip() for line in table.splitlines() if line.startswith("│")]


def test_show_numbers_steps_from_1(cli, tiny, tmp_path):
    """Session files count `step` (and first_divergence) from 0; hierui show counts from 1, as the screen does."""
    path = _record(tiny, tmp_path / "free.jsonl", mode="free", max_new_tokens=6)
    session = load_session(path)
    assert [s["step"] for s in session.steps] == list(range(len(session.steps)))  # the file: from 0
    run = cli("show", str(path), "--steps")
    assert run.returncode == 0, run.stderr
    assert _steps_column(run.stdout) == [str(i + 1) for i in range(len(session.steps))]
    first = session.steps[-1]["first_divergence"]
    if first is None:
        assert f"the two texts never split in the {len(session.steps)} steps" in run.stdout
    else:
        assert f"the texts split at step {first + 1}" in run.stdout
        assert re.search(rf"first_divergence\s+{first + 1}\b", run.stdout), run.stdout


def test_show_of_an_interrupted_session_computes_the_summary(cli, tiny, tmp_path):
    from engine.perturb import perturb
    from engine.run.stepper import Stepper, StepSettings

    stepper = Stepper(perturb(tiny, "magnitude:0.5"), "Hi", StepSettings(max_new_tokens=8))
    SessionRecorder(stepper, [tmp_path / "stop.jsonl"]).run(stop=lambda: len(stepper.records) >= 3)
    run = cli("show", str(tmp_path / "stop.jsonl"))
    assert run.returncode == 0, run.stderr
    assert "interrupted" in run.stdout and "summary (computed)" in run.stdout and "kl_mean" in run.stdout
    assert run.stderr.strip() == ""


def test_show_imports_neither_torch_nor_transformers(session_file):
    code = (
        "import sys\n"
        "from hierui.cli import app\n"
        "for args in (['show', sys.argv[1], '--steps'], ['replay', sys.argv[1]]):\n"
        "    try:\n"
        "        app(args)\n"
        "    except SystemExit as e:\n"
        "        assert not e.code, e.code\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers'))\n"
        "print('HEAVY', heavy)\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code, str(session_file)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert run.returncode == 0, run.stderr
    assert "HEAVY []" in run.stdout, run.stdout[-500:]


def test_show_lists_a_directory_of_sessions(cli, session_file, tmp_path):
    out = tmp_path / "sweep"
    (out / "sessions").mkdir(parents=True)
    (out / "sessions" / "a.jsonl").write_bytes(session_file.read_bytes())
    (out / "sessions" / "broken.jsonl").write_text("not json\n")
    (out / "summary.csv").write_text("run,kl_mean\n")
    run = cli("show", str(out))
    assert run.returncode == 0, run.stderr
    assert "a.jsonl" in run.stdout and "magnitude:0.5" in run.stdout and "unreadable" in run.stdout
    assert "summary.csv" in run.stdout


def _bad(tmp_path, kind):
    path = tmp_path / f"{kind}.jsonl"
    if kind == "wrong-format":
        path.write_text(json.dumps({"format": "other", "version": 1}) + "\n")
    elif kind == "future-version":
        path.write_text(json.dumps({"format": "hierui-session", "version": 99}) + "\n")
    elif kind == "not-json":
        path.write_text("hello\n")
    elif kind == "directory":
        path = tmp_path / "not-sessions"
        path.mkdir()
        (path / "notes.txt").write_text("x")
    return path


@pytest.mark.parametrize("command", ["show", "replay", "replay --rerun"])
@pytest.mark.parametrize(
    "kind, message",
    [
        ("missing", "session not found"),
        ("wrong-format", "is not a hierui session"),
        ("future-version", "version 99 session"),
        ("not-json", "first line is not JSON"),
        ("directory", "is a directory"),
    ],
)
def test_bad_inputs_exit_2_with_one_line(cli, tmp_path, command, kind, message):
    run = cli(*command.split()[:1], str(_bad(tmp_path, kind)), *command.split()[1:])
    assert run.returncode == 2, run.stdout + run.stderr
    lines = _stderr_lines(run)
    assert len(lines) == 1, run.stderr
    assert message in lines[0]
    assert "Traceback" not in run.stdout + run.stderr


def test_replay_rerun_of_a_session_with_an_unknown_model_exits_2(cli, session_file, tmp_path):
    lines = session_file.read_text(encoding="utf-8").splitlines()
    header = json.loads(lines[0])
    header["model"] = "llama-9000"
    path = tmp_path / "unknown.jsonl"
    path.write_text("\n".join([json.dumps(header), *lines[1:]]) + "\n", encoding="utf-8")
    run = cli("replay", str(path), "--rerun", "--device", "cpu")
    assert run.returncode == 2
    lines = _stderr_lines(run)
    assert len(lines) == 1 and "unknown model 'llama-9000'" in lines[0]
    bad_dtype = cli("replay", str(session_file), "--rerun", "--dtype", "float8")
    assert bad_dtype.returncode == 2 and "unknown dtype" in bad_dtype.stderr


def test_error_lines_print_paths_verbatim(cli, tmp_path):
    missing = tmp_path / "[/odd]" / "[b]run.jsonl"  # rich markup look-alikes
    run = cli("show", str(missing))
    assert run.returncode == 2
    lines = _stderr_lines(run)
    assert len(lines) == 1 and str(missing) in lines[0], run.stderr


def test_replay_rerun_save_keeps_the_recomputed_session(cli, session_file, tmp_path):
    """--save keeps the recomputation, recorded by the same SessionRecorder: it equals the recording."""
    kept = tmp_path / "again.jsonl"
    run = cli("replay", str(session_file), "--rerun", "--device", "cpu", "--save", str(kept))
    assert run.returncode == 0, run.stdout + run.stderr
    recorded, again = load_session(session_file), load_session(kept)
    assert again.complete and [s["token_d"] for s in again.steps] == [s["token_d"] for s in recorded.steps]
    assert again.header["prompt_ids"] == recorded.header["prompt_ids"]
    assert R.compare(recorded.steps, again.steps).ok(1e-5)
    refused = cli("replay", str(session_file), "--rerun", "--save", str(kept))
    assert refused.returncode == 2 and "exists already" in refused.stderr
