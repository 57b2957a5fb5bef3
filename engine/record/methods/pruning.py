"""What the pruning methods (magnitude, wanda, sparsegpt) declare alike: their reports' one line."""

from __future__ import annotations


def describe_pruning(details: dict) -> str:
    """A layer allocation's range of layer sparsities (engine.perturb.allocated), and the experts of an MoE model that
    no calibration token reached (empty otherwise)."""
    lines = []
    allocation = details.get("allocation")
    if allocation:
        layers = allocation["layers"]
        lines.append(
            f"layer allocation @{allocation['allocation']}: {min(layers):.1%} to {max(layers):.1%} across "
            f"{len(layers)} layers, {allocation['sparsity']:.2%} of all pruned weights"
        )
    if details.get("experts_without_tokens"):
        missed = ", ".join(f"layer {layer} expert {expert}" for layer, expert in details["experts_without_tokens"])
        lines.append(f"experts that no calibration token reached (pruned by magnitude instead): {missed}")
    return "\n".join(lines)
