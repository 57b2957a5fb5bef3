"""Every file hierui writes goes through engine.record.paths (issue 25, classes 1 and 3, and three leftovers of 8):

- it never writes through a symbolic link planted at the file's own name (the link is replaced, or the lock refuses
  in one line), and a file outside the folder the link points at is byte-identical afterwards;
- a write that fails (a full disk: a write raising ENOSPC) is one line naming the file, exit 1, with no partial or
  temporary file left, and a rerun completes; an unwritable output is found up front, before any model loads, by
  creating a file there (this holds for root, whom permission bits do not stop);
- a failed start leaves no folder it created; every output honours the umask (no 0600 files from safetensors);
  a FIFO a user names as input is refused in one line instead of blocking.
"""

import errno
import hashlib
import json
import os
import signal
import stat
from contextlib import contextmanager
from pathlib import Path

import pytest

from engine.errors import HieruiError
from engine.record import paths
from engine.record.paths import (
    LinkRefused,
    WriteFailed,
    append_whole,
    atomic_dir,
    atomic_files,
    atomic_write,
    check_output_file,
    check_regular_file,
    check_writable,
    file_mode,
    open_for_writing,
)

OUTSIDE_TEXT = b"the user's own file, outside hierui's folders\n"


@pytest.fixture()
def outside(tmp_path) -> Path:
    """A file outside the folders hierui writes, which a planted link points at."""
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    path = folder / "precious.txt"
    path.write_bytes(OUTSIDE_TEXT)
    return path


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _plant(link: Path, target: Path) -> Path:
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target)
    return link


def _leftovers(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if paths.is_temporary(p))


@contextmanager
def _no_hang(seconds: int = 5):
    """Fail instead of blocking forever (a FIFO opened for writing without a reader blocks)."""

    def alarm(*_):
        raise AssertionError("blocked")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# --- class 1: never through a link --------------------------------------------------------------------------------


def test_whole_file_writes_replace_a_link_and_never_follow_it(tmp_path, outside):
    """atomic_write (tables, reports, caches, base files, check --json) renames over the name: a link planted there,
    dangling or not, is replaced; the file it points at is unchanged."""
    before = _digest(outside)
    table = _plant(tmp_path / "out" / "steps.parquet", outside)
    atomic_write(table, b"new table")
    dangling = _plant(tmp_path / "out" / "report.html", tmp_path / "elsewhere" / "created-by-a-link.html")
    atomic_write(dangling, "page")
    assert not table.is_symlink() and table.read_bytes() == b"new table"
    assert not dangling.is_symlink() and dangling.read_text() == "page"
    assert _digest(outside) == before and sorted(p.name for p in outside.parent.iterdir()) == ["precious.txt"]


@pytest.mark.parametrize("mode", ["w", "a", "wb"])
def test_streamed_writes_replace_a_link_and_never_follow_it(tmp_path, outside, mode):
    """open_for_writing (sessions, logs, streamed safetensors): O_NOFOLLOW; a link at the name is removed and the
    file created in its place. (It used to be open(path, "w"), which wrote into the link's target.)"""
    before = _digest(outside)
    name = _plant(tmp_path / "sessions" / "p000-none-shared.jsonl", outside)
    with open_for_writing(name, mode) as f:
        f.write(b"x" if "b" in mode else "x")
    assert not name.is_symlink() and name.read_text() == "x"
    assert _digest(outside) == before


def test_an_exclusive_create_never_follows_a_link(tmp_path, outside):
    """The explorer's O_EXCL sessions: a link at the name is a name taken (FileExistsError), never followed."""
    name = _plant(tmp_path / "s.jsonl", outside)
    with pytest.raises(FileExistsError):
        open_for_writing(name, "x")
    assert outside.read_bytes() == OUTSIDE_TEXT


def test_appending_to_a_log_replaces_a_link(tmp_path, outside):
    """append_whole (OUT/workers.jsonl) opens without following a link."""
    log = _plant(tmp_path / "workers.jsonl", outside)
    append_whole(log, "a\n")
    append_whole(log, "b\n")
    assert log.read_text() == "a\nb\n" and outside.read_bytes() == OUTSIDE_TEXT


