"""A model's config.json read without torch or a download, and the figures the early checks take from it."""

from __future__ import annotations

from pathlib import Path

from engine.errors import HieruiError
from engine.models import hub, names
from engine.models.embedded import embedded_dir
from engine.models.random_shapes import parse_random
from engine.models.tiny import TINY_SHAPE, TINY_TOKENS

# tiny-random's config.json values that the early checks read, without torch (engine.models.tiny)
TINY_CONFIG = {"model_type": "llama", **TINY_TOKENS, **TINY_SHAPE}  # as its config.json would say


def read_config(name: str) -> dict | None:
    """A model's config.json as a dict, without a download: tiny-random, a local checkpoint, the embedded default
    once converted, a converted GGUF, a hub model in the local hub cache. None where it cannot be known yet (not
    fetched or converted): the checks that need it then happen after loading. One line (exit 2) for a config
    without its model_type or shape (check_config) and, for a local checkpoint, for a model_type transformers
    does not know (check_model_type, which imports transformers; the others read no torch)."""
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
    config = config_from_file(path)
    if config is None:
        return None
    check_config(config, name)
    if ref.kind == "local":  # the user's own config.json: a type transformers does not know fails here, short
        check_model_type(config["model_type"], name)
    return config


# a tokenizer transformers can load is one of these (fast; sentencepiece; byte-level BPE; WordPiece)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "tiktoken.model")


def check_tokenizer_files(name: str) -> None:
    """One line (exit 2) for a local checkpoint without a tokenizer (a folder of weights and config only), before
    anything loads: transformers would fail after the weights with a page about converting slow tokenizers."""
    ref = names.resolve(name)
    folder = Path(ref.source)
    if ref.kind == "local" and folder.is_dir() and not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise HieruiError(
            f"{name}: no tokenizer in {folder} (none of {', '.join(TOKENIZER_FILES)}): copy the tokenizer files of "
            f"the model it was made from into it"
        )


def check_weight_files(name: str) -> None:
    """One line (exit 2) for a local checkpoint whose weight files are broken, before anything loads: a
    *.safetensors file whose header cannot be read or whose tensors the file does not cover (cut short), or a shard
    its model.safetensors.index.json names that is not there. Reads each file's header only, never a tensor."""
    ref = names.resolve(name)
    folder = Path(ref.source)
    if ref.kind != "local" or not folder.is_dir():
        return
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = (config_from_file(index) or {}).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise HieruiError(f"{index}: no weight_map of tensor names to files (a broken index)")
        absent = sorted({f for f in weight_map.values() if not (folder / f).is_file()})
        if absent:
            raise HieruiError(f"{name}: {index.name} names {len(absent)} weight file(s) not in {folder}: {absent[0]}")
    for file in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="numpy") as f:  # the header, checked against the file's length
                f.keys()
        except Exception as e:  # safetensors' SafetensorError (its own class), OSError
            cause = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
            raise HieruiError(f"{file}: not a readable safetensors file ({cause})") from None


# The fields a decoder's shape is read from, under the names families give them (transformers maps the others by
# each config class's attribute_map, which check_config asks only where none of these is there)
SHAPE_FIELDS = {
    "hidden_size": ("hidden_size", "n_embd", "d_model", "dim", "hidden_dim", "model_dim"),
    "num_hidden_layers": ("num_hidden_layers", "n_layer", "n_layers", "num_layers"),
    "vocab_size": ("vocab_size", "padded_vocab_size"),
}
# other sizes a config may give (null where the family derives them): each must then be a positive integer
SIZE_FIELDS = (
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "n_head",
    "n_inner",
    "ffn_dim",
    "max_position_embeddings",
    "n_positions",
)


def check_config(config: dict, name: str) -> dict:
    """A config.json read from a file, checked before anything is planned or loaded: it names a model_type and
    gives the decoder's shape (SHAPE_FIELDS). transformers would fill a missing field with its class's default
    (a Llama config.json holding only model_type becomes a 7B shape); here that is one line, exit 2. Returns it."""
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type.strip():
        raise HieruiError(f"{name}: its config.json names no model_type (not a transformers checkpoint)")
    present = {field: [n for n in names if config.get(n) is not None] for field, names in SHAPE_FIELDS.items()}
    if not all(present.values()):  # a family's own names for them, from its config class (imports transformers)
        aliases = getattr(_config_class(model_type, name), "attribute_map", {}) or {}
        for field, keys in present.items():
            if not keys and config.get(aliases.get(field)) is not None:
                keys.append(aliases[field])
    missing = [field for field, keys in present.items() if not keys]
    if missing:
        raise HieruiError(
            f"{name}: its config.json lacks {', '.join(missing)}: transformers would fill in the defaults of "
            f"{_short(model_type)}, another model's shape; give the checkpoint's complete config.json"
        )
    for key in [k for keys in present.values() for k in keys] + [k for k in SIZE_FIELDS if config.get(k) is not None]:
        if config_int(config, key) is None:  # "big", -5, 0, 2.5, true: transformers' traceback, or a model of nothing
            raise HieruiError(f"{name}: its config.json's {key} is {_short(config[key])}, not a positive integer")
    return config


def check_model_type(model_type, name: str) -> None:
    """One short line (exit 2) for a model_type this transformers does not know (transformers' own message lists
    every type it knows: 12 KB on one line). Imports transformers."""
    _config_class(model_type, name)


def _config_class(model_type, name: str):
    from transformers import CONFIG_MAPPING, __version__

    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise HieruiError(
            f"{name}: its config.json's model_type {_short(model_type)} is not one transformers {__version__} "
            f"knows: use a supported model, or a transformers that has it"
        )
    return CONFIG_MAPPING[model_type]


def _short(value, width: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 1] + "…'"


def config_from_file(path: Path | None) -> dict | None:
    """A config.json as a dict (a multimodal wrapper's language-model part merged in); None where there is no such
    file (not fetched or converted yet). One line (exit 2) naming the file where it is there but not a JSON
    object (unreadable, not UTF-8, not JSON, a list): transformers would end in a traceback reading it."""
    import json

    if path is None or not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise HieruiError(f"{path}: not a JSON file (not UTF-8 text)") from None
    except ValueError as e:  # json's JSONDecodeError: where the JSON breaks
        raise HieruiError(f"{path}: not a JSON file ({str(e)[:100]})") from None
    except (OSError, RecursionError) as e:
        raise HieruiError(f"{path}: cannot be read ({getattr(e, 'strerror', None) or type(e).__name__})") from None
    if not isinstance(config, dict):
        raise HieruiError(f"{path}: not a config (a JSON {type(config).__name__}, not an object)")
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
