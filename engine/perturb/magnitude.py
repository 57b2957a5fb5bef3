"""Magnitude pruning: zero the smallest |W| of each decoder weight matrix (no calibration data).

One threshold per matrix as the model stores it, as in the Wanda repository's magnitude baseline (which
thresholds each linear module it finds): a fused projection (Phi-3 `qkv_proj` / `gate_up_proj`, GPT-NeoX
`query_key_value`, GPT-2 `c_attn`) is one matrix with one threshold, not one per logical q/k/v or gate/up
part; an expert's slice of a 3-D expert tensor is a matrix of its own. Why per stored matrix: it needs no
knowledge of each family's fused layout (GPT-NeoX interleaves q, k, v per head), it is what any linear-module
based implementation does, and the sparsity of every stored matrix is then exactly the request. The price:
inside a fused matrix the parts may end up with unequal sparsities (their total is exact), so a fused model
is not pruned exactly like its unfused equivalent. N:M groups run along the input dimension, per row.
"""

from __future__ import annotations

import torch

from engine.anatomy.linears import decoder_layers, weight_views
from engine.perturb.allocated import rates
from engine.perturb.job import Job
from engine.perturb.masks import magnitude_mask
from engine.perturb.spec import Spec
from engine.perturb.stored import build_pruned

# its declaration (grammar, ALGORITHM_VERSION, memory footprint): engine.record.methods.magnitude


@torch.no_grad()
def prune_magnitude(model, spec: Spec, progress=None, allocated=None) -> dict:
    """Prune `model` in place (new weight tensors); returns the details (a layer allocation's,
    engine.perturb.allocated). The mask: engine.perturb.masks.magnitude_mask."""
    from engine.place.streaming import each_resident

    if allocated is None:  # a layer allocation's Rates, when the caller has not made them
        allocated = rates(model, spec)
    layers = decoder_layers(model)
    for index, layer in each_resident(layers):  # a streamed layer: its weights in for its turn (engine.place.streaming)
        for view in weight_views(layer, index):
            w = view.matrix()
            own = allocated.spec_for(view) if allocated is not None else spec
            view.assign(w.masked_fill(magnitude_mask(w, own), 0))
        if progress:
            progress(index + 1, len(layers))
    return {"allocation": allocated.details} if allocated is not None else {}


def build(job: Job):
    """The pruned clone (from the pruned-weight cache when it holds it, engine.perturb.stored)."""

    def prune(clone, step, allocated):
        return prune_magnitude(clone, job.spec, progress=step, allocated=allocated)

    return build_pruned(job, prune, lambda clone: rates(clone, job.spec, say=job.say, job=job))
