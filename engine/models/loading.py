"""Resolve a model name to something loadable, and load it (model + tokenizer) onto a device.

Names accepted by --model:
  - an alias: `smollm2-135m` (the embedded default), `llama-7b`, `llama2-7b`, `llama3-8b`, ...;
  - `tiny-random`: a seeded four-layer Llama with a byte-level tokenizer, for tests and demos;
  - `tiny-random:FAMILY`: a seeded tiny model of another decoder family (engine.models.zoo: gemma2, mixtral, gpt2, ...);
  - `random:SHAPE`: random weights in the shape of a known model (`random:llama-7b`) or of a config.json, for
    timing and memory only (engine.models.random_shapes);
  - a local directory holding a transformers checkpoint (config.json + weights);
  - a `.gguf` file (de-quantized through transformers' GGUF support, then cached as safetensors);
  - a hub id `owner/name` (where the hub is reachable, or already in the local hub cache).

The embedded default (fetch, verify, convert) lives in engine.models.embedded, tiny-random in engine.models.tiny;
converted models are stored under engine.record.paths.models_dir().

This module imports torch and transformers lazily so `hierui models` stays fast.
"""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from engine.errors import HieruiError, is_oom, one_line
from engine.models.embedded import (
    EMBEDDED_NAME,
    EMBEDDED_PACKAGE,
    EMBEDDED_SHA256,
    convert_gguf,
    embedded_dir,
    ensure_embedded,
)
from engine.models.random_shapes import is_random, parse_random, random_cache_key, random_display
from engine.models.tiny import TINY_RANDOM, TINY_SHAPE, TINY_TOKENS, TINY_VERSION
from engine.models.zoo import ZOO_VERSION, check_family, family_of
from engine.record.paths import models_dir

Progress = Callable[[str], None]

DEFAULT_MODEL = EMBEDDED_NAME

# alias -> hub id (the embedded default and tiny-random are handled separately)
ALIASES: dict[str, str] = {
    "llama-7b": "huggyllama/llama-7b",
    "llama-13b": "huggyllama/llama-13b",
    "llama-30b": "huggyllama/llama-30b",
    "llama-65b": "huggyllama/llama-65b",
    "llama2-7b": "meta-llama/Llama-2-7b-hf",
    "llama2-13b": "meta-llama/Llama-2-13b-hf",
    "llama2-70b": "meta-llama/Llama-2-70b-hf",
    "llama3-8b": "meta-llama/Meta-Llama-3-8B",
    "llama3.1-8b": "meta-llama/Llama-3.1-8B",
    "llama3.2-1b": "meta-llama/Llama-3.2-1B",
    "mistral-7b": "mistralai/Mistral-7B-v0.1",
    "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B",
    "qwen2.5-7b": "Qwen/Qwen2.5-7B",
    "smollm2-135m-hub": "HuggingFaceTB/SmolLM2-135M-Instruct",
}


@dataclass(frozen=True)
class ModelRef:
    """What a --model name points at. `kind` is embedded | tiny | zoo | random | local | gguf | hub (for zoo,
    `source` is the family; for random, the shape: an alias or a config file's path)."""

    name: str
    kind: str
    source: str

    @property
    def display(self) -> str:
        if self.kind == "embedded":
            return "SmolLM2-135M-Instruct (embedded)"
        if self.kind == "random":
            return random_display(self.name)
        if self.kind in ("local", "gguf"):
            return Path(self.source).name
        if self.kind == "zoo":
            return self.name  # tiny-random:FAMILY
        return self.source

    def cache_key(self) -> str:
        """Identifies these exact weights, for caching derived things (calibration, pruned weights)."""
        if self.kind == "embedded":
            return f"embedded:{EMBEDDED_SHA256[:16]}"
        if self.kind == "tiny":
            return f"tiny-random:{TINY_VERSION}"
        if self.kind == "zoo":
            return f"tiny-random:{self.source}:{ZOO_VERSION}"
        if self.kind == "random":
            return random_cache_key(self.name)
        if self.kind in ("local", "gguf"):
            p = Path(self.source)
            files = (
                [p] if p.is_file() else sorted(p.glob("*.safetensors")) + sorted(p.glob("*.bin")) + [p / "config.json"]
            )
            stamp = [(f.name, f.stat().st_size, int(f.stat().st_mtime)) for f in files if f.exists()]
            return f"{self.kind}:{p.resolve()}:{hashlib.sha1(repr(stamp).encode()).hexdigest()[:12]}"
        return f"hub:{self.source}"