def test_the_lock_refuses_a_link_at_its_name(tmp_path, outside):
    """OUT/.hierui.lock planted as a link: one line naming it, exit 2; the lock used to be opened with O_CREAT,
    following the link and overwriting the file it points at with the owner's JSON."""
    from engine.record.lock import LOCK_NAME, lock_folder

    link = _plant(tmp_path / "out" / LOCK_NAME, outside)
    with pytest.raises(LinkRefused) as refused:
        with lock_folder(tmp_path / "out"):
            pass
    assert refused.value.exit_code == 2 and str(link) in str(refused.value) and "symbolic link" in str(refused.value)
    assert outside.read_bytes() == OUTSIDE_TEXT and link.is_symlink()


def test_a_hard_link_at_the_name_is_never_written_through(tmp_path, outside):
    """A hard link planted at a session's or the lock's name shares the outside file's content: the session is
    written under a fresh name in its place, the lock refuses it in one line (exit 2)."""
    from engine.record.lock import LOCK_NAME, lock_folder

    session = tmp_path / "s.jsonl"
    os.link(outside, session)
    with open_for_writing(session, "w") as f:
        f.write("new")
    assert session.read_text() == "new" and outside.read_bytes() == OUTSIDE_TEXT
    os.link(outside, tmp_path / LOCK_NAME)
    with pytest.raises(LinkRefused, match="is a hard link"):
        with lock_folder(tmp_path):
            pass
    assert outside.read_bytes() == OUTSIDE_TEXT


def test_a_saved_checkpoint_replaces_links_and_keeps_a_linked_folder(tmp_path, outside):
    """atomic_files (prune --save DIR): each file is renamed into DIR, replacing a link at its name; DIR itself may
    be a link to a folder elsewhere (kept as the user made it)."""
    real = tmp_path / "disk" / "saved"
    real.mkdir(parents=True)
    linked = tmp_path / "saved-here"
    linked.symlink_to(real, target_is_directory=True)
    _plant(real / "model.safetensors", outside)
    with atomic_files(linked) as partial:
        (partial / "model.safetensors").write_bytes(b"weights")
        (partial / "config.json").write_text("{}")
    assert linked.is_symlink() and sorted(p.name for p in real.iterdir()) == ["config.json", "model.safetensors"]
    assert not (real / "model.safetensors").is_symlink() and (real / "model.safetensors").read_bytes() == b"weights"
    assert outside.read_bytes() == OUTSIDE_TEXT


