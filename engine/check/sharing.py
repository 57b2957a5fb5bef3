"""The `sharing` check: the perturbed model shares every tensor the perturbation need not change with the dense
model, and the dense model is not changed by perturbing and stepping.

The tensors a spec must replace: the prunable matrices for pruning (engine.check.sparsity.weight_views), the
quantized linears' weights for int8/nf4, nothing for none and the drops (a dropped module is left out, not
copied). The value is the fraction of the perturbed model's parameter bytes that are wrongly copied or wrongly
still shared (tolerance 0); the table shows the fraction actually shared (engine.perturb.pair.shared_fraction).
"""

from __future__ import annotations

import math

import torch

from engine.check.result import CheckResult
from engine.check.sparsity import weight_views
from engine.errors import HieruiError


def _storage(t) -> int:
    return t.untyped_storage().data_ptr()


_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}  # an integer type per element size


def fingerprint(model) -> dict[str, tuple[int, int]]:
    """Per parameter, the sums (in int64, exact: no rounding, the same whatever the summation order) of its
    elements' bit patterns read as integers, and of the same with the sign bit cleared (the bits of |w|): any
    in-place change of one weight changes the first (by its bit pattern's difference, never 0), a sign flip
    changes the first, and zeroing nonzero weights (pruning in place) lowers the second (float64 parameters: both
    sums wrap modulo 2⁶⁴). Several times faster than float64 sums of w and |w|, which a change below their
    rounding could pass unseen."""
    out = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.is_floating_point() and p.device.type != "meta":
                kind = _BITS[p.element_size()]
                bits = p.detach().view(kind)
                magnitude = bits.bitwise_and(torch.iinfo(kind).max)
                out[name] = (int(bits.sum(dtype=torch.int64)), int(magnitude.sum(dtype=torch.int64)))
    return out


def _must_replace(pair) -> set[int]:
    """Storages of the dense model the perturbation must replace (empty for none and drops)."""
    family = pair.spec.family
    if family not in ("prune", "quant"):
        return set()
    dense_ptrs = {_storage(p) for p in pair.dense.parameters()}
    found = set()
    for label, matrix, owner in weight_views(pair.dense):
        ptr = _storage(owner if owner is not None else matrix)
        if ptr not in dense_ptrs:
            raise HieruiError(f"cannot tell which parameter holds {label} (its matrix is a copy)", 1)
        found.add(ptr)
    if not found:
        raise HieruiError("no prunable matrix found in the dense model", 1)
    return found


def check_sharing(pair, before: dict) -> CheckResult:
    """Every tensor the spec need not change is the dense model's own; those it must change are not; the dense
    model itself is unchanged."""
    from engine.perturb.pair import shared_fraction

    spec = str(pair.spec)
    must = _must_replace(pair)
    dense_by_name = {n: _storage(p) for n, p in pair.dense.named_parameters()}
    dense_ptrs = set(dense_by_name.values())
    total = wrong = 0
    copied, kept = [], []
    seen: set[int] = set()
    for name, p in pair.perturbed.named_parameters():
        ptr = _storage(p)
        if ptr in seen:
            continue
        seen.add(ptr)
        nbytes = p.untyped_storage().nbytes()
        total += nbytes
        if ptr in dense_ptrs:
            if ptr in must:
                kept.append(name)
                wrong += nbytes
        elif dense_by_name.get(name) not in must:  # a new tensor that does not stand for a replaced one
            copied.append(name)
            wrong += nbytes
    after = fingerprint(pair.dense)
    changed = [n for n, v in before.items() if after.get(n) != v]
    fraction = shared_fraction(pair.dense, pair.perturbed)
    measure = f"{fraction:.2%} shared"
    problems = []
    if copied:
        problems.append(f"{len(copied)} tensors copied that the spec does not change ({_names(copied)})")
    if kept:
        problems.append(f"{len(kept)} tensors it must replace still the dense ones ({_names(kept)})")
    if changed:
        problems.append(f"the dense model changed in place: {_names(changed)}")
    value = wrong / total if total else 0.0
    if changed and not value:
        value = math.inf
    if problems:
        return CheckResult(spec, "sharing", "fail", value, 0.0, "; ".join(problems), measure)
    replaced = "no tensor replaced" if not must else f"{len(must)} tensors replaced"
    return CheckResult(spec, "sharing", "pass", 0.0, 0.0, f"{measure} of the parameter bytes, {replaced}", measure)


def _names(names: list[str], shown: int = 3) -> str:
    more = f", … {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more
