"""One unit of a perturbed model put into the dense model, and taken out again (`swapped`).

For each weight matrix of the unit (the dense layer's WeightView), where the perturbed layer holds:

- the same kind of module with a new weight (pruning): the dense module's weight Parameter is replaced by the
  perturbed model's (no copy), and put back after;
- another module at that path (int8/nf4: a bitsandbytes linear): that module is put into the dense layer in place of
  the dense one (shared, not copied), and the dense one put back after;
- a slice of a 3-D experts parameter: the perturbed parameter where the unit holds every expert of it, else a new
  parameter, the dense one with the unit's experts' slices taken from the perturbed one.

Nothing is written into a dense tensor: the dense model is the very same tensors again afterwards, however the block
inside ends (tests/test_sensitivity.py checks both)."""

from __future__ import annotations

from contextlib import contextmanager


def _paths(layer) -> dict[int, str]:
    return {id(module): name for name, module in layer.named_modules()}


def _changes(dense_layer, perturbed_layer, views, wanted: set[str]) -> list[tuple[str, str, object]]:
    """[(module path, attribute or '' for the whole module, the perturbed value)] of the unit's views `wanted`."""
    import torch.nn as nn

    paths = _paths(dense_layer)
    found: list[tuple[str, str, object]] = []
    experts: dict[tuple[str, str], list[int]] = {}
    totals: dict[tuple[str, str], int] = {}
    for v in views:
        path = paths[id(v.module)]
        if v.expert is not None:
            totals[(path, v.attr)] = totals.get((path, v.attr), 0) + 1
            if v.name in wanted:
                experts.setdefault((path, v.attr), []).append(v.expert)
            continue
        if v.name not in wanted:
            continue
        other = perturbed_layer.get_submodule(path)
        if type(other) is not type(v.module):  # a quantized replacement
            found.append((path, "", other))
        else:
            found.append((path, v.attr, getattr(other, v.attr)))
    for (path, attr), chosen in experts.items():
        theirs = getattr(perturbed_layer.get_submodule(path), attr)
        if len(chosen) == totals[(path, attr)]:
            found.append((path, attr, theirs))
            continue
        mine = getattr(dense_layer.get_submodule(path), attr).detach().clone()
        for e in chosen:
            mine[e] = theirs[e].to(mine.device, mine.dtype)
        found.append((path, attr, nn.Parameter(mine, requires_grad=False)))
    return found


@contextmanager
def swapped(dense_layer, perturbed_layer, views, wanted):
    """Inside the block, `dense_layer` holds the perturbed values of the views named in `wanted` (WeightView.name;
    `views`: the dense layer's weight_views), taken from `perturbed_layer` (the same layer of the perturbed model)."""
    changes = _changes(dense_layer, perturbed_layer, views, set(wanted))
    saved = []
    try:
        for path, attr, value in changes:
            if attr:
                module = dense_layer.get_submodule(path)
                saved.append((path, attr, module.__dict__["_parameters"][attr]))
                module._parameters[attr] = value
            else:
                saved.append((path, "", dense_layer.get_submodule(path)))
                dense_layer.set_submodule(path, value)
        yield
    finally:
        for path, attr, old in reversed(saved):
            if attr:
                dense_layer.get_submodule(path)._parameters[attr] = old
            else:
                dense_layer.set_submodule(path, old)
