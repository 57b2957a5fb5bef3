"""Files are untrusted input (issue 11): a session with a field of the wrong type or out of range, a line
nested too deeply or a number no float holds is one error line (file, line, field, the value as written)
with exit 2 from every reader, and nothing is written; a header naming a path never steers a read; text from
files reaches the terminal escaped."""

import builtins
import json
from pathlib import Path

import pytest

from engine.errors import HieruiError
from engine.record.session import load_session
from engine.run import rerun as R
from engine.run.recorder import SessionRecorder


def _record(tiny, path, spec="magnitude:0.5", calib=None, **settings):
    from engine.perturb import perturb
    from engine.run.stepper import Stepper, StepSettings

    pair = perturb(tiny, spec, calib_options=calib)
    stepper = Stepper(pair, "Hello", StepSettings(**{"max_new_tokens": 3, **settings}))
    SessionRecorder(stepper, [path]).run()
    return path


@pytest.fixture(scope="module")
def good(tiny, tmp_path_factory):
    return _record(tiny, tmp_path_factory.mktemp("untrusted") / "good.jsonl")


def _lines(path):
    return path.read_text(encoding="utf-8").splitlines()


DEEP = "[" * 100_000 + "]" * 100_000
HUGE_INT = "1" * 5000

# name → (line index to change, {field: value} or a raw JSON text to put in as field "x", what the error shows)
# values given as str starting with "RAW:" are spliced in as JSON text, exactly as written
BAD = {
    "perturbation-str": (0, {"perturbation": "wanda"}, 'perturbation is "wanda", expected an object'),
    "perturbation-spec-int": (0, {"perturbation": {"spec": 5}}, "perturbation.spec is 5"),
    "prompt-int": (0, {"prompt": 5}, "prompt is 5, expected a string"),
    "prompt-null": (0, {"prompt": None}, "prompt is null"),
    "temperature-str": (0, {"temperature": "hot"}, 'temperature is "hot"'),
    "temperature-zero": (0, {"temperature": 0}, "temperature is 0, expected a number > 0"),
    "temperature-nan": (0, {"temperature": "RAW:NaN"}, "temperature is NaN"),
    "temperature-huge": (0, {"temperature": "RAW:1e999"}, "temperature is 1e999"),
    "max-new-tokens-str": (0, {"max_new_tokens": "64"}, 'max_new_tokens is "64"'),
    "max-new-tokens-zero": (0, {"max_new_tokens": 0}, "max_new_tokens is 0"),
    "model-int": (0, {"model": 7}, "model is 7, expected a string"),
    "model-list": (0, {"model": ["x"]}, 'model is ["x"]'),
    "calibration-samples-str": (0, {"calibration": {"samples": "8"}}, 'calibration.samples is "8"'),
    "calibration-str": (0, {"calibration": "self"}, 'calibration is "self"'),
    "choices-str": (0, {"choices": "AB"}, 'choices is "AB"'),
    "mode-unknown": (0, {"mode": "side\x1bways"}, 'mode is "side\\u001bways", expected shared or free'),
    "prompt-ids": (0, {"prompt_ids": [1, "a"]}, 'prompt_ids[1] is "a"'),
    "seed-huge": (0, {"seed": f"RAW:{HUGE_INT}"}, "line 1"),
    "header-deep": (0, {"x": f"RAW:{DEEP}"}, "nested too deeply"),
    "token-str": (1, {"token_d": "x"}, 'line 2: token_d is "x", expected an integer'),
    "kl-str": (2, {"kl": "big"}, 'line 3: kl is "big"'),
    "kl-nan": (1, {"kl": "RAW:NaN"}, "line 2: kl is NaN"),
    "kl-huge": (1, {"kl": "RAW:-1e400"}, "line 2: kl is -1e400"),
    "emb-cos-str": (1, {"emb_cos": "a"}, 'emb_cos is "a", expected a list'),
    "emb-cos-item": (1, {"emb_cos": [1.0, "a"]}, 'emb_cos[1] is "a"'),
    "topk-row": (1, {"topk_d": [[1, 2, 3]]}, "topk_d[0] is [1,2,3]"),
    "text-int": (1, {"text_p": 4}, "text_p is 4"),
    "step-deep": (1, {"x": f"RAW:{DEEP}"}, "line 2 is nested too deeply"),
    "step-huge-int": (1, {"token_d": f"RAW:{HUGE_INT}"}, "line 2 holds a number too large"),
    "summary-str": (-1, {"summary": {"kl_mean": "low"}}, 'summary.kl_mean is "low"'),
}