@dataclass
class LoadedModel:
    """A loaded causal LM with its tokenizer, where it lives, and where it came from."""

    ref: ModelRef
    model: Any
    tokenizer: Any
    device: Any  # torch.device of the input embeddings
    dtype: Any

    @property
    def is_chat(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))


# ---------------------------------------------------------------- resolving names


def resolve(name: str) -> ModelRef:
    """Map a --model string to a ModelRef, without loading anything. Unknown names raise."""
    raw = name
    name = (name or "").strip()
    if not name:
        raise HieruiError("no model given; try --model smollm2-135m (the embedded default)")
    low = name.lower()
    if low in (DEFAULT_MODEL, "default", "smollm2", "embedded"):
        return ModelRef(DEFAULT_MODEL, "embedded", EMBEDDED_PACKAGE)
    if low == TINY_RANDOM:
        return ModelRef(TINY_RANDOM, "tiny", TINY_RANDOM)
    if is_random(low):
        shape = parse_random(name)  # reads the shape's config.json: a bad one is an error here
        return ModelRef(shape.name, "random", shape.shape)
    family = family_of(low)
    if family is not None:
        check_family(family, raw)
        return ModelRef(low, "zoo", family)
    if low in ALIASES:
        return ModelRef(low, "hub", ALIASES[low])
    path = Path(name).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise HieruiError(f"GGUF file not found: {raw}")
        return ModelRef(name, "gguf", str(path.resolve()))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise HieruiError(f"'{raw}' is a directory but not a transformers checkpoint (no config.json in it)")
        return ModelRef(name, "local", str(path.resolve()))
    if path.exists():
        raise HieruiError(f"'{raw}' is a file, not a model directory or a .gguf file")
    parts = name.split("/")
    looks_like_path = name.startswith((".", "/", "~")) or len(parts) > 2
    if len(parts) == 2 and all(parts) and not looks_like_path:
        return ModelRef(name, "hub", name)
    if looks_like_path:
        raise HieruiError(f"model directory not found: {raw}")
    known = ", ".join([DEFAULT_MODEL, TINY_RANDOM, "tiny-random:FAMILY", "random:SHAPE", *ALIASES])
    raise HieruiError(
        f"unknown model '{raw}': use an alias ({known}), a local directory, a .gguf file or a hub id owner/name"
    )


# ---------------------------------------------------------------- configs, read without loading

# tiny-random's config.json values that the early checks read, without torch (engine.models.tiny)
TINY_CONFIG = {**TINY_TOKENS, **TINY_SHAPE}


def read_config(name: str) -> dict | None:
    """A model's config.json as a dict, without torch or a download: tiny-random, a local checkpoint, the
    embedded default once converted, a converted GGUF, a hub model in the local hub cache. None where it
    cannot be known yet (not fetched or converted): the checks that need it then happen after loading."""
    ref = resolve(name)
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
        src = Path(ref.source)
        path = models_dir() / f"gguf-{src.stem}-{hashlib.sha1(ref.cache_key().encode()).hexdigest()[:10]}"
        path = path / "config.json"
    else:
        found = _hub_cache_dir(ref.source)
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


def check_device(device: str) -> str:
    """Check a --device string before anything slow: auto, cpu, cuda, cuda:N or mps, and that the GPU it
    names is there. Returns it lower-cased. torch is imported only for cuda/mps (to ask whether they exist)."""
    import re

    text = (device or "auto").strip().lower()
    if text in ("auto", "cpu"):
        return text
    match = re.fullmatch(r"cuda(?::([0-9]+))?", text)
    if match:
        import torch

        if not torch.cuda.is_available():
            raise HieruiError(f"device '{device}' asked for, but no CUDA GPU is available here; use --device cpu")
        if match.group(1) is not None and int(match.group(1)) >= torch.cuda.device_count():
            raise HieruiError(f"device '{device}' does not exist: {torch.cuda.device_count()} GPU(s) here")
        return text
    if text == "mps":
        import torch

        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise HieruiError(
                f"device '{device}' asked for, but no Apple GPU (MPS) is available here; use --device cpu"
            )
        return text
    raise HieruiError(f"unknown device '{device}': use auto, cpu, cuda, cuda:N or mps")


