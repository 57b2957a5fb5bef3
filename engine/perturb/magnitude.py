"""Magnitude pruning: zero the smallest |W| of each decoder linear (no calibration data)."""

from __future__ import annotations

import torch

from engine.perturb.linears import decoder_layers, layer_linears, set_weight
from engine.perturb.masks import lowest_per_matrix, n_of_m
from engine.perturb.spec import Spec

# bump when the output changes: cached pruned weights made by another version are then not reused (engine.cache)
ALGORITHM_VERSION = 1


def magnitude_mask(weight: torch.Tensor, spec: Spec) -> torch.Tensor:
    """True where pruned: one threshold per matrix (unstructured), or per group of M (N:M)."""
    score = weight.detach().abs().float()
    if spec.n is not None:
        return n_of_m(score, spec.n, spec.m)
    return lowest_per_matrix(score, spec.sparsity)


@torch.no_grad()
def prune_magnitude(model, spec: Spec, progress=None) -> None:
    layers = decoder_layers(model)
    for index, layer in enumerate(layers):
        for lin in layer_linears(layer).values():
            w = lin.weight
            set_weight(lin, w.masked_fill(magnitude_mask(w, spec), 0))
        if progress:
            progress(index + 1, len(layers))
