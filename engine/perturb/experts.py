"""Calibration statistics for mixture-of-experts layers (transformers 5 experts modules).

An experts module (MixtralExperts, Qwen2MoeExperts, ...) holds all experts of a layer as 3-D parameters and
is called as `experts(hidden_states [tokens, H], top_k_index [tokens, k], top_k_weights)`. A forward pre-hook
records hidden_states and top_k_index, the router's real choice. Expert e's statistics then come from exactly
the tokens routed to e:

- its first projection (`gate_up_proj`, or `up_proj` where the class has no gate) sees those hidden states;
- its `down_proj` sees `_apply_gate(x Wᵀ + b)` of them (or `act_fn(...)` without a gate): the functions the
  module itself uses, with the expert's (still unpruned) first projection, as a hook on a plain MLP's
  down_proj sees the unpruned MLP's activations.

Experts are pruned one at a time, so only one expert's statistics (for SparseGPT, its two Gram matrices) are
held at once. An expert that no calibration token reaches has no statistics: its matrices are pruned by
magnitude (`engine.perturb.magnitude`) instead, with a warning, and it is listed in the details.

The router itself (`mlp.gate`) and Qwen2-MoE's `shared_expert_gate` are never pruned (engine.anatomy.linears).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from engine.perturb.inputs import InputStats, SharedInput


class ExpertInputs:
    """What one experts module received during a calibration pass: the tokens and the router's top-k choice."""

    def __init__(self, module):
        self.module = module
        self.hidden: list[torch.Tensor] = []
        self.index: list[torch.Tensor] = []

    def attach(self):
        """Register the recording pre-hook on the module; returns its handle."""
        return self.module.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, _module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        index = args[1] if len(args) > 1 else kwargs["top_k_index"]
        hidden = hidden.detach().reshape(-1, hidden.shape[-1])
        self.hidden.append(hidden)
        self.index.append(index.detach().reshape(hidden.shape[0], -1).to(hidden.device))

    def routed(self, expert: int) -> torch.Tensor:
        """The hidden states of every calibration token the router sent to `expert`: [n, H]."""
        parts = [h[(i == expert).any(dim=-1)] for h, i in zip(self.hidden, self.index)]
        if not parts:
            return torch.zeros(0, 0)
        return torch.cat(parts)

    def counts(self) -> list[int]:
        """Calibration tokens routed to each expert."""
        n = self.module.num_experts
        return [sum(int((i == e).any(dim=-1).sum()) for i in self.index) for e in range(n)]


def first_projection(module) -> str:
    """The name of the experts' input projection: 'gate_up_proj' (gated) or 'up_proj'."""
    name = "gate_up_proj" if getattr(module, "has_gate", True) else "up_proj"
    if not isinstance(getattr(module, name, None), torch.Tensor) or not hasattr(module, "down_proj"):
        raise ValueError(
            f"unsupported experts layout in {type(module).__name__}: expected 3-D {name} and down_proj parameters"
        )
    return name


def expert_intermediate(module, expert: int, x: torch.Tensor, first_view) -> torch.Tensor:
    """The input `down_proj[expert]` receives for tokens `x`, computed as the module does it."""
    w = first_view.matrix()
    out = F.linear(x.to(device=w.device, dtype=w.dtype), w)
    if getattr(module, "has_bias", False):
        out = out + getattr(module, f"{first_view.attr}_bias")[expert]
    return module._apply_gate(out) if getattr(module, "has_gate", True) else module.act_fn(out)


def expert_stats(inputs: ExpertInputs, expert: int, views: list, gram: bool) -> dict:
    """{id(view): InputStats} for the views of one expert, from the tokens routed to it."""
    module = inputs.module
    first = first_projection(module)
    x = inputs.routed(expert)
    by_attr = {v.attr: v for v in views}
    stats = {}
    for v in views:
        s = InputStats(v.in_features, v.parameter.device, gram)
        if v.attr == first:
            s.add(x)
        elif v.attr == "down_proj":
            s.add(expert_intermediate(module, expert, x, by_attr[first]))
        else:
            raise ValueError(f"unsupported expert parameter {type(module).__name__}.{v.attr}")
        stats[id(v)] = s
    return stats


@torch.no_grad()
def prune_experts(layer: int, inputs: ExpertInputs, views: list, prune_layer, gram: bool, spec, details: dict) -> None:
    """Prune every expert of one experts module, one expert at a time, recording token counts in `details`.
    `prune_layer` is the method's (engine.perturb.layerwise.PruneLayer), given each expert matrix as its own input."""
    from engine.perturb.masks import magnitude_mask

    counts = inputs.counts()
    details.setdefault("expert_tokens", []).append({"layer": layer, "tokens": counts})
    details.setdefault("experts_without_tokens", [])
    for expert, count in enumerate(counts):
        own = [v for v in views if v.expert == expert]
        if not own:
            continue
        if count == 0:
            warnings.warn(
                f"layer {layer}, expert {expert}: the router sent it no calibration token; its matrices are "
                f"pruned by magnitude instead (more calibration samples would reach it)",
                stacklevel=2,
            )
            details["experts_without_tokens"].append([layer, expert])
            for v in own:
                w = v.matrix()
                v.assign(w.masked_fill(magnitude_mask(w, spec), 0))
            continue
        stats = expert_stats(inputs, expert, own, gram)
        shared = [SharedInput(stats[id(v)], [v]) for v in own]  # every expert input comes from the dense weights
        new = [(v, w) for group, ws in zip(shared, prune_layer(shared)) for v, w in zip(group.views, ws)]
        del stats
        for v, w in new:
            v.assign(w)
