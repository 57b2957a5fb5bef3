"""engine.record.lock: one writer per output folder or file; stale locks; release on error and Ctrl-C; explore's
session files created exclusively; `report --out` locked while it is written."""

import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from engine.errors import HieruiError
from engine.record.lock import LOCK_NAME, LockBusy, held_locks, lock_file, lock_folder, lock_path_for_file

HOLD = """
import sys
from pathlib import Path
from engine.record.lock import lock_file, lock_folder
hold = lock_folder if sys.argv[1] == "folder" else lock_file
with hold(Path(sys.argv[2])):
    print("held", flush=True)
    sys.stdin.read()
"""


class Holder:
    """Another process that holds the lock of `path` until stop() (or kill())."""

    def __init__(self, kind, path):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", HOLD, kind, str(path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        line = self.proc.stdout.readline()
        assert line.strip() == "held", self.proc.stderr.read()

    @property
    def pid(self):
        return self.proc.pid

    def stop(self):
        self.proc.stdin.close()
        assert self.proc.wait(timeout=30) == 0, self.proc.stderr.read()

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)


def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_held_folder_is_refused_naming_its_owner(tmp_path):
    out = tmp_path / "out"
    holder = Holder("folder", out)
    try:
        owner = json.loads((out / LOCK_NAME).read_text(encoding="utf-8"))
        assert owner["pid"] == holder.pid and owner["host"] == socket.gethostname()
        with pytest.raises(LockBusy) as caught:
            with lock_folder(out):
                pass
        assert caught.value.exit_code == 2
        assert str(caught.value) == (
            f"{out} is in use by hierui pid {holder.pid} on {socket.gethostname()} since {owner['started']}"
        )
    finally:
        holder.stop()
    assert not (out / LOCK_NAME).exists()  # removed on release
    with lock_folder(out):  # and free again
        assert json.loads((out / LOCK_NAME).read_text(encoding="utf-8"))["pid"] == os.getpid()


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    pid = dead_pid()
    (out / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": "x"}))
    said = []
    with lock_folder(out, warn=said.append):
        assert json.loads((out / LOCK_NAME).read_text(encoding="utf-8"))["pid"] == os.getpid()
    assert said == [f"taking over a stale lock of pid {pid} (not running)"]
    assert not (out / LOCK_NAME).exists()


def test_a_killed_owner_never_holds_the_folder(tmp_path):
    """SIGKILL leaves the lock file, but not the lock: the next run takes it over and says so."""
    out = tmp_path / "out"
    holder = Holder("folder", out)
    holder.kill()
    assert (out / LOCK_NAME).exists()
    said = []
    with lock_folder(out, warn=said.append):
        pass
    assert said == [f"taking over a stale lock of pid {holder.pid} (not running)"]


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_the_lock_is_released_on_error_and_ctrl_c(tmp_path, exc):
    out = tmp_path / "out"
    (out / "keep").mkdir(parents=True)
    with pytest.raises(exc):
        with lock_folder(out):
            assert held_locks() == [out.absolute() / LOCK_NAME]
            raise exc()
    assert held_locks() == [] and not (out / LOCK_NAME).exists() and (out / "keep").is_dir()
    holder = Holder("folder", out)  # another process can take it now
    holder.stop()


def test_re_entrant_in_one_process_and_a_made_folder_is_removed_when_left_empty(tmp_path):
    out = tmp_path / "a" / "b"
    with lock_folder(out):
        with lock_folder(out):  # the CLI holds it, run_sweep takes it again
            pass
        assert (out / LOCK_NAME).exists()
    assert not (tmp_path / "a").exists()  # made for the lock, left empty: removed
    with pytest.raises(HieruiError, match="is a file, not a folder"):
        (tmp_path / "f").write_text("x")
        with lock_folder(tmp_path / "f"):
            pass


def test_explore_session_files_are_created_exclusively(tiny, tmp_path):
    from engine.record.session import SessionWriter, load_session
    from engine.record.settings import StepSettings
    from hierui.explorer.live import LiveRun

    path = tmp_path / "s.jsonl"
    SessionWriter(path, {"model": "m"}, exclusive=True).close()
    with pytest.raises(FileExistsError):
        SessionWriter(path, {"model": "m"}, exclusive=True)

    from engine.perturb import perturb

    pair = perturb(tiny, "none", use_cache=False)
    settings = StepSettings(max_new_tokens=3).validate()
    a = LiveRun(pair, "Hello", settings, tmp_path / "sessions")
    b = LiveRun(pair, "Hello", settings, tmp_path / "sessions")
    b.path = b.recorder.paths[0] = a.path  # two explorers that picked the same name
    a.step()
    b.step()
    b.step()
    a.close()
    b.close()
    assert a.path != b.path and a.path.is_file() and b.path.is_file()
    assert len(load_session(a.path).steps) == 1 and len(load_session(b.path).steps) == 2


def test_report_out_is_locked_while_it_is_written(cli, tmp_path):
    from engine.sweep.runner import run_sweep
    from engine.sweep.sweeps import plan_sweep

    prompts = tmp_path / "p.txt"
    prompts.write_text("Hello\n", encoding="utf-8")
    run_dir = tmp_path / "run"
    run_sweep(plan_sweep(prompts_file=prompts, model="tiny-random", specs=["none"], max_new_tokens=2), run_dir)
    target = tmp_path / "page.html"
    holder = Holder("file", target)
    try:
        assert lock_path_for_file(target).exists()
        busy = cli("report", str(run_dir), "--out", str(target))
        assert busy.returncode == 2, busy.stderr
        assert f"{target} is in use by hierui pid {holder.pid} on {socket.gethostname()}" in busy.stderr
        assert not target.exists()
    finally:
        holder.stop()
    done = cli("report", str(run_dir), "--out", str(target))
    assert done.returncode == 0, done.stderr
    assert target.is_file() and not lock_path_for_file(target).exists()
    with lock_file(target):  # the lock beside the file, not the file
        assert target.is_file()
