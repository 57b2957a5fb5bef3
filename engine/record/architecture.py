"""What kind of decoder a model is, from its config: recorded in sessions and batch.json, shown by replay.

`describe(config)` reads a transformers config object or a config.json dict (torch-free) and returns
{model_type, layers, hidden_size, heads, kv_heads, attention_types, experts, experts_per_token}.
`attention_types` lists each layer's attention ("full" or "sliding"); None where every layer attends
to the whole context. `summary(arch)` is the one-line form: "gemma2 · 4 layers (2 sliding, 2 full) · 4/2 heads".
"""

from __future__ import annotations


def _get(config, *names):
    for name in names:
        value = config.get(name) if isinstance(config, dict) else getattr(config, name, None)
        if value is not None:
            return value
    return None


def _count(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def attention_types(config) -> list[str] | None:
    """Each layer's attention, "full" or "sliding"; None when every layer is full attention."""
    layers = _count(_get(config, "num_hidden_layers", "n_layer", "num_layers"))
    types = _get(config, "layer_types")
    if isinstance(types, list) and types:
        kinds = ["sliding" if "sliding" in str(t) else "full" for t in types]
    elif _get(config, "sliding_window") and _get(config, "use_sliding_window") is not False and layers:
        kinds = ["sliding"] * layers  # e.g. Mistral: one window on every layer
    else:
        return None
    return kinds if "sliding" in kinds else None


def describe(config) -> dict:
    """The architecture of a model from its config (object or dict)."""
    if hasattr(config, "get_text_config"):
        config = config.get_text_config(decoder=True)
    elif isinstance(config, dict) and isinstance(config.get("text_config"), dict):
        config = {**config, **config["text_config"]}
    heads = _count(_get(config, "num_attention_heads", "n_head"))
    return {
        "model_type": str(_get(config, "model_type") or "unknown"),
        "layers": _count(_get(config, "num_hidden_layers", "n_layer", "num_layers")),
        "hidden_size": _count(_get(config, "hidden_size", "n_embd", "d_model")),
        "heads": heads,
        "kv_heads": _count(_get(config, "num_key_value_heads")) or heads,
        "attention_types": attention_types(config),
        "experts": _count(_get(config, "num_local_experts", "num_experts", "n_routed_experts")),
        "experts_per_token": _count(_get(config, "num_experts_per_tok", "moe_top_k")),
    }


def summary(arch: dict | None) -> str:
    """One line: model type, layers (with the attention kinds where they mix), heads, experts."""
    if not isinstance(arch, dict):
        return ""
    parts = [str(arch.get("model_type") or "unknown")]
    layers = arch.get("layers")
    if isinstance(layers, int):
        text = f"{layers} layers"
        types = arch.get("attention_types")
        if isinstance(types, list) and types:
            sliding = sum(1 for t in types if t == "sliding")
            mix = f"{sliding} sliding, {len(types) - sliding} full"
            text += " (all sliding-window)" if sliding == len(types) else f" ({mix})"
        parts.append(text)
    heads, kv = arch.get("heads"), arch.get("kv_heads")
    if isinstance(heads, int):
        parts.append(f"{heads}/{kv} heads" if isinstance(kv, int) and kv != heads else f"{heads} heads")
    experts = arch.get("experts")
    if isinstance(experts, int) and experts:
        top = arch.get("experts_per_token")
        parts.append(f"{experts} experts" + (f", top-{top}" if isinstance(top, int) else ""))
    return " · ".join(parts)