# ---------------------------------------------------------------- devices and dtypes


def pick_device(device: str = "auto"):
    import torch

    device = check_device(device)  # the one check of a device string (also called before anything slow)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
}


def pick_dtype(dtype: str, device):
    import torch

    dtype = (dtype or "auto").lower()
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise HieruiError(f"unknown dtype '{dtype}': use auto, float32, bfloat16 or float16")
    return getattr(torch, DTYPES[dtype])


def placement_kwargs(device, device_map: str | dict | None) -> dict:
    """from_pretrained kwargs: the device_map given (engine.run.plan's, {module name: GPU index}), else accelerate's
    device_map='auto' when several GPUs are present (a model whose config was not known before loading)."""
    import torch

    if device_map:
        return {"device_map": device_map}
    if device.type == "cuda" and device.index is None and torch.cuda.device_count() > 1:
        return {"device_map": "auto"}
    return {}


# ---------------------------------------------------------------- loading


def load(
    name: str,
    device: str = "auto",
    dtype: str = "auto",
    device_map: str | dict | None = None,
    progress: Progress | None = None,
    streamed: bool = False,
) -> LoadedModel:
    """Load the model a --model name points at, in eval mode, with a tokenizer that has a pad token.

    `device_map`: {module name: device} (engine.run.plan's for several GPUs, engine.place.placement) or 'auto';
    the model is placed by it with accelerate's hooks, which move each module's inputs onto its device.
    `streamed`: the decoder layers' weights stay on disk and are brought to the device layer by layer
    (engine.place.streaming; the placement `hierui plan` calls streamed); a checkpoint's layers are read from its
    own safetensors files, never loaded whole."""
    ref = resolve(name)
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    say = progress or (lambda _msg: None)
    try:
        mapped = isinstance(device_map, dict) and not streamed
        if ref.kind == "tiny":
            from engine.models.tiny import build_tiny_random

            model, tok = build_tiny_random()
            model = _dispatched(model.to(dtype=dt), device_map) if mapped else model.to(dtype=dt, device=dev)
        elif ref.kind == "zoo":
            from engine.models.zoo import build_member

            model, tok = build_member(ref.source)
            model = _dispatched(model.to(dtype=dt), device_map) if mapped else model.to(dtype=dt, device=dev)
        elif ref.kind == "random":  # built in place, in dt on dev (never in float32 on the host first)
            from engine.models.random_shapes import build_random

            model, tok = build_random(ref.name, dev, dt, say, device_map=device_map if mapped else None)
            if mapped:
                model = _dispatched(model, device_map)
        else:
            path = _local_path_for(ref, say)
            say(f"loading {ref.display}" + (" (layers streamed from disk)" if streamed else ""))
            loaded = from_pretrained_streamed(path, dev, dt) if streamed else None
            model, tok = loaded or _from_pretrained(path, dev, dt, device_map)
        from engine.place.streaming import is_streamed, stream

        if streamed and not is_streamed(model):
            stream(model, dev)
    except HieruiError:
        raise
    except (MemoryError, RuntimeError) as e:  # torch's OutOfMemoryError is a RuntimeError
        if not is_oom(e):
            raise
        raise HieruiError(
            f"out of memory loading {ref.display}: try --dtype bfloat16, --device cpu or a smaller model", 1
        ) from None
    model.eval()
    model.requires_grad_(False)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    first = model.get_input_embeddings().weight
    return LoadedModel(ref, model, tok, first.device, first.dtype)


def _dispatched(model, device_map: dict):
    """`model` placed by `device_map` with accelerate's hooks (engine.place.placement.dispatch)."""
    from engine.place.placement import dispatch

    return dispatch(model, device_map, main_device=_main_device(device_map))


def _main_device(device_map: dict):
    """Where modules mapped to "cpu" run: on the CPU itself (a GPU + CPU map runs on both, not offloaded)."""
    return "cpu" if "cpu" in set(device_map.values()) else None