def test_a_fifo_at_an_output_name_is_refused_without_blocking(tmp_path):
    """Something that is neither a file nor a link at the name (a FIFO would block the write; a device would be
    replaced by a rename): one line, exit 2, for whole and streamed writes and the lock alike."""
    from engine.record.lock import lock_file

    fifo = tmp_path / "c.json"
    os.mkfifo(fifo)
    os.mkfifo(tmp_path / ".c.json.hierui.lock")

    def lock():
        with lock_file(fifo):
            pass

    with _no_hang():
        for write in (
            lambda: atomic_write(fifo, "x"),
            lambda: open_for_writing(fifo, "w"),
            lock,
            lambda: check_output_file(fifo, f"--json {fifo}"),
        ):
            with pytest.raises(HieruiError) as refused:
                write()
            assert refused.value.exit_code == 2 and "not a regular file" in str(refused.value)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_a_batch_refuses_a_link_at_its_lock_before_loading(cli, tmp_path, outside, monkeypatch):
    """batch --out OUT with OUT/.hierui.lock a planted link: one line naming the link, exit 2, before the model
    loads; the file the link points at is unchanged (the lock used to overwrite it with its owner's JSON)."""
    import engine.run.open

    def no_load(*_a, **_k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(engine.run.open, "open_dense", no_load)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello there\n")
    lock = _plant(tmp_path / "out" / ".hierui.lock", outside)
    run = cli("batch", "-m", "tiny-random", "--prompts", prompts, "-p", "magnitude:0.5", "--out", tmp_path / "out")
    assert run.returncode == 2 and run.stderr.strip().splitlines()[-1].startswith(f"error: {lock} is a symbolic link")
    assert outside.read_bytes() == OUTSIDE_TEXT


@pytest.mark.slow
def test_cli_runs_never_write_through_planted_links(cli, tmp_path, outside):
    """A batch folder resumed with links planted at the session the rerun writes, at a table and at the report; kld
    tables and base file, and check --json's file, as links: the file outside is byte-identical afterwards, and
    each output is written in place of its link."""
    before = _digest(outside)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello there\nthe cat sat\n")
    out = tmp_path / "out"
    args = ["batch", "-m", "tiny-random", "--prompts", prompts, "-p", "magnitude:0.5", "--max-new-tokens", "2"]
    args += ["--no-lens", "--out", out]
    assert cli(*args).returncode == 0
    session = out / "sessions" / "p001-magnitude-0.5-shared.jsonl"
    session.unlink()
    _plant(session, outside)
    (out / "steps.parquet").unlink()
    _plant(out / "steps.parquet", outside)
    _plant(out / "report.html", outside)
    run = cli(*args)
    assert run.returncode == 0, run.stderr
    assert "1 computed, 1 already complete" in run.stdout
    assert cli("report", out).returncode == 0
    written = [session, out / "steps.parquet", out / "report.html"]

    text = tmp_path / "corpus.txt"
    text.write_text(" ".join(["the cat sat on the mat and looked at the dog."] * 30))
    kld = ["kld", "-m", "tiny-random", "-p", "none", "--ctx", "64", "--text", text, "--out", tmp_path / "kld"]
    assert cli(*kld).returncode == 0
    for name in ("kld_summary.parquet", "kld_pairs.csv", "kld_worst.json"):
        (tmp_path / "kld" / name).unlink()
        written.append(_plant(tmp_path / "kld" / name, outside))
    base = _plant(tmp_path / "base.safetensors", outside)
    run = cli(*kld, "-p", "magnitude:0.5", "--save-base", base)
    assert run.returncode == 0, run.stderr
    json_out = _plant(tmp_path / "check.json", outside)
    run = cli("check", "-m", "tiny-random", "-p", "magnitude:0.5", "--steps", "1", "--json", json_out)
    assert run.returncode in (0, 1) and "Traceback" not in run.stderr, run.stderr
    assert json.loads(json_out.read_text())
    for path in (*written, base, json_out):
        assert path.is_file() and not path.is_symlink(), path
    assert _digest(outside) == before


# --- class 3: writes that fail ------------------------------------------------------------------------------------


def _enospc(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize(
    "writer",
    [
        _enospc,  # a plain write (pyarrow raises OSError(28, ...) too)
        lambda path: (_ for _ in ()).throw(
            Exception("Error while serializing: I/O error (os error 28)")
        ),  # safetensors
        lambda path: _chained(),  # torch.save to a file object: RuntimeError from an OSError
    ],
    ids=["oserror", "safetensors", "chained"],
)
def test_a_whole_file_write_on_a_full_disk_is_one_line_and_leaves_the_old_file(tmp_path, writer):
    """atomic_write on a full disk: WriteFailed naming the target and the cause (exit 1), the old file kept, no
    temporary file left. (It used to end in the library's traceback, after the work was done.)"""
    target = atomic_write(tmp_path / "kld_summary.parquet", b"old")
    with pytest.raises(WriteFailed) as failed:
        atomic_write(target, writer)
    assert str(failed.value) == f"cannot write {target}: No space left on device" and failed.value.exit_code == 1
    assert target.read_bytes() == b"old" and _leftovers(tmp_path) == []
    with pytest.raises(WriteFailed):
        with atomic_dir(tmp_path / "converted") as partial:
            writer(partial / "model.safetensors")
    with pytest.raises(WriteFailed):
        with atomic_files(tmp_path / "saved" / "model") as partial:
            writer(partial / "model.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kld_summary.parquet"]  # no folder made, none left


def _raise(error: Exception):
    raise error


def _chained():
    try:
        raise OSError(errno.ENOSPC, "No space left on device")
    except OSError:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598") from None


def test_a_bug_inside_a_write_is_not_disguised(tmp_path):
    """Only failures to write become WriteFailed: a programming error keeps its traceback."""

    def buggy(path):
        raise TypeError("not a write failure")

    with pytest.raises(TypeError):
        atomic_write(tmp_path / "x", buggy)
    assert list(tmp_path.iterdir()) == []


class _FullDisk:
    """A session file whose disk fills after `room` bytes: the write that does not fit raises ENOSPC, as the
    kernel does (after writing what fits)."""

    def __init__(self, file, room: int):
        self.file, self.room = file, room

    def write(self, text: str):
        if len(text) > self.room:
            self.file.write(text[: self.room])
            self.file.flush()
            self.room = 0
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(text)
        return self.file.write(text)

    def __getattr__(self, name):
        return getattr(self.file, name)


def test_a_session_on_a_full_disk_is_one_line_and_stays_a_readable_incomplete_session(tmp_path):
    """SessionWriter: ENOSPC in the middle of a step is WriteFailed naming the file (exit 1); the file is cut back to
    its last whole line, a valid incomplete session (what a rerun records again), with no half line."""
    from engine.record.session import SessionWriter, load_session

    path = tmp_path / "sessions" / "p000.jsonl"
    writer = SessionWriter(path, {"model": "tiny-random", "prompt": "hi", "prompt_ids": [1, 2]})
    header = path.read_bytes()
    writer._file = _FullDisk(writer._file, room=5)
    with pytest.raises(WriteFailed) as failed:
        writer.write_step({"step": 0, "token": 1})
    assert str(failed.value) == f"cannot write {path}: No space left on device" and failed.value.exit_code == 1
    assert path.read_bytes() == header and writer.closed
    assert load_session(path).complete is False


def test_a_batch_that_fills_the_disk_says_so_in_one_line_and_a_rerun_completes(cli, tmp_path, monkeypatch):
    """batch --out on a disk that fills while a session is written: one line naming the session file, exit 1, no
    traceback; the rerun into the same folder (space freed) completes every run."""
    from engine.record import session as session_module

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello there\nthe cat sat\n")
    out = tmp_path / "out"
    args = ["batch", "-m", "tiny-random", "--prompts", prompts, "-p", "none", "--max-new-tokens", "3", "--no-lens"]
    args += ["--out", out]
    real = session_module.SessionWriter.write_step
    calls = {"n": 0}

    def fills(self, record):
        calls["n"] += 1
        if calls["n"] == 3:
            self._file = _FullDisk(self._file, room=10)
        real(self, record)

    monkeypatch.setattr(session_module.SessionWriter, "write_step", fills)
    run = cli(*args)
    assert run.returncode == 1 and "Traceback" not in run.stderr + run.stdout
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: cannot write {out / 'sessions'}") and last.endswith("No space left on device")
    assert _leftovers(out) == [] and not (out / "steps.parquet").exists()
    monkeypatch.setattr(session_module.SessionWriter, "write_step", real)
    run = cli(*args)
    assert run.returncode == 0, run.stderr
    assert "2 runs" in run.stdout and (out / "steps.parquet").is_file()


def test_a_cache_that_cannot_be_written_is_skipped_with_one_warning(fresh_home, capsys):
    """A cache entry is a shortcut: a full disk (or a read-only $HIERUI_HOME) while storing one is one warning line
    and the run goes on; no entry, metadata or temporary file is left. (It was a traceback after the pruning.)"""
    from engine.perturb.cache import slot

    entry = slot("calib", "calibration", {"model_key": "m"})
    assert entry.store(_enospc) is None
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"warning: cannot write {entry.path}: No space left on device; going on without caching it"]
    assert [p for p in Path(fresh_home).rglob("*") if p.is_file()] == []


def test_the_probe_creates_a_file_for_real_and_leaves_nothing(tmp_path, monkeypatch):
    """check_writable does not ask os.access (which says yes to root whatever the permission bits say): it creates
    a file, and removes it and every folder it had to make; a path where nothing can be made is one line, exit 2."""
    monkeypatch.setattr(os, "access", lambda *_a, **_k: True)  # as for root
    check_writable(tmp_path / "new" / "deeper", "--out x")
    assert list(tmp_path.iterdir()) == []
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    for folder, why in (
        (blocker / "out", "Not a directory"),
        (Path("/proc/self/hierui-out"), "No such file or directory"),
    ):
        with pytest.raises(HieruiError) as refused:
            check_writable(folder, f"--out {folder}")
        assert refused.value.exit_code == 2 and why in str(refused.value)
    made = []
    real_open = os.open

    def read_only(path, flags, *args):
        if "hierui-probe" in str(path):
            made.append(path)
            raise OSError(errno.EROFS, "Read-only file system")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(HieruiError) as refused:
        check_writable(tmp_path / "ro" / "out", "--out ro/out")
    assert (
        str(refused.value) == f"--out ro/out: cannot create a file in {tmp_path / 'ro' / 'out'} (Read-only file system)"
    )
    assert made and sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


OUTPUTS = [  # (arguments, the folder the output goes into)
    (["batch", "-m", "tiny-random", "--prompts", "{prompts}", "--out", "{dest}/out"], "{dest}"),
    (["kld", "-m", "tiny-random", "-p", "magnitude:0.5", "--out", "{dest}/out"], "{dest}"),
    (["kld", "-m", "tiny-random", "--save-base", "{dest}/base.safetensors"], "{dest}"),
    (["report", "{run}", "--out", "{dest}/report.html"], "{dest}"),
    (["check", "-m", "tiny-random", "--json", "{dest}/check.json"], "{dest}"),
    (["attribute", "{session}", "--out", "{dest}/att.parquet"], "{dest}"),
    (["replay", "{session}", "--rerun", "--save", "{dest}/again.jsonl"], "{dest}"),
    (["prune", "-m", "tiny-random", "-p", "magnitude:0.5", "--save", "{dest}/saved"], "{dest}"),
    (["explore", "-m", "tiny-random", "--sessions", "{dest}/sessions"], "{dest}"),
    (["noise", "-m", "tiny-random"], "{home}"),
]


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """A tiny batch output: a run folder and one session to point commands at."""
    from engine.sweep.runner import run_sweep
    from engine.sweep.sweeps import plan_sweep

    folder = tmp_path_factory.mktemp("recorded")
    prompts = folder / "prompts.txt"
    prompts.write_text("hello there\n")
    sweep = plan_sweep(prompts_file=prompts, model="tiny-random", specs=["magnitude:0.5"], max_new_tokens=2, lens=False)
    run_sweep(sweep, folder / "run")
    return folder


@pytest.mark.parametrize("args, folder", OUTPUTS, ids=[f"{a[0]} {a[-2]}" for a, _ in OUTPUTS])
def test_every_output_is_probed_before_anything_loads(cli, recorded, tmp_path, monkeypatch, args, folder):
    """Each output option creates a file in its folder up front (engine.record.paths.check_writable), before any
    model or tokenizer is loaded: an unwritable folder (faked here: the probe fails as on a read-only file system)
    is one line and exit 2. (kld --out, --save-base, batch --out... used to fail after minutes of work.)"""
    import engine.models.loading
    import engine.run.open

    def no_load(*_a, **_k):
        raise AssertionError("loaded before the output was checked")

    for module, name in ((engine.models.loading, "load"), (engine.run.open, "open_dense")):
        monkeypatch.setattr(module, name, no_load)
    home = tmp_path / "home"
    monkeypatch.setenv("HIERUI_HOME", str(home))
    session = next((recorded / "run" / "sessions").glob("*.jsonl"))
    fill = dict(prompts=recorded / "prompts.txt", dest=tmp_path / "dest", run=recorded / "run", session=session)
    fill["home"] = home
    unwritable = Path(folder.format(**fill))
    (tmp_path / "dest").mkdir()
    probed = []
    real = paths.check_writable

    def refuse(where, what):
        probed.append(Path(where))
        if unwritable == Path(where) or unwritable in Path(where).parents:
            raise HieruiError(f"{what}: cannot create a file in {where} (Read-only file system)")
        return real(where, what)

    monkeypatch.setattr(paths, "check_writable", refuse)
    run = cli(*[a.format(**fill) for a in args])
    assert run.returncode == 2, (run.stdout, run.stderr)
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].endswith("(Read-only file system)"), run.stderr
    assert probed


