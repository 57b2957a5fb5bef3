"""Sparsity of a model's decoder weight matrices: zeros per linear type and per MoE expert (streamed layers read
one at a time)."""

from collections import OrderedDict

from engine.anatomy.linears import decoder_layers, weight_views


def _resident_views(model):
    """Each WeightView of `model`, its layer's weights in while it is read (streamed layers: engine.place)."""
    from engine.place.streaming import each_resident

    for index, layer in each_resident(decoder_layers(model)):
        yield from weight_views(layer, index)


def sparsity_by_type(model) -> OrderedDict[str, dict]:
    """Zeros per linear type over all decoder layers: {type: {'zeros': z, 'total': n, 'sparsity': z/n}}.

    Every WeightView counts (Conv1D and expert slices included, routers not); the key 'all' sums every type.
    Quantized linears (no float weight) are not views, so a quantized model has 'all' with total 0.
    """
    return count_zeros(model)[0]


def count_zeros(model) -> tuple[OrderedDict[str, dict], list[float | None]]:
    """(sparsity_by_type's table, the fraction of zero weights of each decoder layer 0 … L − 1, None for a layer
    without float weights), in one pass over the weights."""
    table: OrderedDict[str, dict] = OrderedDict()
    layers: dict[int, list[int]] = {}
    for view in _resident_views(model):
        w = view.matrix()
        zeros = int((w == 0).sum())
        row = table.setdefault(view.type, {"zeros": 0, "total": 0})
        row["zeros"] += zeros
        row["total"] += w.numel()
        layer = layers.setdefault(view.layer, [0, 0])
        layer[0] += zeros
        layer[1] += w.numel()
    total = {"zeros": sum(r["zeros"] for r in table.values()), "total": sum(r["total"] for r in table.values())}
    table["all"] = total
    for row in table.values():
        row["sparsity"] = row["zeros"] / row["total"] if row["total"] else 0.0
    count = len(decoder_layers(model))
    by_layer = [layers[i][0] / layers[i][1] if layers.get(i, [0, 0])[1] else None for i in range(count)]
    return table, by_layer


def sparsity_by_expert(model) -> list[dict]:
    """Per expert of every MoE layer, the zeros over its matrices (its slices of gate_up_proj and down_proj):
    [{'layer', 'expert', 'zeros', 'total', 'sparsity'}]; empty for a model without expert tensors."""
    rows: OrderedDict[tuple, dict] = OrderedDict()
    for view in _resident_views(model):
        if view.expert is None:
            continue
        w = view.matrix()
        row = rows.setdefault((view.layer, view.expert), {"layer": view.layer, "expert": view.expert, "zeros": 0})
        row["zeros"] += int((w == 0).sum())
        row["total"] = row.get("total", 0) + w.numel()
    for row in rows.values():
        row["sparsity"] = row["zeros"] / row["total"] if row["total"] else 0.0
    return list(rows.values())
