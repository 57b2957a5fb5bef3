"""Issue 25, class 4: every text file a user names (prompts, calibration, corpus) is read by one validator
(engine.record.texts.read_text_file), before anything slow: missing, a folder, not a regular file (a FIFO),
unreadable, binary, not UTF-8, empty, and (calibration) shorter than one sequence are each one line and exit 2,
before a model loads; a failed start leaves no file behind that changes how the next run behaves."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from engine.errors import HieruiError

TEXT = " ".join(f"Sentence number {i} tells of a {w} that walked to the river." for i, w in enumerate("abcdefgh"))


def _make(folder: Path, defect: str) -> Path:
    """A file (or what stands at its name) with `defect`."""
    path = folder / f"{defect}.txt"
    if defect == "folder":
        path.mkdir()
    elif defect == "fifo":
        os.mkfifo(path)
    elif defect != "missing":
        data = {
            "binary": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR",
            "latin1": "café au lait, crème brûlée\n".encode("latin-1"),
            "empty": b" \n\t\n",
            "unreadable": TEXT.encode(),
            "short": b"two words",
        }[defect]
        path.write_bytes(data)
    return path


DEFECTS = {  # defect → what the one line says
    "missing": ": not found",
    "folder": ": is a folder, not a file",
    "fifo": ": not a regular file",
    "unreadable": ": cannot be read (Permission denied)",
    "binary": ": a binary file, not text",
    "latin1": ": not UTF-8 text",
    "empty": ": the file is empty",
}


@pytest.fixture()
def unreadable(monkeypatch):
    """Reading a file named unreadable.txt fails as a file without read permission does (tests run as root, whom
    permission bits do not stop)."""
    real = Path.read_bytes

    def read_bytes(self):
        if self.name == "unreadable.txt":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)


def _read_prompts(path):
    from engine.record.prompts import read_prompts

    return read_prompts(path)


def _read_calibration(path):
    from engine.perturb.calibration import check_calibration_file

    return check_calibration_file(path, 16, "tiny-random")


def _read_corpus(path):
    from engine.kld.corpus import read_text

    return read_text(path)


READERS = {"--prompts": _read_prompts, "--calib": _read_calibration, "--text": _read_corpus}


@pytest.mark.parametrize("defect", sorted(DEFECTS))
@pytest.mark.parametrize("option", sorted(READERS))
def test_every_kind_of_text_file_refuses_every_defect_in_one_line(option, defect, tmp_path, unreadable):
    """Guards class 4: a folder was "not found", a binary or Latin-1 calibration file was accepted (decoded with
    errors="replace") while --text and --prompts refused it, a FIFO blocked. Now one reader, one line each."""
    path = _make(tmp_path, defect)
    with pytest.raises(HieruiError) as info:
        READERS[option](path)
    message = str(info.value)
    assert message.startswith(f"{option} {path}") and DEFECTS[defect] in message and "\n" not in message, message
    assert info.value.exit_code == 2


def test_a_calibration_file_shorter_than_one_sequence_is_refused_before_loading(tmp_path):
    from engine.perturb.calibration import check_calibration_file

    short = _make(tmp_path, "short")
    with pytest.raises(HieruiError, match=r"9 tokens, fewer than one calibration sequence of --calib-len 16"):
        check_calibration_file(short, 16, "tiny-random")
    assert check_calibration_file(short, 8, "tiny-random") == str(short.resolve())
    assert check_calibration_file(short, 16) == str(short.resolve())  # no model: its tokens are not counted


def test_a_recipe_names_its_files_through_the_same_reader(tmp_path):
    from engine.sweep import recipe as RC

    (tmp_path / "open.txt").mkdir()  # a folder where the recipe names a prompts file
    (tmp_path / "r.toml").write_text('prompts = ["open.txt"]\nspecs = ["none"]\n')
    with pytest.raises(HieruiError, match="prompts file .*open.txt: is a folder, not a file"):
        RC.load_recipe(tmp_path / "r.toml")
    (tmp_path / "ok.txt").write_text("hello\n")
    (tmp_path / "calib.bin").write_bytes(b"\x00\x01\x02")
    (tmp_path / "r.toml").write_text('prompts = ["ok.txt"]\nspecs = ["none"]\n[calibration]\nsource = "calib.bin"\n')
    with pytest.raises(HieruiError, match=r"calibration.source .*calib.bin: a binary file, not text"):
        RC.load_recipe(tmp_path / "r.toml")


# ------------------------------------------------------------------ the commands: one line, before any model loads


@pytest.fixture()
def no_loading(monkeypatch):
    """The model loader fails the test if any command calls it."""
    from engine.models import loading

    def load(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(loading, "load", load)


def _files(tmp_path: Path) -> dict[str, Path]:
    good = tmp_path / "good.txt"
    good.write_text(TEXT)
    return {"good": good, **{d: _make(tmp_path, d) for d in ("binary", "folder", "short", "fifo")}}


COMMANDS = {  # (kind of file, the command naming it as FILE)
    "batch --prompts": ["batch", "-m", "tiny-random", "-p", "none", "--prompts", "FILE", "--out", "OUT"],
    "batch --calib": ["batch", "-m", "tiny-random", "-p", "wanda:0.5", "--prompts", "GOOD", "--calib", "FILE"]
    + ["--calib-len", "16", "--out", "OUT"],
    "prune --calib": ["prune", "-m", "tiny-random", "-p", "wanda:0.5", "--calib", "FILE", "--calib-len", "16"],
    "explore --calib": ["explore", "-m", "tiny-random", "-p", "wanda:0.5", "--calib", "FILE", "--calib-len", "16"],
    "kld --calib": ["kld", "-m", "tiny-random", "-p", "wanda:0.5", "--text", "GOOD", "--ctx", "32", "--calib", "FILE"]
    + ["--calib-len", "16", "--out", "OUT"],
    "kld --text": ["kld", "-m", "tiny-random", "-p", "none", "--text", "FILE", "--ctx", "32", "--out", "OUT"],
}
EXPECTED = {"binary": "a binary file", "folder": "is a folder", "short": "fewer than one calibration sequence"}
EXPECTED["fifo"] = "not a regular file"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_refuses_a_bad_text_file_before_loading(cli, tmp_path, no_loading, command):
    """Guards class 4: `--calib FILE` was checked only after the model loaded. Now each command refuses a bad file
    in one line, exit 2, with the loader never called and no output folder made."""
    files = _files(tmp_path)
    defects = ["binary", "folder", "fifo"] + (["short"] if "--calib" in command else [])
    for defect in defects:
        values = {"FILE": files[defect], "GOOD": files["good"], "OUT": tmp_path / "out"}
        run = cli(*[values.get(a, a) for a in COMMANDS[command]])
        lines = [ln for ln in run.stderr.splitlines() if ln.strip()]
        assert run.returncode == 2 and len(lines) == 1, (defect, run.stdout + run.stderr)
        assert EXPECTED[defect] in " ".join(run.stderr.split()), (defect, run.stderr)
        assert not (tmp_path / "out").exists(), defect


def test_replay_rerun_and_attribute_check_the_calib_file_they_confirm(cli, tmp_path, no_loading):
    """The commands that confirm a session's calibration file read it through the same reader."""
    files = _files(tmp_path)
    session = Path(__file__).parent / "data"
    sessions = sorted(session.glob("*.jsonl")) if session.is_dir() else []
    target = sessions[0] if sessions else tmp_path / "none.jsonl"
    for args in (["replay", target, "--rerun"], ["attribute", target]):
        run = cli(*args, "--calib", files["binary"])
        assert run.returncode == 2 and "a binary file, not text" in run.stderr, (args, run.stderr)


