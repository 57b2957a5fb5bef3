"""One writer per output: an exclusive lock on a folder (a `hierui batch --out`) or a file (`report --out`)
for as long as a run writes there.

    lock_folder(OUT)    OUT/.hierui.lock
    lock_file(PATH)     PATH's folder/.PATH-name.hierui.lock

The lock is the kernel's: the lock file is opened (created if missing) and locked with
fcntl.flock(LOCK_EX | LOCK_NB). On Linux this is the robust choice:

- there is no check-then-create race: of two runs started together exactly one flock succeeds;
- the kernel drops the lock when its process ends, however it ends (exit, error, Ctrl-C, SIGKILL, the OOM
  killer), so a dead process never holds a folder, and a reused pid never looks like the owner. (A lock
  made of an O_EXCL-created file needs a pid check to detect a stale one, which a reused pid fools, and
  two runs taking over the same stale file race on removing and recreating it.)

The file holds the owner's pid, host, start time and command (JSON), written once the lock is taken; it
only names the owner: a second run is refused with `OUT is in use by hierui pid N on HOST since TIME`
(HieruiError, exit 2). A file left behind by a process that died without removing it is not locked; the
next run takes it over and says so on stderr (`taking over a stale lock of pid N (not running)`). A link
(symbolic, or a hard link) at the lock file's name is refused in one line (exit 2), never followed or written
through (engine.record.paths.open_fd).

The context manager releases the lock on a normal exit, on an error and on Ctrl-C; atexit is a backstop.
On release the file is removed while still locked. A contender that opened the old file just before
checks, once it holds its lock, that the file it locked is still the one at the path, and starts over if
not, so two runs never both hold it. A folder the lock created (a run that failed at its start) is removed
again when it is left empty. Within one process the lock is re-entrant (the CLI holds OUT, run_sweep takes
it again). Torch-free, standard library only.
"""

from __future__ import annotations

import atexit
import errno
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from engine.errors import HieruiError
from engine.record.paths import make_folders, open_fd, remove_empty, writing

LOCK_NAME = ".hierui.lock"

try:
    import fcntl
except ImportError:  # not on Linux/macOS: no locking (the file still names the owner)
    fcntl = None


class LockBusy(HieruiError):
    """The target is being written by another hierui process (exit code 2)."""

    def __init__(self, message: str, owner: dict | None = None):
        super().__init__(message, 2)
        self.owner = owner or {}


@dataclass
class _Held:
    path: Path
    fd: int | None
    count: int = 1
    created: list[Path] = field(default_factory=list)  # folders this lock created, deepest first


_held: dict[str, _Held] = {}
_guard = threading.Lock()


