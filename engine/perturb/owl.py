"""OWL's layer outlier ratios (Yin et al., 2023, "Outlier Weighed Layerwise Sparsity"), which set the layer
sparsities of a `@owl` spec (engine.perturb.allocation.owl_sparsities).

A layer's outlier ratio is the share of its scores above M times their mean, over every weight of every matrix of
the layer together (the matrices' scores pooled, one mean per layer). The score is Wanda's, |W_ij| · ‖X_j‖₂, with
‖X_j‖ the norm of input feature j over the calibration tokens of the DENSE model: the calibration runs through the
dense layers one after the other (as OWL's reference computes its ratios before pruning anything), in the same
two passes as pruning (engine.perturb.layerwise: pass one for the inputs' norms, once per shared input; pass two,
the dense layer's outputs, the next layer's inputs). Magnitude scores |W_ij| alone and needs no calibration.
Only the plain matrices count (experts' slices are left out: their inputs are the router's subsets).
"""

from __future__ import annotations

import torch
from accelerate.utils import send_to_device

from engine.anatomy.linears import decoder_layers, weight_views
from engine.perturb.layerwise import capture_calibration, pass_one, run_layer
from engine.place.streaming import each_resident, layer_device


def _ratio(scores: list[torch.Tensor], m: float) -> float:
    """The share of all `scores` (tensors of one layer, pooled) above m × their mean."""
    total = sum(s.numel() for s in scores)
    mean = sum(float(s.sum(dtype=torch.float64)) for s in scores) / total
    above = sum(int((s > m * mean).sum()) for s in scores)
    return above / total


@torch.no_grad()
def magnitude_ratios(model, m: float, progress=None) -> list[float]:
    """Each decoder layer's share of |W| above m × the layer's mean |W|. `progress(done, total)` after each layer."""
    ratios = []
    layers = decoder_layers(model)
    for index, layer in each_resident(layers):
        views = [v for v in weight_views(layer, index) if v.expert is None]
        ratios.append(_ratio([v.matrix().detach().abs().float() for v in views], m))
        if progress:
            progress(index + 1, len(layers))
    return ratios


@torch.no_grad()
def wanda_ratios(model, calib_ids: torch.Tensor, m: float, batch_size: int = 8, progress=None) -> list[float]:
    """Each decoder layer's share of Wanda scores |W|·‖X‖ above m × the layer's mean score, ‖X‖ from the dense
    model's own activations on `calib_ids`. `progress(done, total)` after each layer."""
    layers = decoder_layers(model)
    hidden, layer_kwargs = capture_calibration(model, calib_ids, batch_size)
    ratios = []
    last = len(layers) - 1
    for index, layer in each_resident(layers):
        device = layer_device(layer)
        chunks = [(h.to(device), send_to_device(kw, device)) for h, kw in zip(hidden, layer_kwargs[index])]
        plain = [v for v in weight_views(layer, index) if v.expert is None]
        shared = pass_one(layer, chunks, plain, [], gram=False)
        scores = []
        for group in shared:
            norm = group.stats.norm
            for v in group.views:
                w = v.matrix().detach()
                scores.append(w.abs().float().mul_(norm.to(w.device).reshape(1, -1)))
        ratios.append(_ratio(scores, m))
        del scores, shared
        if index < last:
            hidden = [h for h, _ in run_layer(layer, chunks)]
        if progress:
            progress(index + 1, len(layers))
    return ratios
