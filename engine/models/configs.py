"""A model's config.json read without torch or a download, and the figures the early checks take from it."""

from __future__ import annotations

from pathlib import Path

from engine.models import hub, names
from engine.models.embedded import embedded_dir
from engine.models.random_shapes import parse_random
from engine.models.tiny import TINY_SHAPE, TINY_TOKENS

# tiny-random's config.json values that the early checks read, without torch (engine.models.tiny)
TINY_CONFIG = {**TINY_TOKENS, **TINY_SHAPE}


def read_config(name: str) -> dict | None:
    """A model's config.json as a dict, without torch or a download: tiny-random, a local checkpoint, the
    embedded default once converted, a converted GGUF, a hub model in the local hub cache. None where it
    cannot be known yet (not fetched or converted): the checks that need it then happen after loading."""
    ref = names.resolve(name)  # through the module, as in engine.models.hub
    if ref.kind == "tiny":
        return dict(TINY_CONFIG)
    if ref.kind == "zoo":
        from engine.models.zoo import zoo_config_dict

        return zoo_config_dict(ref.source)
    if ref.kind == "random":  # the shape as shipped; the vocabulary becomes the tokenizer's when it is built
        return dict(parse_random(ref.name).config)
    if ref.kind == "local":
        path = Path(ref.source) / "config.json"
    elif ref.kind == "embedded":
        path = embedded_dir() / "config.json"
    elif ref.kind == "gguf":
        path = hub.gguf_folder(ref) / "config.json"
    else:
        found = hub.hub_cache_dir(ref.source)
        path = Path(found) / "config.json" if found else None
    return config_from_file(path)


def config_from_file(path: Path | None) -> dict | None:
    """A config.json as a dict (a multimodal wrapper's language-model part merged in); None if unreadable."""
    import json

    if path is None or not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(config, dict):
        return None
    if isinstance(config.get("text_config"), dict):  # a multimodal wrapper: the language model's part
        config = {**config, **config["text_config"]}
    return config


def config_int(config: dict | None, key: str) -> int | None:
    value = (config or {}).get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def smallest_linear(config: dict | None) -> tuple[int, int] | None:
    """(the fewest input features of a decoder linear, the fewest weights of one) from a Llama-style config,
    or None where the config does not say. Attention q/k/v/o and MLP gate/up/down."""
    hidden = config_int(config, "hidden_size")
    inter = config_int(config, "intermediate_size")
    heads = config_int(config, "num_attention_heads")
    if not (hidden and inter and heads):
        return None
    kv = config_int(config, "num_key_value_heads") or heads
    head_dim = config_int(config, "head_dim") or hidden // heads
    ins = min(hidden, heads * head_dim, inter)
    numel = min(hidden * kv * head_dim, hidden * heads * head_dim, hidden * inter)
    return ins, numel