def _from_pretrained(path: Path, dev, dt, device_map):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    placement = placement_kwargs(dev, device_map)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dt, **placement)
    if not placement:
        model = model.to(dev)
    tok = AutoTokenizer.from_pretrained(str(path))
    return model, tok


def from_pretrained_streamed(path: Path, dev, dt):
    """(model, tokenizer) with the decoder layers streamed from the checkpoint's own safetensors files (cast to
    `dt` as each layer is brought in, as from_pretrained casts) and the rest loaded onto `dev`; None where the
    checkpoint's names do not map one to one onto the model's tensors (then it is loaded whole and its layers
    written out once: engine.place.streaming.stream)."""
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from engine.anatomy.linears import decoder_layers_prefix
    from engine.place.streaming import stream

    index: dict[str, tuple[str, str]] = {}  # name → (file, key)
    for file in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                index[key] = (str(file), key)
    if not index:
        return None
    config = AutoConfig.from_pretrained(str(path))
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dt)
    prefix = decoder_layers_prefix(model)
    sources: dict[int, dict] = {}
    for name, _tensor in model.named_parameters(remove_duplicate=False):
        if not name.startswith(prefix):
            continue
        if name not in index:
            return None
        number, _, inner = name[len(prefix) :].partition(".")
        sources.setdefault(int(number), {})[inner] = index[name]
    for name, tensor in model.state_dict(keep_vars=True).items():
        if name.startswith(prefix) or tensor.device.type != "meta" or name not in index:
            continue  # a tied head is tied below
        file, key = index[name]
        with safe_open(file, framework="pt") as f:
            set_module_tensor_to_device(model, name, dev, value=f.get_tensor(key).to(dt))
    model.tie_weights()
    if any(t.device.type == "meta" for n, t in model.state_dict(keep_vars=True).items() if not n.startswith(prefix)):
        return None
    for name, tensor in model.named_buffers():
        if not name.startswith(prefix) and tensor.device != dev:
            set_module_tensor_to_device(model, name, dev)
    stream(model, dev, sources)
    model.config.name_or_path = str(path)  # as from_pretrained sets it, with the checkpoint's generation config
    if (Path(path) / "generation_config.json").is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(str(path))
    return model, AutoTokenizer.from_pretrained(str(path))


def _local_path_for(ref: ModelRef, say: Progress) -> Path:
    """A local directory holding safetensors + tokenizer for `ref`, fetching or converting once."""
    if ref.kind == "embedded":
        return ensure_embedded(say)
    if ref.kind == "local":
        return Path(ref.source)
    if ref.kind == "gguf":
        src = Path(ref.source)
        target = models_dir() / f"gguf-{src.stem}-{hashlib.sha1(ref.cache_key().encode()).hexdigest()[:10]}"
        if not (target / "config.json").is_file():
            convert_gguf(src, target, say)
        return target
    return _hub_snapshot(ref, say)


# a hub model's small files: its config and tokenizer, without the weights
LIGHT_PATTERNS = ["*.json", "*.model", "tokenizer*", "*.txt"]


def _has_weights(folder: Path) -> bool:
    return any(folder.glob("*.safetensors")) or any(folder.glob("*.bin"))


def _hub_snapshot(ref: ModelRef, say: Progress) -> Path:
    """Download (or find in the local hub cache) a hub model; a clear error when the hub is unreachable."""
    from huggingface_hub import snapshot_download

    patterns = [*LIGHT_PATTERNS, "*.safetensors"]
    try:
        found = Path(snapshot_download(ref.source, allow_patterns=patterns, local_files_only=True))
        if _has_weights(found):  # only its config and tokenizer (fetch_light) are not the model
            return found
    except Exception:
        pass
    check_reachable(ref.name if ref.name in ALIASES else ref.source)
    say(f"downloading {ref.source} from the hub")
    try:
        return Path(snapshot_download(ref.source, allow_patterns=patterns))
    except Exception as e:
        raise HieruiError(f"could not download {ref.source} from the hub: {one_line(e)}", 1) from None


