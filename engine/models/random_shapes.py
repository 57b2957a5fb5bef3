"""`random:NAME`: a model with random weights in the shape of a known model, for timing and memory only.

    random:llama-7b            a shipped shape (engine/models/shapes/*.json: the published config.json of the model,
                               without weights): llama-7b, llama3-8b, qwen2.5-7b, mixtral-8x7b, qwen2.5-0.5b,
                               qwen2.5-1.5b, smollm2-135m
    random:/path/config.json   the shape of any transformers config file (or of a folder holding one)
    random:llama-7b@3          another seed (default 0)

Its text means nothing: it measures how long pruning and stepping take and how much memory they need at a real
model's size, where the real weights cannot be had (no hub, no disk room). Everything it shows is labelled
"random weights" (ModelRef.display, so the session header and the explorer's header say it).

The model is built directly in the target dtype on the target device: the modules are created under
`torch.device(device)` with transformers' own initialisation switched off (`no_init_weights`, so nothing is
written twice), then each parameter is filled in place, in the order of `named_parameters()`, from one
generator seeded with the seed on that device: matrices (and expert tensors) ~ N(0, initializer_range²) (the
config's, 0.02 when it has none), biases 0, every other vector (the norms' scales) 1. Nothing is materialised in
float32 on the host first, so a 7B model in bfloat16 on a GPU never needs 28 GB of host memory; transformers'
`_init_weights` is not used (slow for 7B on a CPU, and different per family). Same seed, device and dtype:
the same weights; a CPU and a GPU draw different ones.

The tokenizer is the embedded model's (SmolLM2's, read from engine.models.embedded.embedded_dir(): only its
tokenizer files are needed), and the vocabulary is resized to it (vocab_size = len(tokenizer), special ids the
tokenizer's). Where those files are not there, tiny-random's byte-level tokenizer (260 ids) stands in, and the
label says so ("byte tokenizer").

No torch or transformers import here until a model is built.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from engine.errors import HieruiError, one_line

RANDOM_PREFIX = "random:"
RANDOM_VERSION = 1  # part of the cache key: bump when the weights built below change
RANDOM_SEED = 0
SHAPES_DIR = Path(__file__).with_name("shapes")
LABEL = "random weights"

_SEEDED = re.compile(r"^(.*?)@([0-9]+)$")
# config keys that a shape must not carry into the built model: ours (dtype), remote code, quantization
_DROPPED = ("auto_map", "quantization_config", "dtype", "torch_dtype", "transformers_version", "_name_or_path")
_POSITIVE = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
    "vocab_size",
    "head_dim",
)


def is_random(name: str | None) -> bool:
    return (name or "").strip().lower().startswith(RANDOM_PREFIX)


def shape_aliases() -> list[str]:
    """The shipped shapes: random:ALIAS for each."""
    return sorted(p.stem for p in SHAPES_DIR.glob("*.json"))


@dataclass(frozen=True)
class RandomShape:
    """What a `random:` name points at: the shape (an alias or a config file), its config and the seed."""

    name: str  # normalised: random:ALIAS[@SEED] or random:PATH[@SEED]
    shape: str  # the alias, or the config file's absolute path
    path: Path
    alias: bool
    seed: int
    config: dict  # the config file's keys, less those starting with "_"

    @property
    def label(self) -> str:
        """What the shape is called on screen: the alias, or the folder (or file) the config is in."""
        if self.alias:
            return self.shape
        return self.path.parent.name if self.path.name == "config.json" and self.path.parent.name else self.path.stem


def parse_random(name: str) -> RandomShape:
    """Read a `random:` name, its shape's config file and its seed; one clear error line for anything wrong.
    No torch: it only reads a small JSON file."""
    raw = (name or "").strip()
    if not is_random(raw):
        raise HieruiError(f"'{name}' is not a random: model")
    text = raw[len(RANDOM_PREFIX) :].strip()
    seed = RANDOM_SEED
    seeded = _SEEDED.match(text)
    if seeded:
        text, seed = seeded.group(1).strip(), int(seeded.group(2))
    aliases = shape_aliases()
    known = ", ".join(aliases)
    if not text:
        raise HieruiError(f"'{raw}' names no shape: use random:ALIAS ({known}) or random:PATH/config.json")
    if text.lower() in aliases:
        shape, path, alias = text.lower(), SHAPES_DIR / f"{text.lower()}.json", True
    else:
        path = Path(text).expanduser()
        if path.is_dir():
            path = path / "config.json"
        looks_like_path = any(c in text for c in "/\\") or text.startswith((".", "~")) or text.endswith(".json")
        if not looks_like_path:
            raise HieruiError(
                f"unknown shape '{text}' in '{raw}': use random:ALIAS with one of {known}, or random:PATH/config.json"
            )
        if not path.is_file():
            raise HieruiError(f"config file not found for '{raw}': {text}")
        path = path.resolve()
        shape, alias = str(path), False
    config = read_shape(path)
    suffix = f"@{seed}" if seeded else ""
    return RandomShape(f"{RANDOM_PREFIX}{shape}{suffix}", shape, path, alias, seed, config)


def read_shape(path: Path) -> dict:
    """A shape's config file as a dict, checked enough that building it fails only on what transformers
    itself refuses (an unknown model_type, a value it cannot take)."""
    try:
        config = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise HieruiError(f"cannot read config file {path}: {one_line(e)}") from None
    except ValueError as e:
        raise HieruiError(f"config file {path} is not valid JSON: {one_line(e)}") from None
    if not isinstance(config, dict):
        raise HieruiError(f"config file {path} is not a JSON object")
    if isinstance(config.get("text_config"), dict):  # a multimodal wrapper: the language model's part
        config = {**config, **config["text_config"]}
        config.pop("text_config", None)
    if not isinstance(config.get("model_type"), str) or not config["model_type"]:
        raise HieruiError(f"config file {path} has no model_type: it is not a transformers config.json")
    for key in _POSITIVE:
        value = config.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise HieruiError(f"config file {path}: {key} must be a positive integer, got {value!r}")
    return {k: v for k, v in config.items() if not k.startswith("_")}


def tokenizer_source() -> str:
    """'embedded' where the embedded model's tokenizer files are there, else 'bytes' (the byte tokenizer)."""
    from engine.models.embedded import embedded_dir

    return "embedded" if (embedded_dir() / "tokenizer.json").is_file() else "bytes"


