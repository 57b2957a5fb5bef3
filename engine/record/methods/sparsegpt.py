"""sparsegpt: prune with the calibration Hessian's optimal weight updates (engine.perturb.sparsegpt)."""

from __future__ import annotations

from engine.record.methods.declaration import Memory, Method
from engine.record.methods.grammar import SPARSITY
from engine.record.methods.pruning import describe_pruning

# bump when the output changes: cached pruned weights made by another version are then not reused (engine.perturb.cache)
ALGORITHM_VERSION = 2  # 2: every family (Conv1D, MoE experts, per-layer calibration inputs)

METHODS = (
    Method(
        name="sparsegpt",
        family="prune",
        grammar=SPARSITY,
        summary="unstructured or N:M pruning with OBS weight updates (Frantar & Alistarh, 2023)",
        examples=("sparsegpt:0.5", "sparsegpt:4:8"),
        apply="engine.perturb.sparsegpt:build",
        changes="weights",
        algorithm="sparsegpt",
        calibrates=True,
        allocates=True,
        describe=describe_pruning,
        # every linear of the layer keeps its float32 Hessian until the layer is done; the one being pruned adds
        # the clone, the damped copy, the Cholesky factor, the inverse and its upper factor, or once those are
        # freed the float32 working copy of W and the update product
        memory=Memory(
            gram_copies=5,
            weight_copies=2,
            note="float32 Hessians of the layer's {linears} linears ({grams}) + the one being pruned's inverse factors",
        ),
        self_check=("sparsegpt:0.5",),
    ),
)