def lock_path_for_file(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(f".{path.name}.hierui.lock")


def read_owner(lock_path: str | Path) -> dict | None:
    """The owner a lock file names ({pid, host, started, command}), or None when empty or unreadable."""
    try:
        owner = json.loads(Path(lock_path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) and isinstance(owner.get("pid"), int) else None


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid runs on this machine."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    except OSError:
        return False
    return True


@contextmanager
def lock_folder(folder: str | Path, warn: Callable[[str], None] | None = None) -> Iterator[Path]:
    """Hold OUT/.hierui.lock for the block: the folder is created if needed (and removed again if the block
    leaves it empty). Raises LockBusy naming the running owner."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise HieruiError(f"{folder} is a file, not a folder")
    with _locked(folder / LOCK_NAME, str(folder), warn):
        yield folder


@contextmanager
def lock_file(path: str | Path, warn: Callable[[str], None] | None = None) -> Iterator[Path]:
    """Hold a lock beside `path` (.NAME.hierui.lock in its folder) while it is written."""
    path = Path(path)
    with _locked(lock_path_for_file(path), str(path), warn):
        yield path


@contextmanager
def _locked(lock_path: Path, name: str, warn: Callable[[str], None] | None) -> Iterator[None]:
    key = os.path.abspath(lock_path)
    with _guard:
        held = _held.get(key)
        if held is not None:
            held.count += 1
        else:
            _held[key] = _acquire(Path(key), name, warn or _stderr)
    try:
        yield
    finally:
        with _guard:
            held = _held[key]
            held.count -= 1
            if held.count == 0:
                del _held[key]
                _release(held)


def _stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _acquire(lock_path: Path, name: str, warn: Callable[[str], None]) -> _Held:
    try:
        created = make_folders(lock_path.parent)
    except OSError as e:
        raise HieruiError(f"{lock_path.parent}: cannot create the folder ({e.strerror or e})") from None
    try:
        fd = _take(lock_path, name, warn)
    except BaseException:
        remove_empty(created)
        raise
    held = _Held(lock_path, fd, created=created)
    _register_atexit()
    return held


def _take(lock_path: Path, name: str, warn: Callable[[str], None]) -> int | None:
    for _ in range(100):
        try:
            fd = open_fd(lock_path, os.O_RDWR | os.O_CREAT, links="refuse")  # never through a link at its name
        except HieruiError:  # a link (LinkRefused) or a FIFO at its name
            raise
        except OSError as e:
            raise HieruiError(f"{name}: cannot create its lock file {lock_path} ({e.strerror or e})") from None
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise _busy(lock_path, name) from None
            except OSError as e:
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                    os.close(fd)
                    raise
                warn(f"warning: {name}: this filesystem cannot lock files; another run could write there too")
        # the file locked must still be the one at the path: a releasing owner removes it while locked
        try:
            same = os.path.samestat(os.stat(lock_path), os.fstat(fd))
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            continue
        previous = _read_fd(fd)
        if previous is not None and previous.get("pid") != os.getpid():
            warn(_stale_message(previous))
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": " ".join(sys.argv)[:500],
        }
        data = (json.dumps(me) + "\n").encode()
        try:
            with writing(lock_path):  # a full disk: one line naming the lock file
                os.ftruncate(fd, 0)
                os.pwrite(fd, data, 0)
        except BaseException:
            _release(_Held(lock_path, fd))  # removed while still locked, as on release
            raise
        return fd
    raise HieruiError(f"{name}: could not take its lock {lock_path} (it keeps changing)")


def _read_fd(fd: int) -> dict | None:
    try:
        owner = json.loads(os.pread(fd, 65536, 0).decode("utf-8"))
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) and isinstance(owner.get("pid"), int) else None


def _stale_message(owner: dict) -> str:
    pid, host = owner["pid"], owner.get("host")
    if host and host != socket.gethostname():
        return f"taking over a stale lock of pid {pid} on {host} (it no longer holds it)"
    if pid_alive(pid):
        return f"taking over a stale lock of pid {pid} (it no longer holds it)"
    return f"taking over a stale lock of pid {pid} (not running)"


def _busy(lock_path: Path, name: str) -> LockBusy:
    owner = None
    for _ in range(20):  # the owner writes its name just after it took the lock
        owner = read_owner(lock_path)
        if owner is not None:
            break
        time.sleep(0.05)
    if owner is None:
        return LockBusy(f"{name} is in use by another hierui process")
    return LockBusy(
        f"{name} is in use by hierui pid {owner['pid']} on {owner.get('host') or '?'} "
        f"since {owner.get('started') or '?'}",
        owner,
    )


def _release(held: _Held) -> None:
    if held.fd is None:
        return
    try:
        os.unlink(held.path)  # while still locked (see the module's docstring)
    except OSError:
        pass
    try:
        os.close(held.fd)
    except OSError:
        pass
    held.fd = None
    remove_empty(held.created)


_atexit_registered = False


def _register_atexit() -> None:
    global _atexit_registered
    if not _atexit_registered:
        atexit.register(release_all)
        _atexit_registered = True


def release_all() -> None:
    """Release every lock this process holds (the atexit backstop)."""
    with _guard:
        held = list(_held.values())
        _held.clear()
    for h in held:
        _release(h)


def held_locks() -> list[Path]:
    """The lock files this process holds now (for tests)."""
    with _guard:
        return [h.path for h in _held.values()]
