"""The one exception type hierui shows to users as a single line."""


class HieruiError(Exception):
    """A user-facing error: its message is printed as one line, with exit code `exit_code`.

    2 is for bad input (unknown model, malformed spec, bad file); 1 for failures at run time
    (out of memory, an unreachable hub).
    """

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code
