"""Where hierui keeps things on disk ($HIERUI_HOME and its cache layout), and the one way files are written whole.

    $HIERUI_HOME (default ~/.cache/hierui)
        models/     converted models (the embedded default, GGUF conversions); $HIERUI_MODELS moves it
        calib/      calibration token batches              <key>.pt            + <key>.meta.json
        pruned/     pruned weights                         <key>.safetensors   + <key>.meta.json
                    drop (similarity) scores               <key>-similarity.json + <key>-similarity.meta.json
        noise/      numerical noise floors (`hierui noise`) <model key>-<device type>.json (engine.run.floor)
        sessions/   the explorer's session files (the default of explore --sessions)

Every module takes these folders from here. The cache entries and their metadata are managed by
engine.perturb.cache.

Every file hierui writes is written here, one of three ways:

- whole (`atomic_write`, `atomic_path`): into a uniquely named temporary file in the target's own folder, then
  `os.replace`d onto the target, so a reader sees the old file or the new one, never half of one, and two
  processes writing the same target never share a temporary file. `atomic_dir` does the same for a whole
  folder (a converted model) and `atomic_files` for the files of a folder the user named (`prune --save`);
- in a stream (`open_for_writing`: session files, logs): opened without following a link (O_NOFOLLOW);
- the lock (engine.record.lock, through `open_fd`).

Links. A file is never written through a symbolic link already in place at its own name (one planted in an
output folder, say): a rename replaces the link itself, a streamed write removes it and creates the file
(its target is never opened), and the lock refuses in one line (`LinkRefused`, exit 2). Folders may be links
(HIERUI_HOME or an output folder pointed elsewhere on purpose). Something at the name that is neither a file
nor a link (a FIFO, a device, a folder) is refused in one line (exit 2): writing there would block or
replace it.

Failures. A write that fails at run time (a full disk, an I/O error, a folder that vanished) is one line
naming the file and the cause (`WriteFailed`, exit 1), and nothing half-written is left under the file's
name (the temporary file is removed), so a rerun picks up. `check_writable` finds an unwritable folder up
front by creating a file there (permission bits do not stop root; os.access says yes to root whatever they
say), leaving nothing behind, not even the folders it had to make.

Modes. Every file gets the mode a plain open() gives under the umask (0644 under umask 022), also those a
library creates itself with 0600 (safetensors).
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import stat
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from engine.errors import HieruiError

TEMP_SUFFIXES = (".tmp", ".partial")


def hierui_home() -> Path:
    """$HIERUI_HOME (default ~/.cache/hierui): a folder, or not there yet; something else there is one line (exit 2),
    before anything is read or written under it."""
    set_by = os.environ.get("HIERUI_HOME")
    home = Path(set_by).expanduser() if set_by else Path.home() / ".cache" / "hierui"
    if home.exists() and not home.is_dir():
        raise HieruiError(f"{'HIERUI_HOME ' if set_by else ''}{home} is not a folder: point HIERUI_HOME at a folder")
    return home


def models_dir() -> Path:
    """Converted models: $HIERUI_MODELS when set (a model store shared between homes), else $HIERUI_HOME/models."""
    override = os.environ.get("HIERUI_MODELS")
    return Path(override).expanduser() if override else hierui_home() / "models"


def calib_dir() -> Path:
    return hierui_home() / "calib"


def pruned_dir() -> Path:
    return hierui_home() / "pruned"


def sessions_dir() -> Path:
    """Where the explorer records its sessions by default (never the repository's shipped sessions/)."""
    return hierui_home() / "sessions"


def check_regular_file(path: str | Path, what: str) -> Path:
    """`path` as a Path when it names a regular file to read (a link to one is fine); else one line, exit 2:
    missing, a folder, or something that is not a regular file (a FIFO, a device, a socket — reading one blocks
    or never ends). `what` names the file for the user ("session file", "--base"). Opens nothing."""
    path = Path(path).expanduser()
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        dangling = " (a link to nothing)" if path.is_symlink() else ""
        raise HieruiError(f"{what} {path}: not found{dangling}") from None
    except OSError as e:
        raise HieruiError(f"{what} {path}: cannot be read ({e.strerror or e})") from None
    if stat.S_ISDIR(mode):
        raise HieruiError(f"{what} {path}: is a folder, not a file")
    if not stat.S_ISREG(mode):
        raise HieruiError(f"{what} {path}: not a regular file (a FIFO, device or socket cannot be read as one)")
    return path


class WriteFailed(HieruiError):
    """A file could not be written at run time (a full disk, an I/O error): one line naming the file and the
    cause, exit code 1."""

    def __init__(self, path: str | Path, cause: str):
        super().__init__(f"cannot write {path}: {cause}", 1)
        self.path = Path(path)
        self.cause = cause


class LinkRefused(HieruiError):
    """A link (symbolic, or a hard link's second name) at the name of a file hierui writes in place (the lock):
    one line, exit 2."""

    def __init__(self, path: str | Path, kind: str = "symbolic"):
        super().__init__(
            f"{path} is a {kind} link: hierui does not write through a link at the name of its own file; remove it"
        )
        self.path = Path(path)


def _failure(target: Path, tmp: Path, exc: Exception) -> WriteFailed | None:
    """What a write into `tmp` (a file or folder that becomes `target`) failing with `exc` is to the user: a
    failure to write `target` (also when a writer inside already said so of a file under `tmp`), else None."""
    if isinstance(exc, WriteFailed) and (exc.path == tmp or tmp in exc.path.parents):
        return WriteFailed(target, exc.cause)
    return write_failed(target, exc)


def write_failed(path: str | Path, exc: BaseException) -> WriteFailed | None:
    """`exc`, raised while writing `path`, as the one line to show (WriteFailed), when it is a failure to
    write: an OSError (pyarrow's too), one in its chain (torch.save to a file object), a library's error quoting
    an OS error (safetensors: "... (os error 28)"), or any error while the folder's file system is full (torch.save
    to a path says only "unexpected pos"). None for anything else (a bug, shown as it is)."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            break
        if isinstance(seen, HieruiError):
            return None
        if isinstance(seen, OSError):
            code = seen.errno
            return WriteFailed(path, os.strerror(code) if code else (seen.strerror or str(seen) or type(seen).__name__))
        quoted = re.search(r"\(os error (\d+)\)", str(seen))
        if quoted:
            return WriteFailed(path, os.strerror(int(quoted.group(1))))
        seen = seen.__cause__ or seen.__context__
    if _full(Path(path).parent):
        return WriteFailed(path, os.strerror(errno.ENOSPC))
    return None


def _full(folder: Path) -> bool:
    try:
        return os.statvfs(folder).f_bavail == 0
    except (OSError, AttributeError):
        return False


def file_mode() -> int:
    """The mode open() gives a new file under this process's umask (0o644 under 022)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # not thread-safe, so only where /proc does not say
    os.umask(mask)
    return 0o666 & ~mask


def _give_mode(path: Path, mode: int) -> None:
    """`path` (a regular file hierui just wrote) with `mode` where its writer chose another (safetensors: 0600)."""
    st = os.lstat(path)
    if stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) != mode:
        os.chmod(path, mode)


