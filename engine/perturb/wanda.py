"""Wanda (Sun et al., 2023): prune by |W_ij| · ‖X_j‖₂, comparing weights within each output row.

‖X_j‖₂ is the norm of input feature j over all calibration tokens, taken from the (already pruned)
previous layers' outputs. Unstructured: the lowest `sparsity` fraction of each row. N:M: in every group of
M consecutive inputs of a row keep the N highest scores. Every WeightView is pruned (GPT-2's Conv1D through
its transpose; fused projections as one matrix, which is exact for a per-row rule: each output row belongs to
one logical part); an expert's ‖X_j‖ comes only from the tokens the router sent to it (engine.perturb.experts).
The matrices that read one input (q, k, v; gate, up) share its norms (engine.perturb.inputs.SharedInput), computed
once from the inputs captured once (engine.perturb.layerwise).
"""

from __future__ import annotations

import torch

from engine.perturb.allocated import rates
from engine.perturb.inputs import SharedInput
from engine.perturb.job import Job
from engine.perturb.layerwise import prune_layers_sequentially
from engine.perturb.masks import lowest_per_row, n_of_m, zero_lowest_per_row
from engine.perturb.spec import Spec
from engine.perturb.stored import build_pruned

# its declaration (grammar, ALGORITHM_VERSION, memory footprint): engine.record.methods.wanda


def wanda_score(weight: torch.Tensor, input_norm: torch.Tensor) -> torch.Tensor:
    """|W| · ‖X_j‖₂ broadcast over the rows: shape (out_features, in_features)."""
    return weight.detach().abs().float().mul_(input_norm.float().reshape(1, -1))


def wanda_mask(weight: torch.Tensor, input_norm: torch.Tensor, spec: Spec) -> torch.Tensor:
    score = wanda_score(weight, input_norm)
    if spec.n is not None:
        return n_of_m(score, spec.n, spec.m)
    return lowest_per_row(score, spec.sparsity)


def wanda_weights(weights: list[torch.Tensor], input_norm: torch.Tensor, spec: Spec) -> list[torch.Tensor]:
    """The pruned [out, in] weights of matrices that read one input, from that input's norms."""
    norm = input_norm.to(weights[0].device) if weights else input_norm
    return [zero_lowest_per_row(w, wanda_score(w, norm), spec.sparsity, spec.n, spec.m) for w in weights]


def prune_wanda(model, spec: Spec, calib_ids: torch.Tensor, progress=None, batch_size: int = 8, allocated=None) -> dict:
    """Prune `model` in place (new weight tensors); returns the details (expert token counts on MoE models, a layer
    allocation's, engine.perturb.allocated)."""
    if allocated is None:  # a layer allocation's Rates, when the caller has not made them (engine.perturb.allocated)
        allocated = rates(model, spec, calib_ids)

    def prune_layer(shared: list[SharedInput]) -> list[list[torch.Tensor]]:
        if allocated is None:
            return [wanda_weights([v.matrix() for v in group.views], group.stats.norm, spec) for group in shared]
        return [
            [wanda_weights([v.matrix()], group.stats.norm, allocated.spec_for(v))[0] for v in group.views]
            for group in shared
        ]

    details = prune_layers_sequentially(
        model, calib_ids, prune_layer, gram=False, spec=spec, progress=progress, batch_size=batch_size
    )
    if allocated is not None:
        details["allocation"] = allocated.details
    return details


def build(job: Job):
    """The pruned clone (from the pruned-weight cache when it holds it, engine.perturb.stored)."""

    def prune(clone, step, allocated):
        return prune_wanda(clone, job.spec, job.calibration.ids, progress=step, allocated=allocated)

    return build_pruned(job, prune, lambda clone: rates(clone, job.spec, job.calibration.ids, job.say, job=job))
