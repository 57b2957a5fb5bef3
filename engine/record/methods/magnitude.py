"""magnitude: zero the smallest |W| of each decoder weight matrix, no calibration (engine.perturb.magnitude)."""

from __future__ import annotations

from engine.record.methods.declaration import Memory, Method
from engine.record.methods.grammar import SPARSITY
from engine.record.methods.pruning import describe_pruning

# bump when the output changes: cached pruned weights made by another version are then not reused (engine.perturb.cache)
ALGORITHM_VERSION = 2  # 2: every family (Conv1D, MoE experts, per-layer calibration inputs)

METHODS = (
    Method(
        name="magnitude",
        family="prune",
        grammar=SPARSITY,
        summary="unstructured or N:M pruning by |W|, one threshold per matrix",
        examples=("magnitude:0.5", "magnitude:2:4", "magnitude:0.5@owl"),
        apply="engine.perturb.magnitude:build",
        changes="weights",
        algorithm="magnitude",
        describe=describe_pruning,
        allocates=True,
        # the largest matrix: its float32 score and bool mask, the top-k values (float32) and int64 indices
        memory=Memory(
            per_weight=4 + 1,
            per_pruned=4 + 8,
            note="largest matrix: float32 score, mask, top-k values and int64 indices",
        ),
        self_check=("magnitude:0.5",),
    ),
)
