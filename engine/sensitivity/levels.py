"""Which specs a sensitivity run can measure per unit, and its levels.

A unit is perturbed by taking its tensors from a model the spec perturbed whole, so the spec must change weights
in place (magnitude, wanda, sparsegpt and their N:M) or replace the decoder linears by quantized ones (int8, nf4):
the method registry's `changes` says which (engine.record.methods). `--sparsities 0.3,0.5,0.7` measures each unit at
several sparsities of an unstructured pruning spec (each level `METHOD:S`, the spec's own sparsity replaced)."""

from __future__ import annotations

from dataclasses import replace

from engine.errors import HieruiError

MEASURABLE = ("weights", "quantized")


def check_spec(spec) -> None:
    """One line for a spec no unit can be perturbed with alone (a drop, a checkpoint, none)."""
    declared = spec.declared
    if declared is None or declared.changes not in MEASURABLE:
        kind = {
            "modules": "drops whole sublayers",
            "model": "is a whole model of its own",
            "nothing": "changes nothing",
        }
        why = kind.get(getattr(declared, "changes", ""), "does not change weights")
        from engine.record.methods import methods

        measurable = ", ".join(m.name for m in methods() if m.changes in MEASURABLE)
        raise HieruiError(
            f"--prune {spec}: {why}; hierui sensitivity measures the methods that change or quantize weights "
            f"({measurable})"
        )


def parse_sparsities(text: str | None) -> list[float] | None:
    """`--sparsities 0.3,0.5,0.7`: each in (0, 1), no repeats; None when not given."""
    if text is None:
        return None
    values: list[float] = []
    for part in text.split(","):
        part = part.strip()
        try:
            value = float(part)
        except ValueError:
            raise HieruiError(f"--sparsities {text}: '{part}' is not a number (write e.g. 0.3,0.5,0.7)") from None
        if not 0 < value < 1:
            raise HieruiError(f"--sparsities {text}: {part} is outside (0, 1)")
        if value in values:
            raise HieruiError(f"--sparsities {text}: {part} is given twice")
        values.append(value)
    return values


def levels(spec, sparsities: list[float] | None) -> list:
    """The specs a run measures each unit at: `spec` alone, or `spec` at each of `sparsities` (an unstructured
    pruning spec without an allocation only: N:M and quantization fix their own level)."""
    check_spec(spec)
    if sparsities is None:
        return [spec]
    if spec.sparsity is None:
        what = "an N:M pattern fixes its sparsity" if spec.n is not None else "quantization has no sparsity"
        raise HieruiError(f"--sparsities does not go with --prune {spec}: {what}")
    if spec.allocation is not None:
        raise HieruiError(
            f"--sparsities does not go with --prune {spec}: each level is the whole model at one sparsity; "
            "leave out the allocation (@…)"
        )
    return [replace(spec, sparsity=s) for s in sparsities]