def _bad_session(good, tmp_path, kind):
    index, changes, _ = BAD[kind]
    lines = _lines(good)
    obj = json.loads(lines[index])
    raw = {}
    for k, v in changes.items():
        if isinstance(v, str) and v.startswith("RAW:"):
            raw[k] = v[4:]
            v = f"@@{k}@@"
        obj[k] = v
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    for k, v in raw.items():
        text = text.replace(f'"@@{k}@@"', v)
    lines[index] = text
    path = tmp_path / f"{kind}.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("kind", sorted(BAD))
def test_a_bad_field_is_one_line_naming_file_line_field_and_value(good, tmp_path, kind):
    path = _bad_session(good, tmp_path, kind)
    with pytest.raises(HieruiError) as info:
        load_session(path)
    message = str(info.value)
    assert "\n" not in message and "\x1b" not in message and info.value.exit_code == 2
    assert str(path) in message and BAD[kind][2] in message, message


COMMANDS = {
    "show": lambda p, out: ("show", p),
    "replay --print": lambda p, out: ("replay", p, "--print"),
    "replay --rerun": lambda p, out: ("replay", p, "--rerun", "--device", "cpu", "--save", out / "again.jsonl"),
    "batch --from": lambda p, out: ("batch", "--from", p, "--prune", "none", "--device", "cpu", "--out", out / "o"),
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("kind", sorted(BAD))
def test_every_reader_refuses_a_bad_session_with_one_line(cli, good, tmp_path, kind, command):
    path = _bad_session(good, tmp_path, kind)
    out = tmp_path / "out"
    out.mkdir()
    run = cli(*COMMANDS[command](path, out))
    assert run.returncode == 2, run.stdout + run.stderr
    lines = [ln for ln in run.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and BAD[kind][2].split(": ", 1)[-1] in lines[0], run.stderr
    assert "Traceback" not in run.stdout + run.stderr
    assert list(out.iterdir()) == []  # nothing written


def test_the_good_session_still_loads_and_shows(cli, good):
    assert load_session(good).steps
    assert cli("show", good).returncode == 0


# ------------------------------------------------------------------ a folder listing


def test_a_folder_listing_reports_a_bad_file_on_its_row_and_goes_on(cli, good, tmp_path):
    folder = tmp_path / "many"
    folder.mkdir()
    (folder / "a-good.jsonl").write_bytes(good.read_bytes())
    bad = _bad_session(good, tmp_path, "perturbation-str")
    (folder / "b-bad.jsonl").write_bytes(bad.read_bytes())
    run = cli("show", folder)
    assert run.returncode == 0, run.stderr
    assert "a-good.jsonl" in run.stdout and "magnitude:0.5" in run.stdout
    assert "b-bad.jsonl" in run.stdout and "unreadable" in run.stdout
    assert "Traceback" not in run.stdout + run.stderr


# ------------------------------------------------------------------ headers never steer reads


def _with_header(good, tmp_path, name, **changes):
    lines = _lines(good)
    header = {**json.loads(lines[0]), **changes}
    path = tmp_path / name
    path.write_text("\n".join([json.dumps(header), *lines[1:]]) + "\n", encoding="utf-8")
    return path


def _forbid_reading(monkeypatch, secret: Path):
    """Fail the test if anything opens `secret`."""
    real_open, real_read_text, real_read_bytes = builtins.open, Path.read_text, Path.read_bytes
    target = str(secret.resolve())

    def guard(file):
        if isinstance(file, (str, Path)) and str(Path(file).resolve()) == target:
            pytest.fail(f"{file} was read")

    def fake_open(file, *args, **kwargs):
        guard(file)
        return real_open(file, *args, **kwargs)

    def fake_read_text(self, *args, **kwargs):
        guard(self)
        return real_read_text(self, *args, **kwargs)

    def fake_read_bytes(self):
        guard(self)
        return real_read_bytes(self)

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(Path, "read_text", fake_read_text)
    monkeypatch.setattr(Path, "read_bytes", fake_read_bytes)


@pytest.fixture()
def secret_session(tiny, tmp_path):
    """A wanda session calibrated on a text file: (session path, the text file)."""
    secret = tmp_path / "secret.txt"
    secret.write_text("The quick brown fox jumps over the lazy dog. top secret " * 30)
    path = _record(
        tiny, tmp_path / "calib.jsonl", spec="wanda:0.5", calib={"source": str(secret), "samples": 2, "length": 8}
    )
    assert load_session(path).header["calibration"]["source"] == str(secret.resolve())
    return path, secret


def test_rerun_refuses_a_calibration_file_named_by_the_header_without_reading_it(cli, secret_session, monkeypatch):
    path, secret = secret_session
    _forbid_reading(monkeypatch, secret)
    run = cli("replay", path, "--rerun", "--device", "cpu")
    assert run.returncode == 2, run.stdout + run.stderr
    lines = [ln for ln in run.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "--calib" in lines[0] and "secret.txt" in lines[0], run.stderr
    assert "top secret" not in run.stdout + run.stderr
    batch = cli("batch", "--from", path, "--prune", "none", "--out", path.parent / "o")
    assert batch.returncode == 2 and "--calib" in batch.stderr, batch.stderr
    assert not (path.parent / "o").exists()


def test_rerun_reads_the_calibration_file_the_user_confirms(cli, secret_session):
    path, secret = secret_session
    run = cli("replay", path, "--rerun", "--device", "cpu", "--calib", secret)
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"rerunning with model tiny-random, perturbation wanda:0.5, calibration {secret}" in run.stdout
    assert run.stdout.index("rerunning with") < run.stdout.index("rerun matches the recording")


def test_rerun_refuses_a_model_path_or_checkpoint_named_by_the_header(cli, good, tmp_path, monkeypatch):
    import engine.models.loading
    import engine.models.names

    def no_loading(*args, **kwargs):
        pytest.fail("a model named by the file was touched")

    monkeypatch.setattr(engine.models.loading, "resolve", no_loading)
    monkeypatch.setattr(engine.models.names, "resolve", no_loading)
    monkeypatch.setattr(engine.models.loading, "load", no_loading)
    cases = {
        "local.jsonl": ({"model": str(tmp_path / "model-dir")}, "--model"),
        "hub.jsonl": ({"model": "someone/some-model"}, "--model someone/some-model"),
        "ckpt.jsonl": ({"perturbation": {"spec": f"checkpoint:{tmp_path / 'ck'}"}}, "--prune checkpoint:"),
    }
    for name, (changes, flag) in cases.items():
        run = cli("replay", _with_header(good, tmp_path, name, **changes), "--rerun", "--device", "cpu")
        assert run.returncode == 2, run.stdout + run.stderr
        lines = [ln for ln in run.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and flag in lines[0], run.stderr
        assert "rerunning with" not in run.stdout


def test_plan_rerun_takes_allowed_header_values_and_confirmed_ones(good, tmp_path):
    session = load_session(good)
    plan = R.plan_rerun(session)
    assert (plan.model, plan.spec) == ("tiny-random", "magnitude:0.5")
    hub = load_session(_with_header(good, tmp_path, "hub.jsonl", model="someone/x"))
    with pytest.raises(HieruiError, match="--model someone/x"):
        R.plan_rerun(hub)
    assert R.plan_rerun(hub, model="someone/x").model == "someone/x"


# ------------------------------------------------------------------ terminal safety


def test_text_from_a_header_is_printed_escaped(cli, good, tmp_path):
    path = _with_header(
        good,
        tmp_path,
        "esc.jsonl",
        model_display="evil\x1b[2Jmodel",
        perturbation={"spec": "magnitude:0.5", "measured_sparsity": 0.5},
        created="2026\x07",
    )
    for args in (("show", path), ("replay", path, "--print")):
        run = cli(*args)
        assert run.returncode == 0, run.stderr
        assert "\x1b" not in run.stdout and "\x07" not in run.stdout
        assert "evil\\x1b[2Jmodel" in run.stdout


def test_an_error_line_quoting_a_file_is_escaped(cli, good, tmp_path):
    path = _with_header(good, tmp_path, "spec.jsonl", perturbation={"spec": "nonsense\x1b[31m:9"})
    run = cli("replay", path, "--rerun", "--device", "cpu")
    assert run.returncode == 2
    assert "\x1b" not in run.stderr and len([ln for ln in run.stderr.splitlines() if ln.strip()]) == 1


# ------------------------------------------------------------------ a crash inside the UI


def _broken_replay_app(good, monkeypatch):
    from hierui.explorer.app import HieruiApp
    from hierui.explorer.widgets.info import InfoBar

    def boom(self):
        raise ValueError("boom\x1b[2J in a widget")

    monkeypatch.setattr(InfoBar, "render", boom)
    return HieruiApp(session=load_session(good))


def test_a_crash_inside_the_app_sets_a_nonzero_return_code(good, monkeypatch):
    import asyncio

    app = _broken_replay_app(good, monkeypatch)

    async def scenario():
        async with app.run_test(size=(100, 30)) as pilot:
            await pilot.pause()

    with pytest.raises(ValueError, match="boom"):
        asyncio.run(scenario())
    assert app.return_code == 1 and isinstance(app.failure, ValueError)


def test_run_app_turns_a_crash_into_one_error_line_and_exit_1(good, monkeypatch, capfd):
    from textual.app import App

    from hierui.cli.launch import run_app

    app = _broken_replay_app(good, monkeypatch)
    monkeypatch.setattr(app, "run", lambda: App.run(app, headless=True, size=(100, 30)))
    with pytest.raises(HieruiError) as info:
        run_app(app)
    assert info.value.exit_code == 1
    assert str(info.value).startswith("the explorer failed: ValueError: boom")
    captured = capfd.readouterr()
    assert "Traceback" not in captured.out + captured.err


def test_replay_checks_the_app_return_code(cli, good, monkeypatch):
    """`hierui replay` (in a terminal) runs the explorer through run_app: a crash is exit 1, one line."""
    from textual.app import App

    import hierui.cli.launch

    monkeypatch.setattr(hierui.cli.launch, "interactive", lambda: True)
    _broken_replay_app(good, monkeypatch)
    monkeypatch.setattr("hierui.explorer.app.HieruiApp.run", lambda self: App.run(self, headless=True, size=(100, 30)))
    run = cli("replay", good)
    assert run.returncode == 1, run.stdout + run.stderr
    lines = [ln for ln in run.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "the explorer failed: ValueError: boom" in lines[0], run.stderr
    assert "\x1b[2J" not in run.stderr


# ------------------------------------------------------------------ run folders


def _copy_run(tmp_path, good):
    """A tiny real `hierui batch` output (tiny-random, none, 2 steps)."""
    from typer.testing import CliRunner

    from hierui.cli import app

    prompts = tmp_path / "p.txt"
    prompts.write_text("Hello\n")
    out = tmp_path / "run"
    args = ["batch", "--prompts", str(prompts), "--model", "tiny-random", "--prune", "none", "--max-new-tokens", "2"]
    result = CliRunner().invoke(app, [*args, "--device", "cpu", "--out", str(out)])
    assert result.exit_code == 0, (result.output, result.exception)
    return out


@pytest.mark.parametrize("command", ["show", "report"])
def test_a_run_folder_with_a_wrong_schema_table_is_one_line(cli, good, tmp_path, command):
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = _copy_run(tmp_path, good)
    table = pq.read_table(out / "summary.parquet")
    kl = table.column_names.index("kl_mean")
    pq.write_table(table.set_column(kl, "kl_mean", pa.array(["low"] * table.num_rows)), out / "summary.parquet")
    run = cli(command, out)
    assert run.returncode == 2, run.stdout + run.stderr
    lines = [ln for ln in run.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "summary.parquet: column 'kl_mean' is string, expected double" in lines[0], run.stderr
    pq.write_table(table.drop(["run_id"]), out / "summary.parquet")
    run = cli(command, out)
    assert run.returncode == 2 and "no column 'run_id'" in run.stderr, run.stderr
    pq.write_table(table, out / "summary.parquet")
    manifest = json.loads((out / "batch.json").read_text())
    (out / "batch.json").write_text(json.dumps({**manifest, "specs": 5}))
    run = cli(command, out)
    assert run.returncode == 2 and "batch.json: specs is 5, expected a list of strings" in run.stderr, run.stderr
    assert "Traceback" not in run.stdout + run.stderr


# ------------------------------------------------------------------ messages name the value as written


@pytest.mark.parametrize(
    "answer, shown", [("true", "got true"), ('"E"', 'got "E"'), ("7", "got 7"), ("1.0", "got 1.0")]
)
def test_a_bad_answer_is_named_as_written(tmp_path, answer, shown):
    from engine.record.prompts import read_prompts

    path = tmp_path / "q.jsonl"
    path.write_text(f'{{"prompt": "q", "choices": ["a", "b"], "answer": {answer}}}\n')
    with pytest.raises(HieruiError, match=f"line 1: .*{shown}$"):
        read_prompts(path)


def test_an_explicit_id_colliding_with_a_numbered_one_blames_the_line_that_wrote_it(tmp_path):
    from engine.record.prompts import read_prompts

    path = tmp_path / "ids.jsonl"
    path.write_text('{"prompt": "a", "id": "p001"}\n{"prompt": "b"}\n')
    with pytest.raises(HieruiError, match="line 1: prompt id 'p001' is also the id line 2 gets automatically"):
        read_prompts(path)
    path.write_text('{"prompt": "a"}\n{"prompt": "b", "id": "p000"}\n')
    with pytest.raises(HieruiError, match="line 2: prompt id 'p000' is also the id line 1 gets automatically"):
        read_prompts(path)
    path.write_text('{"prompt": "a", "id": "x"}\n{"prompt": "b", "id": "x"}\n')
    with pytest.raises(HieruiError, match=r"line 2: prompt id 'x' is used twice \(also on line 1\)"):
        read_prompts(path)


def test_batch_from_a_session_with_an_empty_prompt_refuses(cli, good, tmp_path):
    path = _with_header(good, tmp_path, "empty.jsonl", prompt="  ")
    run = cli("batch", "--from", path, "--prune", "none", "--out", tmp_path / "o")
    assert run.returncode == 2 and "prompt is empty" in run.stderr, run.stderr
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------ one trust policy (engine.models.trust)

# what a crafted file names → the option the user must repeat for it to be used
CRAFTED = {
    "path": ({"model": "/tmp/evil-model"}, "--model /tmp/evil-model"),
    "bare-dir": ({"model": "evilmodel"}, "--model evilmodel"),  # a local folder of that name where hierui runs
    "hub-id": ({"model": "evil/model"}, "--model evil/model"),
    "checkpoint": ({"perturbation": {"spec": "checkpoint:/tmp/x"}}, "--prune checkpoint:/tmp/x"),
    "calibration": (
        {"calibration": {"source": "/tmp/evil-calib.txt", "samples": 2, "length": 8, "seed": 0}},
        "--calib /tmp/evil-calib.txt",
    ),
}
READERS = {
    "replay --rerun": lambda p, out: ("replay", p, "--rerun", "--device", "cpu"),
    "batch --from": lambda p, out: ("batch", "--from", p, "--prune", "none", "--device", "cpu", "--out", out / "o"),
    "attribute": lambda p, out: ("attribute", p, "--device", "cpu"),
}
# batch --from takes its specs from --prune: the header's spec (a checkpoint) is never read
CASES = [(c, r) for c in sorted(CRAFTED) for r in sorted(READERS) if (c, r) != ("checkpoint", "batch --from")]


@pytest.fixture()
def crafted(good, tmp_path, monkeypatch):
    """A session naming each CRAFTED thing; the command runs in a folder holding a model folder `evilmodel`."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "evilmodel").mkdir()
    (tmp_path / "evilmodel" / "config.json").write_text("{}")
    return lambda kind: _with_header(good, tmp_path, f"{kind}.jsonl", **CRAFTED[kind][0])


def _one_line(run) -> str:
    lines = [ln for ln in run.stderr.splitlines() if ln.strip()]
    assert run.returncode == 2 and len(lines) == 1, run.stdout + run.stderr
    assert "Traceback" not in run.stdout + run.stderr
    return lines[0]


@pytest.mark.parametrize("kind, reader", CASES)
def test_every_reader_refuses_what_a_session_names_until_the_user_repeats_it(cli, crafted, tmp_path, kind, reader):
    path = crafted(kind)
    line = _one_line(cli(*READERS[reader](path, tmp_path)))
    assert f"{path} names" in line and f"confirm it with {CRAFTED[kind][1]}" in line, line
    assert not (tmp_path / "o").exists()


REPEATED = {  # the option repeated: the file's value passes, and the command goes on to its next check
    "path": (("--model", "/tmp/evil-model"), "model directory not found: /tmp/evil-model"),
    "calibration": (("--calib", "/tmp/evil-calib.txt"), "--calib /tmp/evil-calib.txt: not found"),
}


@pytest.mark.parametrize("kind", sorted(REPEATED))
@pytest.mark.parametrize("reader", sorted(READERS))
def test_what_the_user_repeats_is_used(cli, crafted, tmp_path, kind, reader):
    option, next_check = REPEATED[kind]
    line = _one_line(cli(*READERS[reader](crafted(kind), tmp_path), *option))
    assert next_check in line and "confirm it with" not in line, line


def test_a_repeated_checkpoint_reaches_the_checkpoint(cli, crafted, tmp_path):
    for reader in ("replay --rerun", "attribute"):
        line = _one_line(cli(*READERS[reader](crafted("checkpoint"), tmp_path), "--prune", "checkpoint:/tmp/x"))
        assert "not found: /tmp/x" in line and "confirm it with" not in line, line  # the checkpoint's own check


def test_a_model_and_a_calibration_file_under_hierui_home_are_used_as_they_stand(cli, tiny, tmp_path, monkeypatch):
    """What hierui wrote into $HIERUI_HOME itself needs no confirmation: a saved model folder, a calibration file."""
    home = tmp_path / "home"
    monkeypatch.setenv("HIERUI_HOME", str(home))
    saved = home / "saved" / "tiny"
    tiny.model.save_pretrained(saved)
    tiny.tokenizer.save_pretrained(saved)
    text = home / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 30)
    path = _record(tiny, tmp_path / "s.jsonl", spec="wanda:0.5", calib={"source": str(text), "samples": 2, "length": 8})
    path = _with_header(load_session(path).path, tmp_path, "home.jsonl", model=str(saved))
    run = cli("replay", path, "--rerun", "--device", "cpu")
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"rerunning with model {saved}, perturbation wanda:0.5, calibration {text.resolve()}" in run.stdout
    (tmp_path / "outside").mkdir()
    (home / "link").symlink_to(tmp_path / "outside")  # a link under $HIERUI_HOME that leads out of it is outside
    outside = _with_header(path, tmp_path, "link.jsonl", model=str(home / "link"))
    assert f"--model {home / 'link'}" in _one_line(cli("replay", outside, "--rerun", "--device", "cpu"))


def _kld_folder(tmp_path, model: str, spec: str = "magnitude:0.5"):
    folder = tmp_path / "kld"
    folder.mkdir(exist_ok=True)
    entry = {"spec": spec, "rank": 1, "context": "The cat sat on the", "kl": 2.5, "text": " mat"}
    worst = {"model": model, "corpus": "heldout", "ctx": 64, "worst": [entry]}
    (folder / "kld_worst.json").write_text(json.dumps(worst))
    return folder


@pytest.fixture()
def no_app(monkeypatch):
    """explore in a terminal, except that the app must not start."""
    import hierui.cli.launch

    monkeypatch.setattr(hierui.cli.launch, "interactive", lambda: True)
    monkeypatch.setattr("hierui.explorer.app.HieruiApp.run", lambda self: pytest.fail("the explorer started"))


@pytest.mark.parametrize(
    "model, spec, flag",
    [
        ("/tmp/evil-model", "magnitude:0.5", "--model /tmp/evil-model"),
        ("evil/model", "magnitude:0.5", "--model evil/model"),
        ("tiny-random", "checkpoint:/tmp/x", "--prune checkpoint:/tmp/x"),
    ],
)
def test_explore_from_kld_refuses_what_kld_worst_names_before_the_app_starts(cli, tmp_path, no_app, model, spec, flag):
    folder = _kld_folder(tmp_path, model, spec)
    line = _one_line(cli("explore", "--from-kld", folder))
    assert f"{folder / 'kld_worst.json'} names" in line and f"confirm it with {flag}" in line, line


def test_explore_from_kld_takes_a_known_model_or_the_users_confirmation(cli, tmp_path):
    """Without a terminal explore stops at that check, after every check of what the file names. --model only
    confirms the file's model: another one is refused (issue 25, class 7)."""
    terminal = "explore needs an interactive terminal"
    assert terminal in _one_line(cli("explore", "--from-kld", _kld_folder(tmp_path, "tiny-random")))
    evil = _kld_folder(tmp_path, "/tmp/evil-model")
    assert "model directory not found: /tmp/evil-model" in _one_line(
        cli("explore", "--from-kld", evil, "--model", "/tmp/evil-model")
    )
    other = _one_line(cli("explore", "--from-kld", evil, "--model", "tiny-random"))
    assert "--model tiny-random: " in other and "only confirms it here" in other, other
    spec = _kld_folder(tmp_path, "tiny-random", "checkpoint:/tmp/x")
    repeated = _one_line(cli("explore", "--from-kld", spec, "--prune", "checkpoint:/tmp/x"))
    assert "model directory not found: /tmp/x" in repeated, repeated  # the checkpoint's own check