def check_target(path: str | Path) -> Path:
    """One line (exit 2) when something is at `path` that hierui must not write over: a folder, or anything
    that is neither a regular file nor a symbolic link (a FIFO would block the write, a device would be
    replaced). Returns `path` as a Path."""
    path = Path(path)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return path
    except OSError:
        return path  # the write itself says what is wrong
    if stat.S_ISDIR(mode):
        raise HieruiError(f"{path} is a folder, not a file")
    if not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
        raise HieruiError(f"{path} is not a regular file (a FIFO, device or socket): hierui does not write there")
    return path


def make_folders(folder: str | Path) -> list[Path]:
    """Create `folder` and its missing parents; returns those it created, deepest first (for remove_empty)."""
    folder = Path(folder)
    missing = []
    for parent in [folder, *folder.parents]:
        if parent.exists():
            break
        missing.append(parent)
    folder.mkdir(parents=True, exist_ok=True)
    return missing


def remove_empty(folders: list[Path]) -> None:
    """Remove `folders` (deepest first) while they are empty: a failed start leaves no folder it made."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def check_writable(folder: str | Path, what: str) -> None:
    """One line (exit 2) unless a file can be created in `folder` now, found by doing it: the folder (and
    any missing parents) is made, a file created there, written and removed, and the folders made are removed
    again, so nothing is left. Holds for root, whom permission bits do not stop (os.access says yes to root
    whatever they say); finds a read-only file system, a path under /proc, a file where a folder should be.
    `what` starts the message ("--out runs/x"). A file at `folder` itself is refused too."""
    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise HieruiError(f"{what}: {folder} is a file, not a folder")
    try:
        made = make_folders(folder)
    except OSError as e:
        raise HieruiError(f"{what}: cannot create the folder ({e.strerror or e})") from None
    probe = _temp_name(folder / "hierui-probe", ".tmp")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, 0o600)
        try:
            os.write(fd, b"hierui")
        finally:
            os.close(fd)
        os.unlink(probe)
    except OSError as e:
        try:
            os.unlink(probe)
        except OSError:
            pass
        remove_empty(made)
        raise HieruiError(f"{what}: cannot create a file in {folder} ({e.strerror or e})") from None
    remove_empty(made)


def check_output_file(path: str | Path, what: str) -> Path:
    """One line (exit 2), before anything slow, unless `path` can become a file: not a folder or a FIFO or
    device at its name, in a folder that exists and where a file can be created (check_writable). `what` starts
    the message ("--json out.json"). Returns `path` as a Path, ~ expanded."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise HieruiError(f"{what}: is a folder, not a file")
    if not path.parent.is_dir():
        there = "is a file, not a folder" if path.parent.exists() else "does not exist"
        raise HieruiError(f"{what}: its folder {path.parent} {there}")
    try:
        check_target(path)
    except HieruiError as e:
        raise HieruiError(f"{what}: {e}") from None
    check_writable(path.parent, what)
    return path


