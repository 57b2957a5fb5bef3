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

from engine.perturb.allocated import rates
from engine.perturb.inputs import SharedInput
from engine.perturb.job import Job
from engine.perturb.layerwise import prune_layers_sequentially
from engine.perturb.masks import lowest_k, n_of_m
from engine.perturb.spec import Spec
from engine.perturb.stored import build_pruned

# its declaration (grammar, ALGORITHM_VERSION, memory footprint): engine.record.methods.sparsegpt

BLOCK_SIZE = 128
PERCENT_DAMP = 0.01
DAMPING_ATTEMPTS = 6  # λ, 10λ, ... 10⁵λ before giving up


def _factor(H: torch.Tensor, damp: torch.Tensor, attempt: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(upper Cholesky factor of (H + 10^attempt · damp · I)⁻¹, a device flag: the factorizations failed)."""
    Hd = H.clone()
    Hd.diagonal().add_(damp * (10**attempt))
    L, info = torch.linalg.cholesky_ex(Hd)
    U, info_u = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
    return U, (info != 0) | (info_u != 0)


def _damped(xtx: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(H = XᵀX in float32 with each dead input's diagonal set to 1, its damping λ = percdamp · mean diag(H),
    the dead-input mask): no host synchronisation."""
    H = xtx.clone().float()
    dead = torch.diag(H) == 0
    H.diagonal().masked_fill_(dead, 1.0)
    return H, percdamp * torch.mean(torch.diag(H)), dead


def inverse_hessian_factor(xtx: torch.Tensor, percdamp: float = PERCENT_DAMP) -> tuple[torch.Tensor, torch.Tensor]:
    """(upper Cholesky factor of (H + λI)⁻¹, dead-input mask) for H = XᵀX, λ = percdamp · mean diag(H), with
    λ raised tenfold while H + λI is not positive definite (this one checks each attempt on the host)."""
    H, damp, dead = _damped(xtx, percdamp)
    for attempt in range(DAMPING_ATTEMPTS):
        U, failed = _factor(H, damp, attempt)
        if not bool(failed):
            return U, dead
    raise RuntimeError("SparseGPT: the calibration Hessian is not positive definite even with damping")


@torch.no_grad()
def obs_sweep(
    weights: list[torch.Tensor],
    Hinv: torch.Tensor,
    dead: torch.Tensor,
    spec: Spec,
    blocksize: int = BLOCK_SIZE,
    mask: torch.Tensor | None = None,
    sparsities: list[float] | None = None,
) -> list[torch.Tensor]:
    """SparseGPT's blocked OBS sweep over matrices that read one input (one Hessian), each with its own count for
    unstructured sparsity; returns the new weights (their dtypes).

    `Hinv`: the upper Cholesky factor of the damped H⁻¹, `dead`: inputs never active (their weights zeroed).
    Row by row, the arithmetic of the reference's per-matrix sweep. Inside a block the matrices' rows are side by
    side and the block's columns transposed (contiguous), so each column is four small operations for all of
    them; a block's pruned weights are its final values with the mask applied (a kept weight's column is never
    updated after its own step), and each matrix takes the block's update of its later columns in its own product.
    `sparsities`: each matrix's own unstructured sparsity (a layer allocation), else the spec's for all.
    """
    Ws = [w.detach().to(torch.float32, copy=True) for w in weights]
    bounds = [0]
    for w in Ws:
        w.masked_fill_(dead.to(w.device), 0)
        bounds.append(bounds[-1] + w.shape[0])
    shares = sparsities if sparsities is not None else [spec.sparsity] * len(Ws)
    segments = list(zip(Ws, bounds, bounds[1:], shares))
    cols = Ws[0].shape[1]
    nm = spec.n is not None
    if nm and blocksize % spec.m:
        raise ValueError(f"SparseGPT N:M needs the block size {blocksize} to be a multiple of M={spec.m}")

    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = torch.cat([W[:, i1:i2] for W in Ws]) if len(Ws) > 1 else Ws[0][:, i1:i2].clone()  # [rows, block]
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1)
        if mask is not None:
            mask1 = mask[:, i1:i2].to(device=W1.device, dtype=torch.bool)
        elif nm:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        else:
            # exactly int(numel · sparsity) pruned over each whole matrix: each block takes its share
            score = W1**2 / d.reshape(1, -1) ** 2
            mask1 = torch.empty_like(W1, dtype=torch.bool)
            for _W, r0, r1, rate in segments:
                n = r1 - r0
                k = int(n * i2 * rate) - int(n * i1 * rate)
                mask1[r0:r1] = lowest_k(score[r0:r1], k)
        W1t = W1.t().contiguous()  # [block columns, rows]
        pruned_t = mask1.t().float()
        Err1t = torch.zeros_like(W1t)
        for i in range(i2 - i1):
            if nm and mask is None and i % spec.m == 0:
                group = (W1t[i : i + spec.m] ** 2 / d[i : i + spec.m].reshape(-1, 1) ** 2).t()
                chosen = n_of_m(group, spec.n, spec.m)
                mask1[:, i : i + spec.m] = chosen
                pruned_t[i : i + spec.m] = chosen.t()
            err = Err1t[i]
            torch.mul(W1t[i], pruned_t[i], out=err)  # the pruned weights: w − q, q = w with them zeroed
            err.div_(d[i])
            W1t[i + 1 :] -= Hinv1[i, i + 1 :].unsqueeze(1) * err.unsqueeze(0)
        Q1 = W1t.t().masked_fill(mask1, 0.0)
        Err1 = Err1t.t().contiguous()
        for W, r0, r1, _rate in segments:
            W[:, i1:i2] = Q1[r0:r1]
            W[:, i2:] -= Err1[r0:r1] @ Hinv[i1:i2, i2:]
    return [W.to(w.dtype) for W, w in zip(Ws, weights)]


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
    Hinv, dead = inverse_hessian_factor(xtx.to(weight.device), percdamp)
    return obs_sweep([weight], Hinv, dead, spec, blocksize, mask)[0]


