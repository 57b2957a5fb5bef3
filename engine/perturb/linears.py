"""Finding the decoder layers and their linears in a causal LM, and measuring their sparsity.

The linears pruned are the ones inside the decoder layers: attention q/k/v/o and MLP gate/up/down on
Llama, Mistral and Qwen2 (named by their last attribute, e.g. `q_proj`). Embeddings, norms and the
LM head are never touched.
"""

from __future__ import annotations

from collections import OrderedDict


def decoder_layers(model):
    """The ModuleList of decoder blocks (model.model.layers on Llama-family models)."""
    for path in ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers"):
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if obj is not None:
            return obj
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__}")


def is_linear(module) -> bool:
    import torch.nn as nn

    if isinstance(module, nn.Linear):
        return True
    # bitsandbytes' Linear8bitLt / Linear4bit subclass nn.Linear; anything else with a 2-D weight and
    # in/out features is treated alike
    return hasattr(module, "in_features") and hasattr(module, "out_features") and hasattr(module, "weight")


def layer_linears(layer) -> OrderedDict[str, object]:
    """Linears of one decoder layer, keyed by their path inside it (e.g. 'self_attn.q_proj')."""
    found = OrderedDict()
    for name, module in layer.named_modules():
        if name and is_linear(module):
            found[name] = module
    return found


def linear_type(name: str) -> str:
    """'self_attn.q_proj' -> 'q_proj'."""
    return name.rsplit(".", 1)[-1]


def set_weight(linear, weight) -> None:
    """Give `linear` a new weight tensor without touching the one it had (which the dense model shares)."""
    import torch.nn as nn

    linear.weight = nn.Parameter(weight.to(linear.weight.dtype), requires_grad=False)


def sparsity_by_type(model) -> OrderedDict[str, dict]:
    """Zeros per linear type over all decoder layers: {type: {'zeros': z, 'total': n, 'sparsity': z/n}}.

    The key 'all' sums every type. Quantized linears (no float weight) are skipped.
    """
    import torch

    table: OrderedDict[str, dict] = OrderedDict()
    for layer in decoder_layers(model):
        for name, lin in layer_linears(layer).items():
            w = lin.weight
            if not torch.is_floating_point(w) or w.dim() != 2:
                continue
            row = table.setdefault(linear_type(name), {"zeros": 0, "total": 0})
            row["zeros"] += int((w == 0).sum())
            row["total"] += w.numel()
    total = {"zeros": sum(r["zeros"] for r in table.values()), "total": sum(r["total"] for r in table.values())}
    table["all"] = total
    for row in table.values():
        row["sparsity"] = row["zeros"] / row["total"] if row["total"] else 0.0
    return table