def test_an_output_under_proc_is_one_line_before_loading(cli, tmp_path):
    """A path that cannot be created (under /proc, where even root cannot write) is one line, exit 2."""
    run = cli("check", "-m", "tiny-random", "--json", "/proc/self/hierui-check.json")
    assert run.returncode == 2 and run.stderr.strip().splitlines() == [
        "error: --json /proc/self/hierui-check.json: cannot create a file in /proc/self (No such file or directory)"
    ]
    run = cli("kld", "-m", "tiny-random", "-p", "magnitude:0.5", "--out", "/proc/self/hierui-kld")
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1
    assert "cannot create the folder" in run.stderr


# --- class 8: leftovers -------------------------------------------------------------------------------------------


def test_a_failed_start_leaves_no_folder_it_made(cli, tmp_path, monkeypatch):
    """batch --out NEW/a, kld --out NEW/a, prune --save NEW/a that fail at their start (a bad calibration file, a
    model that fails to load) leave no NEW behind."""
    import engine.run.open

    short = tmp_path / "short.txt"
    short.write_text("ab")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello\n")
    run = cli("batch", "-m", "tiny-random", "--prompts", prompts, "-p", "wanda:0.5", "--calib", short, "--out",
              tmp_path / "new1" / "a")  # fmt: skip
    assert run.returncode == 2 and not (tmp_path / "new1").exists()

    def fails(*_a, **_k):
        raise HieruiError("the model failed to load", 1)

    monkeypatch.setattr(engine.run.open, "open_dense", fails)
    run = cli("kld", "-m", "tiny-random", "-p", "magnitude:0.5", "--out", tmp_path / "new2" / "a")
    assert run.returncode == 1 and "failed to load" in run.stderr
    run = cli("prune", "-m", "tiny-random", "-p", "magnitude:0.5", "--save", tmp_path / "new3" / "a")
    assert run.returncode == 1 and "failed to load" in run.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompts.txt", "short.txt"]


