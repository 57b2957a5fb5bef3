"""Every text file a user names, read the one way: prompts (`batch --prompts`, a recipe's), calibration
(`--calib`, a recipe's `calibration.source`) and corpora (`kld --text`). Torch-free, so every command runs it
before anything slow.

A file that cannot be used is one line and exit 2 (engine.errors.HieruiError), naming the option and the file:
missing, a folder, not a regular file (a FIFO would block: engine.record.paths.check_regular_file), unreadable,
binary (NUL bytes), not UTF-8 text, or empty (nothing but white space). What is too short for its use is the
user's check (a calibration file against --calib-len: engine.perturb.calibration.check_calibration_file)."""

from __future__ import annotations

from pathlib import Path

from engine.errors import HieruiError
from engine.record.paths import check_regular_file


def read_text_file(path: str | Path, what: str) -> str:
    """The UTF-8 text of the file at `path` (a link to one is fine), or one line naming `what` (the option the
    user gave it with, e.g. "--calib") and what is wrong with it."""
    path = check_regular_file(path, what)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise HieruiError(f"{what} {path}: cannot be read ({e.strerror or e})") from None
    if b"\x00" in data:
        raise HieruiError(f"{what} {path}: a binary file, not text")
    try:
        text = data.decode("utf-8-sig")  # a byte-order mark (Windows editors write one) is not the text's
    except UnicodeDecodeError:
        raise HieruiError(f"{what} {path}: not UTF-8 text") from None
    if not text.strip():
        raise HieruiError(f"{what} {path}: the file is empty")
    return text