_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_MODES = {
    "w": os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
    "x": os.O_WRONLY | os.O_CREAT | os.O_EXCL,
    "a": os.O_WRONLY | os.O_CREAT | os.O_APPEND,
}


def open_fd(path: str | Path, flags: int, links: str = "replace") -> int:
    """os.open(path, flags) for a file hierui writes in place, never through a link at its name: with
    `links="replace"` a symbolic link (or a hard link's second name) is removed and the file created in its place,
    its target untouched; with "refuse" it is LinkRefused (exit 2: the lock). A FIFO, a device or a folder at the
    name is one line (exit 2), without blocking. A new file gets open()'s mode under the umask. Other OSErrors are
    raised as they are (FileExistsError with O_EXCL)."""
    path = Path(path)
    if links == "replace" and not flags & os.O_EXCL:
        _unshare(path)
    for _ in range(3):
        try:
            fd = os.open(path, flags | _NOFOLLOW | _CLOEXEC | _NONBLOCK, 0o666)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.EMLINK) and os.path.islink(path):
                if links != "replace":
                    raise LinkRefused(path) from None
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
                flags |= os.O_EXCL  # the name is free now: the file is ours or it is an error
                continue
            if e.errno in (errno.ENXIO, errno.EISDIR):  # a FIFO without a reader; a folder
                check_target(path)
            raise
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            check_target(path)
            raise HieruiError(f"{path} is not a regular file: hierui does not write there")
        if links != "replace" and st.st_nlink > 1:  # another name's content would change
            os.close(fd)
            raise LinkRefused(path, "hard")
        if _NONBLOCK:
            import fcntl

            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~_NONBLOCK)
        return fd
    raise LinkRefused(path)


def _unshare(path: Path) -> None:
    """A regular file at `path` that is also another name's (a hard link planted there) is removed first, so the
    write that follows never changes the other name's content."""
    try:
        st = os.lstat(path)
    except OSError:
        return
    if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
        os.unlink(path)


def open_for_writing(path: str | Path, mode: str = "w", encoding: str | None = "utf-8"):
    """The file object of `open(path, mode)` for a file written in a stream (a session, a log), opened by
    open_fd: a link at its name is replaced, never followed. `mode`: w, x or a, with b for bytes. The folder
    is created if needed. A failure is WriteFailed naming the file (FileExistsError with x)."""
    path = Path(path)
    binary = "b" in mode
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = open_fd(path, _MODES[mode.replace("b", "")])
    except FileExistsError:
        raise
    except OSError as e:
        raise write_failed(path, e) from None
    return os.fdopen(fd, mode.replace("x", "w"), encoding=None if binary else encoding)


@contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """A block that writes the file at `path` in place (a file of hierui's own private folder, say): any failure
    to write (write_failed) becomes WriteFailed naming `path`, one line."""
    try:
        yield
    except Exception as e:
        failed = write_failed(path, e)
        if failed is None:
            raise
        raise failed from e


def append_whole(path: str | Path, text: str, create: bool = True) -> None:
    """Append `text` to the file at `path` (a log), all of it or none: flushed to the disk, and cut back to its
    old length when the write fails (WriteFailed naming the file). A link at its name is replaced (open_fd).
    `create` False: a file that is not there is WriteFailed, not made anew (a closed session's later lines)."""
    path = Path(path)
    data = text.encode("utf-8")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = open_fd(path, _MODES["a"] if create else _MODES["a"] & ~os.O_CREAT)
    except OSError as e:
        raise write_failed(path, e) from None
    try:
        size = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        except OSError as e:
            try:
                os.ftruncate(fd, size)
            except OSError:
                pass
            raise write_failed(path, e) from None
    finally:
        os.close(fd)


