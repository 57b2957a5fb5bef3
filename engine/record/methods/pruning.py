"""What the pruning methods (magnitude, wanda, sparsegpt) declare alike: their reports' one line."""

from __future__ import annotations


def describe_pruning(details: dict) -> str:
    """The experts of an MoE model that no calibration token reached (empty otherwise)."""
    if details.get("experts_without_tokens"):
        missed = ", ".join(f"layer {layer} expert {expert}" for layer, expert in details["experts_without_tokens"])
        return f"experts that no calibration token reached (pruned by magnitude instead): {missed}"
    return ""