def random_display(name: str) -> str:
    """'llama-7b shape, random weights' (', seed 3' for another seed; ', byte tokenizer' without the
    embedded tokenizer)."""
    shape = parse_random(name)
    out = f"{shape.label} shape, {LABEL}"
    if shape.seed != RANDOM_SEED:
        out += f", seed {shape.seed}"
    if tokenizer_source() != "embedded":
        out += ", byte tokenizer"
    return out


def random_cache_key(name: str) -> str:
    """The shape (by its config's content), the seed, the tokenizer and RANDOM_VERSION."""
    shape = parse_random(name)
    digest = hashlib.sha1(json.dumps(shape.config, sort_keys=True).encode()).hexdigest()[:12]
    tag = shape.shape if shape.alias else "file"
    return f"random:{tag}:{digest}:seed{shape.seed}:{tokenizer_source()}:v{RANDOM_VERSION}"


def random_tokenizer():
    """The embedded model's tokenizer (its files only), or the byte tokenizer where they are not there."""
    from engine.models.embedded import embedded_dir

    if tokenizer_source() == "embedded":
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(embedded_dir()))
    from engine.models.tiny import byte_tokenizer

    return byte_tokenizer()


def transformers_config(shape: RandomShape, tokenizer):
    """The shape's transformers config with the vocabulary and special ids of `tokenizer`."""
    from transformers import AutoConfig

    values = {k: v for k, v in shape.config.items() if k not in _DROPPED}
    model_type = values.pop("model_type")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    values.update(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=pad,
    )
    try:
        return AutoConfig.for_model(model_type, **values)
    except Exception as e:  # an unknown model_type, a value the config class refuses
        raise HieruiError(f"cannot build the shape of {shape.path}: {one_line(e)}") from None


