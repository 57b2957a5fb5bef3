"""attndrop, mlpdrop, blockdrop: drop the N sublayers or blocks that change the hidden state least, scored by the
cosine of their input and output on calibration tokens (engine.perturb.drop)."""

from __future__ import annotations

from engine.record.methods.declaration import Memory, Method
from engine.record.methods.grammar import COUNT

# the version of the similarity scores: bump when they change, so that cached scores of another version are not
# reused (engine.perturb.cache)
ALGORITHM_VERSION = 2

_NOUNS = {"attention": "attention sublayers", "mlp": "MLP sublayers", "block": "blocks"}


def describe_drop(details: dict) -> str:
    """Which sublayers or blocks were dropped, with their similarity scores."""
    if "dropped" not in details:
        return ""
    sims = details.get("similarity") or []
    scored = ", ".join(f"{i} ({sims[i]:.3f})" if i < len(sims) else str(i) for i in details["dropped"])
    return f"dropped {_NOUNS[details['kind']]} (input/output cosine on calibration): {scored}"


def _drop(name: str, kind: str, what: str) -> Method:
    return Method(
        name=name,
        family="drop",
        grammar=COUNT,
        summary=f"drop the N most redundant {what}",
        examples=(f"{name}:1", f"{name}:4"),
        apply="engine.perturb.drop:build",
        changes="modules",
        algorithm="similarity",  # the scores are cached, shared by the three
        calibrates=True,
        describe=describe_drop,
        memory=Memory(whole_stack=True),  # the scores run the whole decoder stack on a chunk
        self_check=(f"{name}:1",),
        params={"kind": kind},
    )


METHODS = (
    _drop("attndrop", "attention", "attention sublayers"),
    _drop("mlpdrop", "mlp", "MLP sublayers"),
    _drop("blockdrop", "block", "decoder blocks"),
)
