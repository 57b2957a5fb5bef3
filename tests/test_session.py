"""Session files: a session round-trips; a truncated last line loads with a warning; a wrong format, a
future version, a missing file and non-JSON give one clear error line and exit 2 (through `hierui show`)."""

import json

import pytest

from engine.errors import HieruiError
from engine.record.session import FORMAT, VERSION, SessionWriter, _clean, load_session
from engine.run.recorder import SessionRecorder

HEADER_FIELDS = (
    "format",
    "version",
    "model",
    "perturbation",
    "calibration",
    "prompt",
    "mode",
    "temperature",
    "choices",
    "seed",
    "created",
    "hierui",
)


def _stepper(tiny, spec="magnitude:0.5", steps=5, **settings):
    from engine.perturb import perturb
    from engine.run.stepper import Stepper, StepSettings

    pair = perturb(tiny, spec)
    return Stepper(pair, "Hello", StepSettings(max_new_tokens=steps, **settings))


def record(stepper, path, **options):
    """Record a one-prompt stepper through the production path (SessionRecorder)."""
    return SessionRecorder(stepper, [path]).run(**options)[0]


@pytest.fixture(scope="module")
def recorded(tiny, tmp_path_factory):
    """A complete 5-step session of tiny-random under magnitude:0.5: (stepper, path, returned session)."""
    path = tmp_path_factory.mktemp("sessions") / "run.jsonl"
    stepper = _stepper(tiny)
    returned = record(stepper, path)
    return stepper, path, returned


def _lines(path):
    return path.read_bytes().split(b"\n")


def _write(path, lines):
    path.write_bytes(b"\n".join(lines))
    return path


def _json_equal(records):
    """What a record looks like after the JSON round trip: NaN/inf become null."""
    return json.loads(json.dumps(_clean(records)))


# ------------------------------------------------------------------ round trip


def test_session_round_trips(recorded):
    stepper, path, returned = recorded
    session = load_session(path)
    assert session.warnings == []
    assert session.complete
    assert len(session.steps) == 5
    assert session.steps == _json_equal(stepper.records)
    header = session.header
    for name in HEADER_FIELDS:
        assert name in header, name
    assert header["format"] == FORMAT and header["version"] == VERSION
    assert header["model"] == "tiny-random"
    assert header["perturbation"]["spec"] == "magnitude:0.5"
    assert header["perturbation"]["measured_sparsity"] == pytest.approx(0.5, abs=0.01)
    assert header["prompt"] == "Hello" and header["mode"] == "shared" and header["temperature"] == 1.0
    assert header["choices"] is None and header["seed"] == 0
    assert session.summary == _json_equal(returned.summary)
    assert session.summary["steps"] == 5 and "kl_mean" in session.summary
    assert returned.complete and returned.header == header


def test_nan_is_written_as_null(tiny, tmp_path):
    # `none`: identical logits, so the amplification ratio is undefined (NaN) and must be stored as null
    stepper = _stepper(tiny, "none", steps=2)
    record(stepper, tmp_path / "none.jsonl")
    text = (tmp_path / "none.jsonl").read_text(encoding="utf-8")
    assert "NaN" not in text and "Infinity" not in text
    session = load_session(tmp_path / "none.jsonl")
    assert session.steps == _json_equal(stepper.records)
    assert all(s["kl"] == 0.0 for s in session.steps)


def test_interrupted_run_loads_incomplete(tiny, tmp_path):
    stepper = _stepper(tiny)
    returned = record(stepper, tmp_path / "stopped.jsonl", stop=lambda: len(stepper.records) >= 2)
    assert not returned.complete
    session = load_session(tmp_path / "stopped.jsonl")
    assert len(session.steps) == 2 and [s["step"] for s in session.steps] == [0, 1]
    assert session.complete is False and session.summary is None
    assert session.warnings == []


def test_steps_taken_before_recording_are_written(tiny, tmp_path):
    stepper = _stepper(tiny, steps=4)
    stepper.step()
    stepper.step()
    returned = record(stepper, tmp_path / "late.jsonl")
    session = load_session(tmp_path / "late.jsonl")
    assert [s["step"] for s in session.steps] == [0, 1, 2, 3]
    assert session.steps == _json_equal(stepper.records)
    assert session.summary == _json_equal(returned.summary)


def test_callback_sees_every_step(tiny, tmp_path):
    seen = []
    stepper = _stepper(tiny, steps=3)
    record(stepper, tmp_path / "cb.jsonl", callback=lambda _b, r: seen.append(r["step"]))
    assert seen == [0, 1, 2]


def test_writer_flushes_each_step(tmp_path):
    path = tmp_path / "w.jsonl"
    writer = SessionWriter(path, {"model": "m", "prompt": "p"})
    writer.write_step({"step": 0, "kl": float("nan")})
    session = load_session(path)  # readable while still open: a crash loses nothing written
    assert session.steps == [{"step": 0, "kl": None}] and not session.complete
    writer.close({"steps": 1})
    writer.close({"steps": 1})  # closing twice is harmless
    assert load_session(path).summary == {"steps": 1}


# ------------------------------------------------------------------ damaged files