def build_random(name: str, device, dtype, progress=None, device_map: dict | None = None):
    """The random model of `name` in `dtype` on `device` (torch objects), and its tokenizer.

    `device_map` ({module name: device}, several GPUs): each tensor is made on its own device (drawn on the
    first device of the map, in the same order as on one device, so the weights are the same either way);
    engine.models.loading then attaches accelerate's hooks."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    say = progress or (lambda _msg: None)
    shape = parse_random(name)
    if tokenizer_source() != "embedded":
        from engine.models.embedded import embedded_dir

        say(f"{shape.name}: the embedded tokenizer is not in {embedded_dir()}; using the byte tokenizer")
    tok = random_tokenizer()
    config = transformers_config(shape, tok)
    say(f"building {shape.label} shape with {LABEL} ({str(dtype).removeprefix('torch.')} on {device})")
    std = float(getattr(config, "initializer_range", None) or 0.02)
    try:
        if device_map:  # parameters on the meta device first, buffers (rotary frequencies) on the host
            from accelerate import init_empty_weights

            with init_empty_weights(include_buffers=False), no_init_weights():
                model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        else:
            with torch.device(device), no_init_weights():
                model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except (HieruiError, MemoryError, RuntimeError):
        raise
    except Exception as e:  # the config class took the values, the model class does not
        raise HieruiError(f"cannot build the shape of {shape.path}: {one_line(e)}") from None
    model.tie_weights()  # no_init_weights skips the tying that init_weights does
    if device_map:
        init_random_mapped(model, shape.seed, std, device_map)
    else:
        init_random(model, shape.seed, std)
    model.generation_config.bos_token_id = config.bos_token_id
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    model.config.name_or_path = shape.name
    return model.eval(), tok


def init_random(model, seed: int, std: float) -> None:
    """Fill every parameter in place from one generator seeded with `seed` on the parameters' device:
    matrices N(0, std²), biases 0, other vectors (norm scales) 1. Tied parameters are filled once."""
    import torch

    first = next(model.parameters())
    gen = torch.Generator(device=first.device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            _fill(p, name, std, gen)


def _fill(t, name: str, std: float, gen) -> None:
    """The rule of init_random for the parameter `name`, in place on `t`: a matrix N(0, std²) from `gen`, a
    bias 0, another vector (a norm's scale) 1."""
    if t.dim() >= 2:
        t.normal_(0.0, std, generator=gen)
    elif name.endswith("bias"):
        t.zero_()
    else:
        t.fill_(1.0)


def init_random_mapped(model, seed: int, std: float, device_map: dict) -> None:
    """init_random for a model built on the meta device: each parameter drawn on the map's first device, from
    one generator there, in init_random's order and with its rule, then set on the device its module is mapped
    to; tied parameters are tied again once set."""
    import torch
    from accelerate.utils import set_module_tensor_to_device

    first = torch.device(_device(next(iter(device_map.values()))))
    gen = torch.Generator(device=first).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            value = torch.empty(p.shape, dtype=p.dtype, device=first)
            _fill(value, name, std, gen)
            set_module_tensor_to_device(model, name, _device(mapped_device(device_map, name)), value=value)
    model.tie_weights()


def mapped_device(device_map: dict, name: str):
    """The device `device_map` gives the tensor `name`: that of the longest module name it is under."""
    best = max((key for key in device_map if key == "" or name == key or name.startswith(key + ".")), key=len)
    return device_map[best]


def _device(device):
    import torch

    return torch.device(f"cuda:{device}" if isinstance(device, int) else device)