def test_outputs_honour_the_umask(tmp_path):
    """safetensors creates its files 0600; every output hierui writes gets open()'s mode under the umask instead
    (0644 under 022, 0600 under 077), whole files, folders and saved checkpoints alike."""
    import torch
    from safetensors.torch import save_file

    def tensors(path):
        save_file({"w": torch.zeros(2)}, str(path))

    old = os.umask(0o022)
    try:
        assert file_mode() == 0o644
        written = [atomic_write(tmp_path / "base.safetensors", tensors)]
        with atomic_dir(tmp_path / "converted") as partial:
            tensors(partial / "model.safetensors")
        with atomic_files(tmp_path / "saved") as partial:
            tensors(partial / "model.safetensors")
        written += [tmp_path / "converted" / "model.safetensors", tmp_path / "saved" / "model.safetensors"]
        assert [stat.S_IMODE(p.stat().st_mode) for p in written] == [0o644] * 3
        os.umask(0o077)
        assert stat.S_IMODE(atomic_write(tmp_path / "private", tensors).stat().st_mode) == 0o600
    finally:
        os.umask(old)


@pytest.mark.slow
def test_a_saved_base_file_and_checkpoint_are_0644(cli, tmp_path):
    """kld --save-base and prune --save wrote model files 0600 beside 0644 tables."""
    text = tmp_path / "corpus.txt"
    text.write_text(" ".join(["the cat sat on the mat and looked at the dog."] * 30))
    old = os.umask(0o022)
    try:
        run = cli("kld", "-m", "tiny-random", "-p", "none", "--ctx", "64", "--text", text, "--out", tmp_path / "k",
                  "--save-base", tmp_path / "base.safetensors")  # fmt: skip
        assert run.returncode == 0, run.stderr
        run = cli("prune", "-m", "tiny-random", "-p", "magnitude:0.5", "--tokens", "1", "--save", tmp_path / "saved")
        assert run.returncode == 0, run.stderr
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.rglob("*") if p.is_file()}
    assert set(modes.values()) == {0o644} and "model.safetensors" in modes, modes


