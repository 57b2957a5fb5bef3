"""The grammars of what follows `METHOD:` in a perturbation spec, each turning that text into a Spec's fields.

A grammar's `parse(raw, name, rest)` gets the spec as the user typed it (for the error line), the method's name
and the text after the first ':' (None when there is none), and returns the fields of engine.perturb.spec.Spec it
sets; a malformed argument is one HieruiError line, "invalid perturbation spec '<raw>': <why>".
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from engine.errors import HieruiError

# ASCII decimals only: Python's int() and float() also take '０.５', '0.5_0', '1e-3', 'nan', '٤'
_WHOLE = re.compile(r"[0-9]+")
_DECIMAL = re.compile(r"[0-9]*\.?[0-9]+")


@dataclass(frozen=True)
class Grammar:
    """How the arguments of a method's specs are written (`usage`, e.g. 'SPARSITY or N:M') and parsed."""

    usage: str
    parse: Callable[[str, str, str | None], dict]


def bad(text: str, why: str) -> HieruiError:
    return HieruiError(f"invalid perturbation spec '{text}': {why}")


def arguments(raw: str, rest: str | None) -> list[str]:
    """The ':'-separated arguments, stripped; one line when one of them is empty ('wanda:', 'wanda::4')."""
    args = rest.split(":") if rest is not None else []
    if any(a.strip() == "" for a in args):
        raise bad(raw, "an argument is missing after ':'")
    return [a.strip() for a in args]


def whole(raw: str, part: str, what: str) -> int:
    if not _WHOLE.fullmatch(part):
        raise bad(raw, f"{what} must be a whole number written with the digits 0-9, got '{part}'")
    return int(part)


def _nothing(raw: str, name: str, rest: str | None) -> dict:
    if arguments(raw, rest):
        raise bad(raw, f"'{name}' takes no arguments")
    return {}


def _count(raw: str, name: str, rest: str | None) -> dict:
    args = arguments(raw, rest)
    if len(args) != 1:
        raise bad(raw, f"'{name}' takes one argument, the number to drop, e.g. {name}:4")
    count = whole(raw, args[0], "the number to drop")
    if count < 1:
        raise bad(raw, "the number to drop must be at least 1")
    return {"count": count}


def _sparsity(raw: str, name: str, rest: str | None) -> dict:
    args = arguments(raw, rest)
    if len(args) == 1:
        if not _DECIMAL.fullmatch(args[0]):
            raise bad(raw, f"sparsity must be a decimal number in (0, 1) such as 0.5, got '{args[0]}'")
        sparsity = float(args[0])
        if not 0.0 < sparsity < 1.0:
            raise bad(raw, f"sparsity must be in (0, 1), got {args[0]}")
        return {"sparsity": sparsity}
    if len(args) == 2:
        n = whole(raw, args[0], "N")
        m = whole(raw, args[1], "M")
        if not 0 < n < m:
            raise bad(raw, f"N:M needs 0 < N < M (keep N of every M weights), got {n}:{m}")
        return {"n": n, "m": m}
    raise bad(raw, f"'{name}' takes a sparsity (e.g. {name}:0.5) or N:M (e.g. {name}:2:4)")


def _path(raw: str, name: str, rest: str | None) -> dict:
    # the whole rest is the path: a path may hold ':' itself
    if rest is None or not rest.strip():
        raise bad(raw, f"{name} needs a path, e.g. {name}:/models/llama-7b-wanda50")
    return {"path": rest.strip()}


NOTHING = Grammar("", _nothing)
COUNT = Grammar("N", _count)
SPARSITY = Grammar("SPARSITY or N:M", _sparsity)
PATH = Grammar("PATH", _path)
