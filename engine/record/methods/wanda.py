"""wanda: prune by |W_ij| · ‖X_j‖₂ within each output row, from calibration inputs (engine.perturb.wanda)."""

from __future__ import annotations

from engine.record.methods.declaration import Memory, Method
from engine.record.methods.grammar import SPARSITY
from engine.record.methods.pruning import describe_pruning

# bump when the output changes: cached pruned weights made by another version are then not reused (engine.perturb.cache)
ALGORITHM_VERSION = 2  # 2: every family (Conv1D, MoE experts, per-layer calibration inputs)

METHODS = (
    Method(
        name="wanda",
        family="prune",
        grammar=SPARSITY,
        summary="unstructured or N:M pruning by |W| · ‖X‖ per output row (Sun et al., 2023)",
        examples=("wanda:0.5", "wanda:2:4"),
        apply="engine.perturb.wanda:build",
        changes="weights",
        algorithm="wanda",
        calibrates=True,
        # its published ablation is flat from about 16-32 calibration sequences: the explorer starts quicker
        quick_calibration=True,
        per_row=True,
        allocates=True,
        describe=describe_pruning,
        # the largest matrix: |W| and the score (float32), the mask, the top-k per row; the statistics hook's
        # float32 copy of a linear's input
        memory=Memory(
            per_weight=4 + 4 + 1,
            per_pruned=4 + 8,
            input_copy=True,
            note="largest matrix: |W| and score (float32), mask, top-k per row",
        ),
        self_check=("wanda:0.5", "wanda:2:4"),
    ),
)
