"""The typed session header (engine.record.header.SessionHeader): a real header goes write → read → write to the
same line, byte for byte; a header without the later fields gets the documented defaults and still loads, shows,
replays and reruns; every shipped session loads; a field of the wrong type is one error line naming it."""

import json
from pathlib import Path

import pytest

from engine.errors import HieruiError
from engine.record.header import Calibration, Parent, Perturbation, SessionHeader, header_of
from engine.record.session import SessionWriter, _line, load_session
from engine.run import rerun as R
from engine.run.recorder import SessionRecorder

SHIPPED = sorted((Path(__file__).parent.parent / "sessions").glob("*.jsonl"))
# the fields written since the format's first sessions: a header may lack every one of them
LATER = ("lens", "tie_margin", "tie_margin_source", "truncated_from", "prefix_ids", "start_step", "parent")
LATER += ("counterfactual", "plan", "architecture", "layers", "prompt_ids", "prompt_tokens")


def _record(tiny, path, spec="magnitude:0.5", **settings):
    from engine.perturb import perturb
    from engine.run.stepper import Stepper, StepSettings

    stepper = Stepper(perturb(tiny, spec), "Hello", StepSettings(**{"max_new_tokens": 3, **settings}))
    SessionRecorder(stepper, [path]).run()
    return path


def _first_line(path) -> bytes:
    return Path(path).read_bytes().split(b"\n", 1)[0] + b"\n"


@pytest.mark.parametrize("settings", [{}, {"mode": "free", "counterfactual": True, "choices": ["A", "B"]}])
def test_a_real_header_round_trips_to_the_same_line(tiny, tmp_path, settings):
    path = _record(tiny, tmp_path / "s.jsonl", **settings)
    header = load_session(path).header
    assert isinstance(header, SessionHeader)
    assert header.to_dict() == json.loads(_first_line(path))  # the same keys, in the same order, the same values
    assert list(header.to_dict()) == list(json.loads(_first_line(path)))
    assert _line(header.to_dict()).encode() == _first_line(path)
    again = tmp_path / "again.jsonl"
    writer = SessionWriter(again, header)
    writer.close()
    assert json.loads(_first_line(again)) == {**header.to_dict(), "created": writer.header.created}
    assert header.perturbation.spec == "magnitude:0.5" and header.model == "tiny-random"
    assert header.counterfactual is bool(settings) and header.lens == "all"


def test_every_optional_field_round_trips(tmp_path):
    header = SessionHeader(
        model="tiny-random",
        perturbation=Perturbation("wanda:0.5", 0.5, 0.0, {"kind": "x"}),
        calibration=Calibration("self", 4, 16, 0, False, 0.25),
        prompt="Hi",
        prompt_ids=[1, 2, 3],
        truncated_from=9,
        mode="free",
        tie_margin=0.01,
        tie_margin_source="given",
        prefix_ids=[3],
        start_step=4,
        parent={"session": "/x/p.jsonl", "step": 3, "token": 7, "text": "a"},
        counterfactual=True,
        plan={"placement": "one device"},
    )
    path = tmp_path / "all.jsonl"
    SessionWriter(path, header).close()
    read = load_session(path).header
    assert read.to_dict() == json.loads(_first_line(path)) and _line(read.to_dict()).encode() == _first_line(path)
    assert read.parent == Parent("/x/p.jsonl", 3, 7, "a") and read.prefix_ids == (3,) and read.start_step == 4
    assert read.is_branch and read.truncated_from == 9 and read.plan == {"placement": "one device"}


def _old_header(path: Path, tmp_path: Path, drop=LATER) -> Path:
    """`path` with the later fields taken out of its header, as an older hierui wrote it."""
    lines = path.read_text(encoding="utf-8").splitlines()
    header = {k: v for k, v in json.loads(lines[0]).items() if k not in drop}
    old = tmp_path / f"old-{path.name}"
    old.write_text("\n".join([json.dumps(header), *lines[1:]]) + "\n", encoding="utf-8")
    return old


def test_an_old_header_gets_the_documented_defaults(tiny, tmp_path):
    old = _old_header(_record(tiny, tmp_path / "s.jsonl"), tmp_path)
    header = load_session(old).header
    assert header.lens is None  # recorded before the lens: no lens data (not --no-lens)
    assert (header.tie_margin, header.tie_margin_source, header.truncated_from, header.plan) == (None,) * 4
    assert (header.prefix_ids, header.start_step, header.parent, header.counterfactual) == ((), 0, None, False)
    assert (header.architecture, header.layers, header.prompt_ids) == (None, None, None)
    assert not header.is_branch
    assert not set(LATER) & set(header.to_dict())  # what the file lacks is not written back either
    minimal = header_of({"model": "m", "prompt": "p"})
    assert (minimal.mode, minimal.temperature, minimal.seed, minimal.topk) == ("shared", 1.0, 0, 5)
    assert (minimal.sample, minimal.raw, minimal.perturbation.spec, minimal.calibration) == (False, False, None, None)
    assert R.settings_from_header(header, 3).lens == "off"  # a rerun records no lens where there was none


def test_an_old_header_loads_shows_replays_and_reruns(cli, tiny, tmp_path):
    old = _old_header(_record(tiny, tmp_path / "s.jsonl", lens=False), tmp_path)
    for args in (("show", old), ("replay", old, "--print")):
        run = cli(*args)
        assert run.returncode == 0, run.stdout + run.stderr
        assert "magnitude:0.5" in run.stdout and "tiny-random" in run.stdout
    session = load_session(old)
    result = R.compare(session.steps, R.rerun(session, loaded=tiny))
    assert result.tokens_match and result.max_deviation < 1e-5, result


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_every_shipped_session_loads_and_its_header_line_round_trips(path):
    session = load_session(path)
    assert session.steps and session.header.model == "smollm2-135m"
    assert _line(session.header.to_dict()).encode() == _first_line(path)


WRONG = {
    "lens": ("yes", 'lens is "yes", expected all or sampled or off (version 1: true or false)'),
    "truncated_from": ("9", 'truncated_from is "9", expected an integer'),
    "plan": (3, "plan is 3, expected an object"),
    "parent": ({"step": "two"}, 'parent.step is "two", expected an integer'),
    "prefix_ids": ([1, None], "prefix_ids[1] is null, expected a list of integers"),
    "calibration": ({"source": 5}, "calibration.source is 5, expected a string"),
}


@pytest.mark.parametrize("name", sorted(WRONG))
def test_a_field_of_the_wrong_type_is_one_line_naming_it(tiny, tmp_path, name):
    value, expected = WRONG[name]
    good = _record(tiny, tmp_path / "s.jsonl")
    lines = good.read_text(encoding="utf-8").splitlines()
    lines[0] = json.dumps({**json.loads(lines[0]), name: value})
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(HieruiError) as info:
        load_session(bad)
    message = str(info.value)
    assert "\n" not in message and message == f"{bad}: line 1: {expected}"
    with pytest.raises(HieruiError) as direct:
        SessionHeader.from_dict(json.loads(lines[0]), bad)
    assert str(direct.value) == message


def test_the_header_reads_as_the_mapping_it_is_written_as(tiny, tmp_path):
    header = load_session(_record(tiny, tmp_path / "s.jsonl")).header
    assert header["mode"] == header.mode and header["perturbation"]["spec"] == "magnitude:0.5"
    assert "counterfactual" not in header and "lens" in header and dict(header) == header.to_dict()
    assert header.get("parent") is None and header_of(dict(header)) == header
