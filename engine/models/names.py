"""What a --model name points at: the aliases, ModelRef, and resolve (a name to a ModelRef, nothing loaded).

Names accepted by --model:
  - an alias: `smollm2-135m` (the embedded default), `llama-7b`, `llama2-7b`, `llama3-8b`, ...;
  - `tiny-random`: a seeded four-layer Llama with a byte-level tokenizer, for tests and demos;
  - `tiny-random:FAMILY`: a seeded tiny model of another decoder family (engine.models.zoo: gemma2, mixtral, gpt2, ...);
  - `random:SHAPE`: random weights in the shape of a known model (`random:llama-7b`) or of a config.json, for
    timing and memory only (engine.models.random_shapes);
  - a local directory holding a transformers checkpoint (config.json + weights);
  - a `.gguf` file (de-quantized through transformers' GGUF support, then cached as safetensors);
  - a hub id `owner/name` (where the hub is reachable, or already in the local hub cache).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from engine.errors import HieruiError
from engine.models.embedded import EMBEDDED_NAME, EMBEDDED_PACKAGE, EMBEDDED_SHA256
from engine.models.random_shapes import is_random, parse_random, random_cache_key, random_display
from engine.models.tiny import TINY_RANDOM, TINY_VERSION
from engine.models.zoo import ZOO_VERSION, check_family, family_of

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
