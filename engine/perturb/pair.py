"""ModelPair: the dense model and its perturbed copy, sharing every tensor the perturbation did not change.

`clone_sharing` makes the perturbed copy: a new module tree whose parameters and buffers are the very
same tensors as the dense model's. A perturbation then replaces only what it changes (a pruned weight,
a dropped sublayer, a quantized linear), so embeddings, norms and the LM head are never copied.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any


def clone_sharing(model):
    """A structural copy of `model` whose parameters and buffers are the dense model's own tensors."""
    from engine.place.streaming import clone_streamed, is_streamed

    if is_streamed(model):  # streamed layers: the copy streams them too
        return clone_streamed(model)
    memo: dict[int, Any] = {}
    for tensor in list(model.parameters()) + list(model.buffers()):
        memo[id(tensor)] = tensor
    clone = copy.deepcopy(model, memo)
    return clone


def unchanged(job):
    """none: the dense model's clone, sharing every tensor (engine.perturb.job.Job)."""
    return clone_sharing(job.dense)


def shared_fraction(dense, perturbed) -> float:
    """Fraction of the perturbed model's parameter bytes that live in the dense model's storage."""
    dense_ptrs = {p.untyped_storage().data_ptr() for p in dense.parameters()}
    seen: set[int] = set()
    shared = total = 0
    for p in perturbed.parameters():
        ptr = p.untyped_storage().data_ptr()
        if ptr in seen:
            continue
        seen.add(ptr)
        nbytes = p.untyped_storage().nbytes()
        total += nbytes
        shared += nbytes if ptr in dense_ptrs else 0
    return shared / total if total else 1.0


@dataclass
class ModelPair:
    """A dense model, its perturbed copy, their shared tokenizer, and what the perturbation did."""

    dense: Any
    perturbed: Any
    tokenizer: Any
    spec: Any
    report: Any = None  # engine.perturb.PerturbReport
    loaded: Any = None  # engine.models.loading.LoadedModel of the dense model
    # for each dense hidden-state index ℓ = 0..L, the perturbed model's index that corresponds to it: the
    # identity, except after blockdrop (then the state after the last kept block) and for a checkpoint with
    # another number of layers or hidden size, where −1 marks a dense index without counterpart (its hidden-state
    # metrics are null); set by perturb(), applied by `mapped_hidden`
    hidden_map: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.hidden_map:
            self.hidden_map = list(range(self.dense.config.num_hidden_layers + 1))


def mapped_hidden(h_d, h_p, index):
    """The perturbed hidden states at the dense model's indices ℓ = 0..L, shaped like `h_d` (B, L+1, H).

    `index` (a long tensor, `ModelPair.hidden_map`) gives the perturbed index for each ℓ; where it is −1, or
    everywhere when the two hidden sizes differ, the result is NaN, which the metrics turn into null values.
    """
    import torch

    if h_p.shape[-1] != h_d.shape[-1]:
        return torch.full_like(h_d, float("nan"))
    out = h_p.index_select(1, index.clamp(min=0))
    missing = index < 0
    if bool(missing.any()):
        out = out.masked_fill(missing.view(1, -1, 1), float("nan"))
    return out
