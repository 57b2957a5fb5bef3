"""none: the dense model against itself, a copy sharing every tensor (engine.perturb.pair)."""

from __future__ import annotations

from engine.record.methods.declaration import Method
from engine.record.methods.grammar import NOTHING

METHODS = (
    Method(
        name="none",
        family="none",
        grammar=NOTHING,
        summary="the dense model against itself (every divergence is exactly zero)",
        examples=("none",),
        apply="engine.perturb.pair:unchanged",
        identity=True,
        self_check=("none",),
    ),
)
