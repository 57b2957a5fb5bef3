"""Sizes in bytes: the units, a size the user typed (--gpu-mem 80GiB) and a size as the plan prints it."""

from __future__ import annotations

import re

from engine.errors import HieruiError

KiB, MiB, GiB = 2**10, 2**20, 2**30

_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([kmgt]i?b|b)\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS.update({"kib": KiB, "mib": MiB, "gib": GiB, "tib": 2**40})


def parse_size(text: str, option: str = "--gpu-mem") -> int:
    """'80GiB' → 85899345920, '24GB' → 24·10⁹, '512MiB'; one clear line for anything else."""
    match = _SIZE.match(text or "")
    if not match or float(match.group(1)) <= 0:
        raise HieruiError(f"{option} '{text}': expected a size with its unit, such as 80GiB, 24GB or 512MiB")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"