def test_truncated_last_line_loads_with_warning(recorded, tmp_path):
    _, path, _ = recorded
    lines = [ln for ln in _lines(path) if ln]
    # drop the closing line and cut the last step line in half: a crash mid-write
    damaged = _write(tmp_path / "cut.jsonl", lines[:-2] + [lines[-2][: len(lines[-2]) // 2]])
    session = load_session(damaged)
    assert len(session.steps) == 4
    assert not session.complete
    assert len(session.warnings) == 1 and "truncated last line" in session.warnings[0]
    assert "\n" not in session.warnings[0]


def test_truncated_inside_a_multibyte_character_is_still_a_warning(recorded, tmp_path):
    _, path, _ = recorded
    lines = [ln for ln in _lines(path) if ln]
    partial = '{"step":5,"text_d":"é'.encode()[:-1]  # the crash split a 2-byte character
    session = load_session(_write(tmp_path / "utf.jsonl", lines[:-1] + [partial]))
    assert len(session.steps) == 5 and session.warnings


def test_corrupt_last_line_is_a_warning_corrupt_middle_line_an_error(recorded, tmp_path):
    _, path, _ = recorded
    lines = [ln for ln in _lines(path) if ln]
    last = load_session(_write(tmp_path / "last.jsonl", lines[:-1] + [b"}}garbage{{"]))
    assert len(last.steps) == 5 and not last.complete and last.warnings
    middle = _write(tmp_path / "middle.jsonl", lines[:3] + [b"}}garbage{{"] + lines[3:])
    with pytest.raises(HieruiError, match="line 4 is not valid JSON") as info:
        load_session(middle)
    assert info.value.exit_code == 2


def test_step_gap_is_an_error(recorded, tmp_path):
    _, path, _ = recorded
    lines = [ln for ln in _lines(path) if ln]
    gap = _write(tmp_path / "gap.jsonl", lines[:3] + lines[4:])  # step 2 missing
    with pytest.raises(HieruiError, match="holds step 3, expected step 2"):
        load_session(gap)


def test_lines_after_the_closing_line_are_an_error(recorded, tmp_path):
    _, path, _ = recorded
    lines = [ln for ln in _lines(path) if ln]
    with pytest.raises(HieruiError, match="after the closing summary"):
        load_session(_write(tmp_path / "after.jsonl", lines + [lines[1]]))


def test_blank_lines_are_ignored_and_reported_lines_are_file_lines(recorded, tmp_path):
    _, path, _ = recorded
    lines = [ln for ln in _lines(path) if ln]
    assert len(load_session(_write(tmp_path / "blank.jsonl", [lines[0], b""] + lines[1:] + [b"", b""])).steps) == 5
    with pytest.raises(HieruiError, match="line 4 is not valid JSON"):
        load_session(_write(tmp_path / "blank2.jsonl", [lines[0], b"", lines[1], b"{bad"] + lines[2:]))


def _header(**changes):
    return json.dumps({"format": FORMAT, "version": VERSION, "model": "tiny-random", "prompt": "x", **changes})


BAD_FILES = {
    "missing": (None, "session not found"),
    "wrong-format": (json.dumps({"format": "something-else", "version": 1}) + "\n", "is not a hierui session"),
    "future-version": (_header(version=VERSION + 1) + "\n", f"version {VERSION + 1} session"),
    "no-version": (json.dumps({"format": FORMAT}) + "\n", "no valid version"),
    "not-json": ("hello world\nthis is text\n", "first line is not JSON"),
    "empty": ("", "is empty"),
    "binary": (b"\x89PNG\r\n\x1a\n\xff\xfe\x00", "not UTF-8"),
    "json-list": ("[1, 2, 3]\n", "is not a hierui session"),
}


def _bad_file(tmp_path, kind):
    content, _ = BAD_FILES[kind]
    path = tmp_path / f"{kind}.jsonl"
    if content is not None:
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_bad_files_raise_one_clear_line(tmp_path, kind):
    with pytest.raises(HieruiError) as info:
        load_session(_bad_file(tmp_path, kind))
    assert BAD_FILES[kind][1] in str(info.value)
    assert "\n" not in str(info.value) and info.value.exit_code == 2


def test_a_directory_is_not_a_session(tmp_path):
    with pytest.raises(HieruiError, match="is a directory"):
        load_session(tmp_path)


# ------------------------------------------------------------------ through the CLI


@pytest.mark.parametrize("kind", ["missing", "wrong-format", "future-version", "not-json"])
def test_show_bad_session_is_one_line_exit_2(cli, tmp_path, kind):
    run = cli("show", str(_bad_file(tmp_path, kind)))
    assert run.returncode == 2, run.stdout + run.stderr
    lines = [ln for ln in run.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, run.stderr
    assert BAD_FILES[kind][1] in lines[0]
    assert "Traceback" not in run.stdout + run.stderr


def test_show_truncated_session_warns_on_one_stderr_line(cli, recorded, tmp_path):
    _, path, _ = recorded
    lines = [ln for ln in _lines(path) if ln]
    damaged = _write(tmp_path / "cut.jsonl", lines[:-2] + [lines[-2][:40]])
    run = cli("show", str(damaged))
    assert run.returncode == 0, run.stderr
    err = [ln for ln in run.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and "warning" in err[0] and "truncated last line" in err[0]
    assert "interrupted" in run.stdout


def test_every_shipped_session_passes_the_schema():
    """engine.record.validate checks every field of the files load_session reads: the example sessions pass it."""
    from pathlib import Path

    files = sorted((Path(__file__).parent.parent / "sessions").glob("*.jsonl"))
    assert files
    for path in files:
        assert load_session(path).steps, path