def test_a_fifo_named_as_input_is_refused_in_one_line(cli, tmp_path):
    """show/replay/attribute of a FIFO, kld --base FIFO and batch --recipe FIFO: one line, exit 2, never a read that
    blocks (show on a FIFO used to hang)."""
    fifo = tmp_path / "session.jsonl"
    os.mkfifo(fifo)
    with _no_hang(20):
        for args in (
            ["show", fifo],
            ["replay", fifo, "--print"],
            ["attribute", fifo],
            ["kld", "-m", "tiny-random", "--base", fifo],
            ["batch", "--recipe", fifo],
        ):
            run = cli(*args)
            assert run.returncode == 2, (args, run.stderr)
            lines = run.stderr.strip().splitlines()
            assert len(lines) == 1 and "not a regular file" in lines[0], (args, run.stderr)
    with pytest.raises(HieruiError, match="not a regular file"):
        check_regular_file(fifo, "--calib")
    with pytest.raises(HieruiError, match="is a folder, not a file"):
        check_regular_file(tmp_path, "--calib")


def test_a_session_whose_header_cannot_be_written_leaves_no_empty_file(tmp_path, monkeypatch):
    """A disk already full when a session starts: WriteFailed, and no 0-byte file under the session's name (the
    audit found one after a batch on a full tmpfs; the rerun resumed, but an empty session is a lie)."""
    from engine.record import session as session_module
    from engine.record.session import SessionWriter

    real = session_module.open_for_writing
    monkeypatch.setattr(session_module, "open_for_writing", lambda *a, **k: _FullDisk(real(*a, **k), room=0))
    path = tmp_path / "sessions" / "p000.jsonl"
    with pytest.raises(WriteFailed):
        SessionWriter(path, {"model": "tiny-random", "prompt": "hi", "prompt_ids": [1, 2]})
    assert not path.exists()


