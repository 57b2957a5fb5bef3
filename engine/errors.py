"""The one exception type hierui shows to users as a single line."""


class HieruiError(Exception):
    """A user-facing error: its message is printed as one line, with exit code `exit_code`.

    2 is for bad input (unknown model, malformed spec, bad file); 1 for failures at run time
    (out of memory, an unreachable hub).
    """

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


def one_line(exc: BaseException) -> str:
    """An exception as one line for the user: a HieruiError's message, else `Type: first line`."""
    if isinstance(exc, HieruiError):
        text = str(exc)
    else:
        first = str(exc).strip().splitlines()
        text = f"{type(exc).__name__}: {first[0]}" if first else type(exc).__name__
    return text.strip().splitlines()[0] if text.strip() else type(exc).__name__


def is_oom(exc: BaseException) -> bool:
    """True for running out of memory: MemoryError (host) or torch's OutOfMemoryError (an accelerator)."""
    return isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError"