@torch.no_grad()
def sparsegpt_layer(
    shared: list[SharedInput], spec: Spec, percdamp: float = PERCENT_DAMP, allocated=None
) -> list[list[torch.Tensor]]:
    """The new weights of a layer's matrices, one sweep per shared input (its Hessian factored once for all
    the matrices that read it). The factorizations are checked on the host once for the whole layer: a
    Hessian that needed more damping is factored and swept again. `allocated`: a layer allocation's Rates
    (engine.perturb.allocated), each matrix at its own sparsity."""
    out, failures = [], []

    def own(group):
        return [allocated.of(v) for v in group.views] if allocated is not None else None

    for group in shared:
        H, damp, dead = _damped(group.stats.xtx.to(group.views[0].parameter.device), percdamp)
        U, failed = _factor(H, damp, 0)
        out.append(obs_sweep([v.matrix() for v in group.views], U, dead, spec, sparsities=own(group)))
        failures.append(failed.to(failures[0].device) if failures else failed)
    if failures and torch.stack(failures).any():  # the layer's one host synchronisation
        for j, (group, failed) in enumerate(zip(shared, failures)):
            if bool(failed):
                U, dead = inverse_hessian_factor(group.stats.xtx.to(group.views[0].parameter.device), percdamp)
                out[j] = obs_sweep([v.matrix() for v in group.views], U, dead, spec, sparsities=own(group))
    return out


def prune_sparsegpt(
    model, spec: Spec, calib_ids: torch.Tensor, progress=None, batch_size: int = 8, allocated=None
) -> dict:
    """Prune `model` in place (new weight tensors); returns the details (expert token counts on MoE models, a layer
    allocation's, engine.perturb.allocated)."""
    if allocated is None:  # a layer allocation's Rates, when the caller has not made them (engine.perturb.allocated)
        allocated = rates(model, spec, calib_ids)
    details = prune_layers_sequentially(
        model,
        calib_ids,
        lambda shared: sparsegpt_layer(shared, spec, allocated=allocated),
        gram=True,
        spec=spec,
        progress=progress,
        batch_size=batch_size,
    )
    if allocated is not None:
        details["allocation"] = allocated.details
    return details


def build(job: Job):
    """The pruned clone (from the pruned-weight cache when it holds it, engine.perturb.stored)."""

    def prune(clone, step, allocated):
        return prune_sparsegpt(clone, job.spec, job.calibration.ids, progress=step, allocated=allocated)

    return build_pruned(job, prune, lambda clone: rates(clone, job.spec, job.calibration.ids, job.say, job=job))
