"""Where a model's files come from: the local hub cache, downloads from the hub (the light files first),
GGUF conversions and the embedded default, fetched once (`pull`), and the list of names `hierui models` shows.

The embedded default (fetch, verify, convert) lives in engine.models.embedded; converted models are stored under
engine.record.paths.models_dir().
"""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

from engine.errors import HieruiError, one_line
from engine.models import names
from engine.models.embedded import EMBEDDED_PACKAGE, convert_gguf, embedded_dir, ensure_embedded
from engine.models.names import ALIASES, DEFAULT_MODEL, ModelRef
from engine.models.tiny import TINY_RANDOM
from engine.record.paths import models_dir

Progress = Callable[[str], None]

# resolve is called as names.resolve, not as a copy bound at import: replacing it in engine.models.names (a test
# that no model named by an untrusted file is touched) then reaches every caller here

# a hub model's small files: its config and tokenizer, without the weights
LIGHT_PATTERNS = ["*.json", "*.model", "tokenizer*", "*.txt"]


def hub_cache_dir(hub_id: str) -> str | None:
    """The folder of a hub model in the local hub cache (where its config.json is), None when not there."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(hub_id, "config.json")
    return str(Path(found).parent) if isinstance(found, str) else None


def gguf_folder(ref: ModelRef) -> Path:
    """Where a .gguf file's conversion to safetensors is kept (named after the file and its cache key)."""
    src = Path(ref.source)
    return models_dir() / f"gguf-{src.stem}-{hashlib.sha1(ref.cache_key().encode()).hexdigest()[:10]}"


def local_path_for(ref: ModelRef, say: Progress) -> Path:
    """A local directory holding safetensors + tokenizer for `ref`, fetching or converting once."""
    if ref.kind == "embedded":
        return ensure_embedded(say)
    if ref.kind == "local":
        return Path(ref.source)
    if ref.kind == "gguf":
        target = gguf_folder(ref)
        if not (target / "config.json").is_file():
            convert_gguf(Path(ref.source), target, say)
        return target
    return _hub_snapshot(ref, say)


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
    ref = names.resolve(name)
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
    ref = names.resolve(name)
    if ref.kind != "hub" or hub_cache_dir(ref.source) is not None:
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
        where = hub_cache_dir(hub_id)
        rows.append({"alias": alias, "target": hub_id, "cached": where is not None, "where": where or ""})
    gguf_dir = models_dir()
    if gguf_dir.is_dir():
        for d in sorted(gguf_dir.glob("gguf-*")):
            rows.append({"alias": d.name, "target": "converted GGUF", "cached": True, "where": str(d)})
    return rows


def pull(name: str, progress: Progress | None = None) -> Path | None:
    """Fetch (and convert) a model so later loads need no network; returns its directory."""
    ref = names.resolve(name)
    if ref.kind in ("tiny", "zoo", "random"):
        return None
    return local_path_for(ref, progress or (lambda _m: None))
