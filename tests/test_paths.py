"""engine.record.paths: the cache layout, and writes that are whole or nothing, also with two writers at once."""

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from engine.record.paths import atomic_dir, atomic_path, atomic_write, calib_dir, hierui_home, models_dir, pruned_dir

SIZE = 200_000  # big enough that a write is not one system call
ROOT = Path(__file__).resolve().parents[1]

WRITER = """
import sys
from engine.record.paths import atomic_write
target, name, times, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
for i in range(times):
    atomic_write(target, f"{name}:{i}:" + name * size + "\\nEND")
"""


def _check_whole(text: str, size: int = SIZE) -> None:
    head, _, rest = text.partition(":")
    _, _, body = rest.partition(":")
    assert head in ("A", "B") and body.endswith("\nEND"), text[:40]
    assert body[:-4] == head * size


def _temporaries(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


def test_layout(monkeypatch, tmp_path):
    monkeypatch.setenv("HIERUI_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("HIERUI_MODELS", raising=False)
    assert hierui_home() == tmp_path / "home"
    assert models_dir() == tmp_path / "home" / "models"
    assert calib_dir() == tmp_path / "home" / "calib" and pruned_dir() == tmp_path / "home" / "pruned"
    monkeypatch.setenv("HIERUI_MODELS", str(tmp_path / "shared-models"))
    assert models_dir() == tmp_path / "shared-models" and calib_dir() == tmp_path / "home" / "calib"
    monkeypatch.delenv("HIERUI_HOME")
    assert hierui_home() == Path.home() / ".cache" / "hierui"


def test_two_processes_writing_the_same_file_never_show_half_of_one(tmp_path):
    target = tmp_path / "table.txt"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    writers = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(target), name, "150", str(SIZE)], env=env)
        for name in ("A", "B")
    ]
    reads, seen = 0, set()
    while any(w.poll() is None for w in writers):
        if target.exists():
            text = target.read_text()
            _check_whole(text)
            seen.add(text[0])
            reads += 1
    assert [w.wait() for w in writers] == [0, 0]
    _check_whole(target.read_text())
    assert reads > 0 and seen
    assert _temporaries(tmp_path) == [] and [p.name for p in tmp_path.iterdir()] == ["table.txt"]


def test_two_threads_writing_the_same_file_never_show_half_of_one(tmp_path):
    target = tmp_path / "entry.bin"
    errors = []

    def write(name):
        try:
            for i in range(100):
                payload = f"{name}:{i}:" + name * SIZE + "\nEND"
                atomic_write(target, payload.encode())
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=write, args=(name,)) for name in ("A", "B")]
    for t in threads:
        t.start()
    reads = 0
    while any(t.is_alive() for t in threads):
        if target.exists():
            _check_whole(target.read_bytes().decode())
            reads += 1
    for t in threads:
        t.join()
    assert errors == [] and reads > 0
    assert _temporaries(tmp_path) == []


def test_two_writers_of_the_same_folder_do_not_collide(tmp_path):
    target = tmp_path / "models" / "converted"
    errors = []

    def convert(name):
        try:
            for _ in range(30):
                with atomic_dir(target) as partial:
                    for part in ("config.json", "model.safetensors"):
                        (partial / part).write_text(name * 10_000)
                        time.sleep(0.001)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=convert, args=(name,)) for name in ("A", "B")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    files = sorted(p.name for p in target.iterdir())
    assert files == ["config.json", "model.safetensors"]
    contents = {(target / f).read_text() for f in files}
    assert len(contents) == 1 and contents.pop() in ("A" * 10_000, "B" * 10_000)  # one writer's folder, whole
    assert [p.name for p in target.parent.iterdir()] == ["converted"]  # no .partial folder is left


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing(tmp_path):
    target = atomic_write(tmp_path / "x.json", "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            assert tmp.parent == tmp_path and tmp.name.startswith(".x.json.") and not tmp.exists()
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old" and _temporaries(tmp_path) == []
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "folder") as partial:
            (partial / "a").write_text("half")
            raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]


def test_temporary_names_are_unique(tmp_path):
    names = set()
    for _ in range(50):
        with atomic_path(tmp_path / "t") as tmp:
            names.add(tmp.name)
            tmp.write_text("x")
    assert len(names) == 50 and atomic_write(tmp_path / "b", b"\x00\x01").read_bytes() == b"\x00\x01"