def test_hierui_home_that_is_a_file_is_one_line_before_any_command(cli, tmp_path):
    """$HIERUI_HOME pointing at a file ended in two chained tracebacks after the model loaded (the calibration cache's
    cleanup raised NotADirectoryError); now one line before anything starts, and a cache store under a non-folder never
    raises (engine.record.paths.hierui_home, engine.perturb.cache.Slot.store)."""
    home = tmp_path / "home-file"
    home.write_text("not a folder")
    run = cli("prune", "-m", "tiny-random", "-p", "wanda:0.5", env={"HIERUI_HOME": home})
    assert run.returncode == 2 and run.stderr.strip().splitlines() == [
        f"error: HIERUI_HOME {home} is not a folder: point HIERUI_HOME at a folder"
    ]
    assert home.read_text() == "not a folder"


def test_a_link_loop_or_a_dangling_link_named_as_a_session_says_so(cli, tmp_path):
    """`show LOOP` said "session not found" where --prompts said "Too many levels of symbolic links": one wording,
    from check_regular_file, for every file a user names."""
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    (tmp_path / "dangling").symlink_to(tmp_path / "nothing")
    loop = cli("show", tmp_path / "a")
    assert loop.returncode == 2 and "Too many levels of symbolic links" in loop.stderr, loop.stderr
    dangling = cli("show", tmp_path / "dangling")
    assert dangling.returncode == 2 and "not found (a link to nothing)" in dangling.stderr, dangling.stderr
