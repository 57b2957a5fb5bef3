"""SparseGPT (Frantar & Alistarh, 2023): mask selection and optimal weight updates from the Hessian.

For one linear with calibration inputs X, the layer-wise loss ‖WX − ŴX‖² has Hessian H = 2XXᵀ. Columns
are processed left to right in blocks; inside a block the mask is chosen by the OBS saliency
w² / [H⁻¹]_jj² (over the whole block for unstructured sparsity, per group of M for N:M), and every
pruned weight's error is spread over the not-yet-processed columns through the upper Cholesky factor
of H⁻¹, so the kept weights compensate for the pruned ones. Every WeightView is pruned: GPT-2's Conv1D
through its transpose, a fused projection as one matrix (its Hessian is that of its one input, so this is
exact), an expert from the Hessian of only the tokens the router sent to it (engine.perturb.experts).
"""

from __future__ import annotations

import torch

from engine.perturb.inputs import InputStats
from engine.perturb.job import Job
from engine.perturb.layerwise import prune_layers_sequentially
from engine.perturb.masks import lowest_k, n_of_m
from engine.perturb.spec import Spec
from engine.perturb.stored import build_pruned

# its declaration (grammar, ALGORITHM_VERSION, memory footprint): engine.record.methods.sparsegpt

BLOCK_SIZE = 128
PERCENT_DAMP = 0.01


def inverse_hessian_factor(xtx: torch.Tensor, percdamp: float = PERCENT_DAMP) -> tuple[torch.Tensor, torch.Tensor]:
    """(upper Cholesky factor of (H + λI)⁻¹, dead-input mask) for H = XᵀX, λ = percdamp · mean diag(H)."""
    H = xtx.clone().float()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    idx = torch.arange(H.shape[0], device=H.device)
    damp = percdamp * torch.mean(torch.diag(H))
    for attempt in range(6):
        Hd = H.clone()
        Hd[idx, idx] += damp * (10**attempt)
        L, info = torch.linalg.cholesky_ex(Hd)
        if int(info) == 0:
            break
    else:
        raise RuntimeError("SparseGPT: the calibration Hessian is not positive definite even with damping")
    Hinv = torch.cholesky_inverse(L)
    return torch.linalg.cholesky(Hinv, upper=True), dead


@torch.no_grad()
def sparsegpt_weight(
    weight: torch.Tensor,
    xtx: torch.Tensor,
    spec: Spec,
    blocksize: int = BLOCK_SIZE,
    percdamp: float = PERCENT_DAMP,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The pruned and updated weight matrix (same dtype as `weight`).

    `mask` (True where pruned, [out, in]) fixes the pruned set instead of choosing it, for tests and analysis.
    With a mask P the sweep's result has a closed form: Ŵ = W − W_P U_PP⁻¹ U_P,: per row, U the upper
    Cholesky factor of the damped H⁻¹. It is the OBS optimum of ‖(W − Ŵ)X‖² with Ŵ_P = 0 when P is a prefix
    of the columns; otherwise kept columns left of a pruned one are not updated for it (SparseGPT's
    approximation, which makes one sweep enough).
    """
    W = weight.detach().float().clone()
    rows, cols = W.shape
    Hinv, dead = inverse_hessian_factor(xtx.to(W.device), percdamp)
    W[:, dead] = 0
    nm = spec.n is not None
    if nm and blocksize % spec.m:
        raise ValueError(f"SparseGPT N:M needs the block size {blocksize} to be a multiple of M={spec.m}")

    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1)
        if mask is not None:
            mask1 = mask[:, i1:i2].to(device=W.device, dtype=torch.bool)
        elif nm:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        else:
            # exactly int(numel · sparsity) pruned over the whole matrix: each block takes its share
            k = int(rows * i2 * spec.sparsity) - int(rows * i1 * spec.sparsity)
            mask1 = lowest_k(W1**2 / d.reshape(1, -1) ** 2, k)
        for i in range(i2 - i1):
            if nm and mask is None and i % spec.m == 0:
                group = W1[:, i : i + spec.m] ** 2 / d[i : i + spec.m].reshape(1, -1) ** 2
                mask1[:, i : i + spec.m] = n_of_m(group, spec.n, spec.m)
            w = W1[:, i]
            q = w.masked_fill(mask1[:, i], 0.0)
            Q1[:, i] = q
            err = (w - q) / d[i]
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return W.to(weight.dtype)


def prune_sparsegpt(model, spec: Spec, calib_ids: torch.Tensor, progress=None) -> dict:
    """Prune `model` in place (new weight tensors); returns the details (expert token counts on MoE models)."""

    def prune_matrix(view, stats: InputStats):
        return sparsegpt_weight(view.matrix(), stats.xtx, spec)

    return prune_layers_sequentially(model, calib_ids, prune_matrix, gram=True, spec=spec, progress=progress)


def build(job: Job):
    """The pruned clone (from the pruned-weight cache when it holds it, engine.perturb.stored)."""
    return build_pruned(job, lambda clone, step: prune_sparsegpt(clone, job.spec, job.calibration.ids, progress=step))
