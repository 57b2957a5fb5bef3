"""checkpoint:PATH: an already-perturbed model from elsewhere, against the dense one (engine.perturb.checkpoint)."""

from __future__ import annotations

from engine.record.methods.declaration import Method
from engine.record.methods.grammar import PATH


def describe_checkpoint(details: dict) -> str:
    """Which hidden-state metrics a structurally different checkpoint has (empty otherwise)."""
    structure = details.get("structure")
    if isinstance(structure, dict) and structure.get("hidden_metrics"):
        return f"structurally different checkpoint: hidden-state metrics {structure['hidden_metrics']}"
    return ""


METHODS = (
    Method(
        name="checkpoint",
        family="checkpoint",
        grammar=PATH,
        summary="an already-perturbed model: a local folder or a hub id",
        examples=("checkpoint:/models/llama-7b-wanda50", "checkpoint:org/model-pruned"),
        apply="engine.perturb.checkpoint:build",
        changes="model",  # the plan counts the checkpoint's own parameters
        describe=describe_checkpoint,
    ),
)
