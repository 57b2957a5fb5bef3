"""Wanda (Sun et al., 2023): prune by |W_ij| · ‖X_j‖₂, comparing weights within each output row.

‖X_j‖₂ is the norm of input feature j over all calibration tokens, taken from the (already pruned)
previous layers' outputs. Unstructured: the lowest `sparsity` fraction of each row. N:M: in every group of
M consecutive inputs of a row keep the N highest scores. Every WeightView is pruned (GPT-2's Conv1D through
its transpose; fused projections as one matrix, which is exact for a per-row rule: each output row belongs to
one logical part); an expert's ‖X_j‖ comes only from the tokens the router sent to it (engine.perturb.experts).
"""

from __future__ import annotations

import torch

from engine.perturb.inputs import InputStats
from engine.perturb.job import Job
from engine.perturb.layerwise import prune_layers_sequentially
from engine.perturb.masks import lowest_per_row, n_of_m
from engine.perturb.spec import Spec
from engine.perturb.stored import build_pruned

# its declaration (grammar, ALGORITHM_VERSION, memory footprint): engine.record.methods.wanda


def wanda_score(weight: torch.Tensor, input_norm: torch.Tensor) -> torch.Tensor:
    """|W| · ‖X_j‖₂ broadcast over the rows: shape (out_features, in_features)."""
    return weight.detach().abs().float() * input_norm.float().reshape(1, -1)


def wanda_mask(weight: torch.Tensor, input_norm: torch.Tensor, spec: Spec) -> torch.Tensor:
    score = wanda_score(weight, input_norm)
    if spec.n is not None:
        return n_of_m(score, spec.n, spec.m)
    return lowest_per_row(score, spec.sparsity)


def prune_wanda(model, spec: Spec, calib_ids: torch.Tensor, progress=None) -> dict:
    """Prune `model` in place (new weight tensors); returns the details (expert token counts on MoE models)."""

    def prune_matrix(view, stats: InputStats):
        w = view.matrix()
        return w.masked_fill(wanda_mask(w, stats.norm.to(w.device), spec), 0)

    return prune_layers_sequentially(model, calib_ids, prune_matrix, gram=False, spec=spec, progress=progress)


def build(job: Job):
    """The pruned clone (from the pruned-weight cache when it holds it, engine.perturb.stored)."""
    return build_pruned(job, lambda clone, step: prune_wanda(clone, job.spec, job.calibration.ids, progress=step))
