"""What a linear's inputs look like over the calibration tokens: Wanda's per-feature norms and SparseGPT's Gram
matrix (InputStats), accumulated by forward hooks during the layer-wise calibration."""

from __future__ import annotations

import torch


class InputStats:
    """Accumulates what a linear's inputs look like over the calibration tokens.

    `sq`: per input feature, the sum of squares over all tokens (Wanda's ‖X_j‖₂²).
    `xtx`: the input Gram matrix Σ x xᵀ (SparseGPT's Hessian, up to a factor), when `gram=True`.
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