def fetch_light(name: str, progress: Progress | None = None) -> Path | None:
    """The folder holding a hub model's config and tokenizer files (downloaded, without the weights, when not
    in the local hub cache yet), so the checks that need them run before the weights are fetched; then
    read_config and load_tokenizer find them. None for a model that is not a hub model."""
    ref = resolve(name)
    if ref.kind != "hub":
        return None
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(ref.source, allow_patterns=LIGHT_PATTERNS, local_files_only=True))
    except Exception:
        pass
    check_reachable(name)
    (progress or (lambda _m: None))(f"fetching the config and tokenizer of {ref.source}")
    try:
        return Path(snapshot_download(ref.source, allow_patterns=LIGHT_PATTERNS))
    except Exception as e:
        raise HieruiError(f"could not download {ref.source} from the hub: {one_line(e)}", 1) from None


def check_reachable(name: str) -> None:
    """Fail fast (one line) when a hub model is neither in the local hub cache nor downloadable now."""
    ref = resolve(name)
    if ref.kind != "hub" or _hub_cache_dir(ref.source) is not None:
        return
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    if os.environ.get("HF_HUB_OFFLINE") or not _reachable(endpoint):
        raise HieruiError(
            f"cannot reach the Hugging Face hub to fetch {ref.source} ('{ref.name}'); download it where the hub "
            f"is reachable (hf download {ref.source} --local-dir DIR) and pass --model DIR",
            1,
        )


def _reachable(url: str, timeout: float = 3.0) -> bool:
    parsed = urlparse(url)
    host = parsed.hostname or "huggingface.co"
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def load_tokenizer(name: str, progress: Progress | None = None):
    """Only the tokenizer of a --model name (fetching the model once if it has to)."""
    ref = resolve(name)
    if ref.kind in ("tiny", "zoo"):
        from engine.models.tiny import byte_tokenizer

        return byte_tokenizer()
    if ref.kind == "random":
        from engine.models.random_shapes import random_tokenizer

        return random_tokenizer()
    from transformers import AutoTokenizer

    say = progress or (lambda _m: None)
    folder = fetch_light(name, say) if ref.kind == "hub" else _local_path_for(ref, say)
    return AutoTokenizer.from_pretrained(str(folder))


# ---------------------------------------------------------------- listing


def list_models() -> list[dict]:
    """Aliases with their targets and whether they are available without a download."""
    rows = [
        {
            "alias": DEFAULT_MODEL,
            "target": f"SmolLM2-135M-Instruct from {EMBEDDED_PACKAGE}",
            "cached": (embedded_dir() / "model.safetensors").is_file(),
            "where": str(embedded_dir()),
        },
        {"alias": TINY_RANDOM, "target": "seeded 4-layer Llama, byte tokenizer", "cached": True, "where": "built in"},
    ]
    from engine.models.zoo import FAMILIES, PREFIX

    for family in FAMILIES.values():
        rows.append(
            {
                "alias": PREFIX + family.name,
                "target": f"seeded tiny {family.config_class.removesuffix('Config')}: {family.features}",
                "cached": True,
                "where": "built in",
            }
        )
    from engine.models.random_shapes import LABEL, shape_aliases

    for shape in shape_aliases():
        target = f"{shape} shape, {LABEL}"
        rows.append({"alias": f"random:{shape}", "target": target, "cached": True, "where": "built in"})
    for alias, hub_id in ALIASES.items():
        where = _hub_cache_dir(hub_id)
        rows.append({"alias": alias, "target": hub_id, "cached": where is not None, "where": where or ""})
    gguf_dir = models_dir()
    if gguf_dir.is_dir():
        for d in sorted(gguf_dir.glob("gguf-*")):
            rows.append({"alias": d.name, "target": "converted GGUF", "cached": True, "where": str(d)})
    return rows


def _hub_cache_dir(hub_id: str) -> str | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(hub_id, "config.json")
    return str(Path(found).parent) if isinstance(found, str) else None


def pull(name: str, progress: Progress | None = None) -> Path | None:
    """Fetch (and convert) a model so later loads need no network; returns its directory."""
    ref = resolve(name)
    if ref.kind in ("tiny", "zoo", "random"):
        return None
    return _local_path_for(ref, progress or (lambda _m: None))
