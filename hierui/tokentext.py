"""THE token-text rendering of hierui: generated text as the explorer, `hierui show` and the report show it.

    escape(text)        one line: a newline as ⏎, a tab as →, every other control, format, surrogate,
                        private-use or unassigned character escaped (\\x0e, \\u200b); None is ''
    running(text)       running text (a continuation, a prompt): as escape(), but a newline also breaks
                        the line (⏎ then the newline)
    cell(text, width)   a token in a table cell: escaped, spaces as ·, the empty token as ∅, cut with …
                        at `width` characters
    clip(text, width)   any text cut with … at `width` characters

Backslashes are shown as they are: a token "\\n" (two characters) and a newline (⏎) stay distinct.
"""

from __future__ import annotations

import unicodedata

NEWLINE, TAB, SPACE, EMPTY, CUT, BLANK = "⏎", "→", "·", "∅", "…", "␣"
ESCAPED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn"})


def _render(text, newline: str) -> str:
    out = []
    for ch in "" if text is None else str(text):
        if ch == "\n":
            out.append(newline)
        elif ch == "\t":
            out.append(TAB)
        elif unicodedata.category(ch) in ESCAPED_CATEGORIES:
            out.append(f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return "".join(out)


def escape(text) -> str:
    """Token text on one line: ⏎ for a newline, → for a tab, other control characters escaped."""
    return _render(text, NEWLINE)


def running(text) -> str:
    """Token text as running text: as escape(), and each newline breaks the line after its ⏎."""
    return _render(text, NEWLINE + "\n")


def token(text) -> str:
    """One token in running text: as running(), but a token of spaces alone shows as ␣ (one per space), so
    a generated space is as visible as a generated newline or tab."""
    raw = "" if text is None else str(text)
    return BLANK * len(raw) if raw and not raw.strip(" ") else running(raw)


def clip(text: str, width: int | None) -> str:
    """`text` cut to `width` characters, the last one … when anything was cut."""
    if width is None or len(text) <= width:
        return text
    return text[: max(width - 1, 0)] + CUT


def cell(text, width: int | None = None) -> str:
    """A token for a table cell: escaped, spaces shown as ·, ∅ for the empty token, cut at `width`."""
    shown = escape(text).replace(" ", SPACE)
    return clip(shown, width) if shown else EMPTY