# ------------------------------------------------------------------ a failed start leaves nothing that blocks the rerun


def test_a_calibration_that_fails_after_loading_leaves_no_batch_json(tmp_path):
    """Guards class 4: a calibration file too short for the model's tokens failed after batch.json was written, and
    that batch.json refused the corrected rerun into the same folder. The runner now builds every calibration
    before it writes batch.json (here the file is shortened between the plan and the run, the one way past the
    check before loading, as with a hub model whose tokenizer is not local)."""
    from engine.sweep.runner import run_sweep
    from engine.sweep.sweeps import plan_sweep

    prompts, calib = tmp_path / "p.txt", tmp_path / "calib.txt"
    prompts.write_text("Hello there\n")
    calib.write_text(TEXT)
    given = {"samples": 2, "length": 16, "source": str(calib)}
    sweep = plan_sweep(prompts_file=prompts, model="tiny-random", specs=["wanda:0.5"], max_new_tokens=2, calib=given)
    calib.write_text("two words")
    out = tmp_path / "out"
    with pytest.raises(HieruiError, match="fewer than one calibration sequence"):
        run_sweep(sweep, out)
    assert not (out / "batch.json").exists()
    calib.write_text(TEXT)
    sweep = plan_sweep(prompts_file=prompts, model="tiny-random", specs=["wanda:0.5"], max_new_tokens=2, calib=given)
    result = run_sweep(sweep, out)
    assert result.computed and (out / "batch.json").is_file()


def test_a_short_calibration_file_then_the_corrected_rerun_into_the_same_folder(cli, tmp_path):
    """The user's case: `batch --calib` with a 2-token file, then the same command with a longer file, same --out."""
    prompts, short, good = tmp_path / "p.txt", tmp_path / "short.txt", tmp_path / "good.txt"
    prompts.write_text("Hello there\n")
    short.write_text("hi")
    good.write_text(TEXT)
    args = ["batch", "-m", "tiny-random", "-p", "wanda:0.5", "--prompts", prompts, "--max-new-tokens", "2"]
    args += ["--calib-samples", "2", "--calib-len", "16", "--out", tmp_path / "out"]
    first = cli(*args, "--calib", short)
    assert first.returncode == 2 and "fewer than one calibration sequence" in first.stderr, first.stderr
    assert not (tmp_path / "out" / "batch.json").exists()
    second = cli(*args, "--calib", good)
    assert second.returncode == 0, second.stderr
    assert (tmp_path / "out" / "batch.json").is_file()


def test_a_byte_order_mark_is_not_part_of_the_text(tmp_path):
    """A UTF-8 file saved with a byte-order mark (Windows editors) kept U+FEFF at the start of the first prompt."""
    from engine.record.texts import read_text_file

    path = tmp_path / "bom.txt"
    path.write_bytes("\ufeffHello world\n".encode())
    assert read_text_file(path, "--prompts") == "Hello world\n"