def _temp_name(target: Path, suffix: str) -> Path:
    """A name beside `target` that no other writer (thread or process) picks: hidden, pid + random."""
    return target.with_name(f".{target.name}.{os.getpid()}-{uuid.uuid4().hex[:12]}{suffix}")


def is_temporary(path: str | Path) -> bool:
    """Whether `path` is one of atomic_path's / atomic_dir's temporary names (a leftover if it lingers)."""
    name = Path(path).name
    return name.startswith(".") and name.endswith(TEMP_SUFFIXES)


@contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yields a fresh temporary path beside `target` (not yet created); when the block ends without an
    error, the file written there replaces `target` in one step (a link at `target` is replaced, not followed),
    with open()'s mode under the umask. On an error the temporary file is removed, and a failure to write is
    WriteFailed naming `target` (exit 1). A folder, FIFO or device at `target` is refused first (exit 2)."""
    target = check_target(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WriteFailed(target, e.strerror or str(e)) from None
    tmp = _temp_name(target, ".tmp")
    try:
        yield tmp
        _give_mode(tmp, file_mode())
        os.replace(tmp, target)
    except Exception as e:
        failed = _failure(target, tmp, e)
        if failed is None:
            raise
        raise failed from e
    finally:
        try:
            os.unlink(tmp)
        except OSError:
            pass


def atomic_write(target: str | Path, data: str | bytes | Callable[[Path], None], encoding: str = "utf-8") -> Path:
    """Write `data` (text, bytes, or a function that writes a file at the path it is given) to `target`
    whole or not at all (atomic_path). Returns `target` as a Path."""
    target = Path(target)
    with atomic_path(target) as tmp:
        if callable(data):
            data(tmp)
        elif isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data, encoding=encoding)
    return target


def _give_modes(folder: Path) -> None:
    """Every file under `folder` (hierui's own, just written) with open()'s mode under the umask."""
    mode = file_mode()
    for root, _dirs, files in os.walk(folder):
        for name in files:
            _give_mode(Path(root) / name, mode)


@contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yields a fresh, empty temporary folder beside `target`; when the block ends without an error it
    becomes `target` (an existing `target` is moved aside and removed). On an error it is removed, and a
    failure to write is WriteFailed naming `target`.

    Two processes filling the same target each use their own folder; the last to finish wins, and a
    reader never sees a half-written folder under the target's name."""
    target = Path(target)
    tmp = _temp_name(target, ".partial")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as e:
        raise WriteFailed(target, e.strerror or str(e)) from None
    try:
        yield tmp
        _give_modes(tmp)
        _swap_in(tmp, target)
    except Exception as e:
        failed = _failure(target, tmp, e)
        if failed is None:
            raise
        raise failed from e
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_files(target: str | Path) -> Iterator[Path]:
    """For a folder the user named (`prune --save DIR`, which may be a link to a folder elsewhere, kept as
    it is): yields a fresh temporary folder inside `target` (created, with its parents, if missing); when the
    block ends without an error each file written there is renamed into `target` (a link planted at a file's
    name is replaced, never followed). On an error the temporary folder is removed, and so are the folders
    this made if left empty; a failure to write is WriteFailed naming `target`."""
    target = Path(target)
    try:
        made = make_folders(target)
    except OSError as e:
        raise WriteFailed(target, e.strerror or str(e)) from None
    tmp = _temp_name(target / "files", ".partial")
    try:
        tmp.mkdir()
        yield tmp
        _give_modes(tmp)
        for root, dirs, files in os.walk(tmp):
            inside = Path(root).relative_to(tmp)
            for name in dirs:
                folder = target / inside / name
                if folder.is_symlink():
                    folder.unlink()
                folder.mkdir(exist_ok=True)
            for name in files:
                os.replace(Path(root) / name, check_target(target / inside / name))
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        remove_empty(made)
        failed = _failure(target, tmp, e)
        if failed is None:
            raise
        raise failed from e
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _swap_in(tmp: Path, target: Path) -> None:
    """Put the folder `tmp` in `target`'s place. A folder cannot be renamed over a non-empty one, so the
    old target is moved aside first; the two renames run under an exclusive lock on the parent folder, so
    writers in other threads or processes never interleave them."""
    import fcntl

    fd = os.open(target.parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        aside = None
        if os.path.lexists(target):
            aside = _temp_name(target, ".partial")
            os.rename(target, aside)
        os.rename(tmp, target)
    finally:
        os.close(fd)  # releases the lock
    if aside is not None:  # a link moved aside is removed, never followed
        if aside.is_dir() and not aside.is_symlink():
            shutil.rmtree(aside, ignore_errors=True)
        else:
            aside.unlink(missing_ok=True)
