"""What a linear's inputs look like over the calibration tokens: Wanda's per-feature norms and SparseGPT's Gram
matrix (InputStats), accumulated by hooks during the layer-wise calibration (engine.perturb.layerwise), once per
distinct input of a layer (SharedInput: q, k and v read one input, gate and up another)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


class InputStats:
    """Accumulates what a linear's inputs look like over the calibration tokens.

    `sq`: per input feature, the sum of squares over all tokens (Wanda's ‖X_j‖₂²).
    `xtx`: the input Gram matrix Σ x xᵀ (SparseGPT's Hessian 2/n Σ x xᵀ up to its factor, which cancels: the
    damping is relative to its mean diagonal), when `gram=True`: one matrix product per batch, accumulated in
    float32 on the device of the matrices that read the input.
    `tokens`: how many tokens were added.
    """

    def __init__(self, in_features: int, device, gram: bool):
        self.tokens = 0
        self.sq = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.xtx = torch.zeros(in_features, in_features, dtype=torch.float32, device=device) if gram else None

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float().to(self.sq.device)
        self.tokens += x.shape[0]
        self.sq += (x * x).sum(0)
        if self.xtx is not None:
            self.xtx.addmm_(x.t(), x)

    @property
    def norm(self) -> torch.Tensor:
        """‖X_j‖₂ per input feature."""
        return self.sq.sqrt()


@dataclass(eq=False)
class SharedInput:
    """The weight matrices of one decoder layer that read the same input (`views`, engine.anatomy.linears
    WeightViews: q, k and v read the normed hidden states, gate and up the normed residual; a fused or a lone
    matrix is a group of one) and that input's statistics over the calibration tokens, computed once for all."""

    stats: InputStats
    views: list = field(default_factory=list)
