"""The units a sensitivity run perturbs one at a time (`--unit`):

layer      decoder layer ℓ: every weight matrix in it (engine.anatomy.linears.WeightView)
sublayer   ℓ's attention matrices, and ℓ's MLP matrices (everything else in the layer: the MLP, OPT's inline
           fc1/fc2, experts), as the view's path inside the layer starts with an attention name or not
matrix     each weight matrix alone, named layers.{ℓ}.{its path} (as @FILE.json allocation files name them)
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.anatomy.sublayers import ATTENTION_NAMES
from engine.errors import HieruiError

UNITS = ("layer", "sublayer", "matrix")
SUBLAYERS = ("attention", "mlp")


@dataclass(frozen=True)
class Unit:
    """One unit: its name, its decoder layer, its sublayer (attention, mlp; None for a whole layer), its matrix
    (the view's path inside the layer; None unless --unit matrix) and the names of its views (WeightView.name)."""

    name: str
    layer: int
    sublayer: str | None
    matrix: str | None
    views: tuple[str, ...]
    weights: int  # weights in its matrices


def check_unit(kind: str) -> str:
    if kind not in UNITS:
        raise HieruiError(f"unknown --unit '{kind}': use {', '.join(UNITS)}")
    return kind


def sublayer_of(view_name: str) -> str:
    """'attention' where a view's path inside its layer starts with an attention module's name (self_attn, attn,
    attention: engine.anatomy.sublayers.ATTENTION_NAMES), else 'mlp'."""
    return "attention" if view_name.split(".", 1)[0] in ATTENTION_NAMES else "mlp"


def units(model, kind: str) -> list[Unit]:
    """The units of `model` for `--unit kind`, layer by layer (each layer's attention before its MLP; matrices
    in module order)."""
    from engine.anatomy.linears import decoder_layers, weight_views

    check_unit(kind)
    out: list[Unit] = []
    for index, layer in enumerate(decoder_layers(model)):
        views = weight_views(layer, index)
        if kind == "layer":
            groups = [(f"layers.{index}", None, None, views)]
        elif kind == "sublayer":
            groups = [
                (f"layers.{index}.{part}", part, None, [v for v in views if sublayer_of(v.name) == part])
                for part in SUBLAYERS
            ]
        else:
            groups = [(f"layers.{index}.{v.name}", sublayer_of(v.name), v.name, [v]) for v in views]
        for name, part, matrix, members in groups:
            if members:
                count = sum(v.out_features * v.in_features for v in members)
                out.append(Unit(name, index, part, matrix, tuple(v.name for v in members), count))
    if not out:
        raise HieruiError(f"{type(model).__name__} has no decoder weight matrix to perturb")
    return out
