"""The `sparsity` check (pruning only): every prunable matrix has exactly the zeros the spec asks for, in the
method's own comparison group.

int(numel·s) per matrix (magnitude, sparsegpt), int(cols·s) per output row (wanda), M−N in every group of M
consecutive inputs of a row (N:M); with a layer allocation (`wanda:0.6@owl`), s is the matrix's own, as the
pruning handed it to the method (the report's details.allocation.given, engine.perturb.allocated). A weight the
dense model already had at zero may stay zero beyond that (a de-quantized model has some): the zeros of a group
must lie in [k, max(k, dense zeros)]. The value is the largest |sparsity − requested| of a matrix.
"""

from __future__ import annotations

import torch

from engine.check.result import CheckResult
from engine.errors import HieruiError
from engine.perturb.spec import Spec


def weight_views(model) -> list[tuple[str, torch.Tensor, torch.Tensor | None]]:
    """(label, matrix [out, in], the parameter holding it or None) of every prunable matrix:
    engine.anatomy.linears.model_weight_views where it exists, else the decoder linears' 2-D weights."""
    from engine.anatomy import linears

    views = getattr(linears, "model_weight_views", None)
    if views is not None:
        out = []
        for v in views(model):
            expert = getattr(v, "expert", None)
            label = f"layer {v.layer} {v.name}"
            if expert is not None and f"[{expert}]" not in v.name:
                label += f" expert {expert}"
            owner = next(
                (
                    getattr(v, a)
                    for a in ("parameter", "param", "weight", "tensor")
                    if isinstance(getattr(v, a, None), torch.Tensor)
                ),
                None,
            )
            out.append((label, v.matrix(), owner))
        return out
    out = []
    for i, layer in enumerate(linears.decoder_layers(model)):
        for name, lin in linears.layer_linears(layer).items():
            w = lin.weight
            if torch.is_floating_point(w) and w.dim() == 2:
                out.append((f"layer {i} {name}", w, w))
    return out


def _zeros_per_group(w: torch.Tensor, spec: Spec) -> tuple[torch.Tensor, int, str]:
    """Zeros of every comparison group of `w` [out, in], the zeros the spec asks for in each, and the group."""
    zeros = w == 0
    rows, cols = w.shape
    if spec.n is not None:
        if cols % spec.m:
            raise HieruiError(f"{cols} inputs are not a multiple of M = {spec.m}", 1)
        return zeros.reshape(rows, cols // spec.m, spec.m).sum(-1).flatten(), spec.m - spec.n, f"group of {spec.m}"
    if spec.declared.per_row:
        return zeros.sum(1), int(cols * spec.sparsity), f"row of {cols}"
    return zeros.sum().reshape(1), int(w.numel() * spec.sparsity), "matrix"


def _own_spec(spec: Spec, label: str, given: dict | None) -> Spec:
    """The spec a matrix labelled 'layer ℓ NAME[ expert e]' was pruned with: `spec`, or under a layer allocation
    the spec at the sparsity handed to the method for it."""
    if not given:
        return spec
    from dataclasses import replace

    _, layer, name = label.split(" ", 2)
    return replace(spec, sparsity=given[f"layers.{layer}.{name.split(' expert ')[0]}"], allocation=None)


def check_sparsity(pair) -> CheckResult:
    """Exactly the zeros the spec asks for, per comparison group of every prunable matrix."""
    spec_ = pair.spec
    spec = str(spec_)
    target = spec_.target_sparsity
    dense = {label: m for label, m, _ in weight_views(pair.dense)}
    views = weight_views(pair.perturbed)
    if not views:
        return CheckResult(spec, "sparsity", "fail", reason="no prunable matrix found in the perturbed model")
    worst = allowance = 0.0
    failures = []
    measure = ""
    given = ((getattr(pair, "report", None) and pair.report.details.get("allocation")) or {}).get("given")
    for label, matrix, _ in views:
        w = matrix.detach()
        own = _own_spec(spec_, label, given)
        if label not in dense:
            failures.append(f"{label} has no dense counterpart")
            continue
        d = dense[label].detach()
        if d.shape != w.shape:
            failures.append(f"{label}: shape {tuple(w.shape)}, dense {tuple(d.shape)}")
            continue
        got, k, group = _zeros_per_group(w, own)
        had, _, _ = _zeros_per_group(d, own)
        if given:  # this matrix's own target: the whole count its sparsity gives
            target = k * got.numel() / w.numel()
        high = torch.clamp(had, min=k)
        bad = (got < k) | (got > high)
        numel = w.numel()
        sparsity = float(got.sum()) / numel
        if abs(sparsity - target) > worst or not measure:
            worst, measure = max(worst, abs(sparsity - target)), label
        lo, hi = k * got.numel() / numel, float(high.sum()) / numel
        allowance = max(allowance, target - lo, hi - target)
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            failures.append(
                f"{label}: {int(bad.sum())} of {got.numel()} groups off, e.g. a {group} with {int(got[i])} zeros, "
                f"wanted {k}"
            )
    if failures:
        extra = f" (+{len(failures) - 1} more matrices)" if len(failures) > 1 else ""
        return CheckResult(spec, "sparsity", "fail", worst, allowance, failures[0] + extra, measure)
    return CheckResult(
        spec, "sparsity", "pass", worst, allowance, f"{len(views)} matrices at {target:.2%}, worst {measure}", measure
    )
