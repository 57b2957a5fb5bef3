"""The registry of perturbation methods: every method hierui knows, as the module of its family declares it.

A method is declared once, here, as an engine.record.methods.declaration.Method: its name, the grammar of its
spec's arguments, its algorithm's version, whether it calibrates, streams, what it changes in the dense model,
how it reports itself, its memory footprint for `hierui plan` and the specs `hierui check` runs. Every other
module asks the registry (`method(name)`, `methods()`) instead of naming methods: parsing (engine.perturb.spec),
building (engine.perturb.perturb), the caches, the plan, the self-check, the calibration defaults, the CLI.
The declarations live in the lowest layer (engine.record: data, no model code) so that every layer can read
them, engine.record.settings included; each module is importable without torch (`hierui cache` and
`hierui show` stay light). The algorithms live in engine.perturb and are named by a string, imported only to run.

Adding a method:
  1. engine/record/methods/<family>.py: `METHODS = (Method(...), ...)` and, when it caches results, the
     module constant `ALGORITHM_VERSION` (an int, bumped whenever its output changes: old cache entries are then
     stale). A new argument grammar goes in engine/record/methods/grammar.py.
  2. engine/perturb/<family>.py: the algorithm, with a `build(job)` function (engine.perturb.job.Job: the
     loaded model, the spec, the calibration, ...) returning the perturbed model; name it in Method.apply as
     "engine.perturb.<family>:build".
  3. the module's name in FAMILIES below: its place there is its methods' place in listings ("known: ...").
  4. tests: tests/test_registry.py parses every declared example and reads every version without torch;
     add the algorithm's own tests (tests/test_<family>.py).
"""

from __future__ import annotations

import itertools
from dataclasses import replace

from engine.errors import HieruiError
from engine.record.methods import checkpoint, drop, magnitude, none, quant, sparsegpt, wanda
from engine.record.methods.declaration import Memory, Method

__all__ = [
    "DEFAULT_SPEC",
    "Memory",
    "Method",
    "REGISTRY",
    "find",
    "identity",
    "method",
    "methods",
    "names",
    "self_check_specs",
]

FAMILIES = (magnitude, wanda, sparsegpt, drop, quant, checkpoint, none)

DEFAULT_SPEC = "wanda:0.5"  # what a command perturbs by when no --prune is given


def _declared() -> dict[str, Method]:
    table: dict[str, Method] = {}
    for module in FAMILIES:
        for declared in module.METHODS:
            if declared.name in table:
                raise ValueError(f"the method {declared.name} is declared twice")
            table[declared.name] = replace(declared, declared_in=module.__name__)
    return table


# name -> Method, in listing order; tests register a method of their own with monkeypatch.setitem
REGISTRY: dict[str, Method] = _declared()


def find(name: str) -> Method | None:
    """The method called `name` (lower case), None when there is none."""
    return REGISTRY.get(name)


def method(name: str) -> Method:
    """The method called `name`; HieruiError for an unknown name."""
    found = REGISTRY.get(name)
    if found is None:
        raise HieruiError(f"unknown method '{name}'; known: {', '.join(names())}")
    return found


def methods() -> tuple[Method, ...]:
    """Every registered method, in listing order."""
    return tuple(REGISTRY.values())


def names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def self_check_specs() -> tuple[str, ...]:
    """The specs `hierui check` runs by default: the identity method's first (its zero check is the baseline),
    then family by family in listing order, one spec of each method before any method's second."""
    first = [s for m in methods() if m.identity for s in m.self_check]
    rest: list[str] = []
    for family in dict.fromkeys(m.family for m in methods() if not m.identity):
        members = [m.self_check for m in methods() if m.family == family and not m.identity]
        for round_ in itertools.zip_longest(*members):
            rest.extend(s for s in round_ if s is not None)
    return tuple(first + rest)


def identity() -> Method:
    """The method that leaves the model as it is (none)."""
    return next(m for m in methods() if m.identity)
