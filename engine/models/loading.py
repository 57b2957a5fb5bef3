"""Load the model a --model name points at (model + tokenizer) onto a device, or only its tokenizer.

The name is resolved by engine.models.names, its files found or fetched by engine.models.hub, the device and
dtype picked by engine.models.devices; tiny-random is built by engine.models.tiny, tiny-random:FAMILY by
engine.models.zoo, random:SHAPE in place by engine.models.random_shapes.

This module imports torch and transformers lazily so `hierui models` stays fast.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.errors import HieruiError, is_oom
from engine.models.devices import pick_device, pick_dtype, placement_kwargs
from engine.models.hub import Progress, fetch_light, local_path_for
from engine.models.names import ModelRef, resolve


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
            path = local_path_for(ref, say)
            say(f"loading {ref.display}" + (" (layers streamed from disk)" if streamed else ""))
            with _checkpoint_errors(ref, path):
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


@contextmanager
def _checkpoint_errors(ref: ModelRef, path: Path):
    """A local checkpoint that transformers or safetensors cannot read (what engine.models.configs' checks before
    loading cannot see: a corrupt .bin, a tensor of the wrong shape, a config value a config class refuses): one
    line naming the folder and the first line of the cause, exit 2, not a traceback. Running out of memory, and
    any other kind of model, are left to load."""
    from huggingface_hub.errors import StrictDataclassError
    from safetensors import SafetensorError

    try:
        yield
    except HieruiError:
        raise
    except (OSError, ValueError, TypeError, KeyError, RuntimeError, SafetensorError, StrictDataclassError) as e:
        if ref.kind != "local" or is_oom(e):
            raise
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        cause = " ".join(lines[:2])[:200] or type(e).__name__
        if "ignore_mismatched_sizes" in cause:  # the report it points at is transformers' log, quieted here
            cause = "its weights' shapes are not the ones its config.json gives"
        raise HieruiError(f"{ref.display}: cannot load the checkpoint in {path}: {cause}") from None


def _dispatched(model, device_map: dict):
    """`model` placed by `device_map` with accelerate's hooks (engine.place.placement.dispatch)."""
    from engine.place.placement import dispatch

    return dispatch(model, device_map, main_device=_main_device(device_map))


def _main_device(device_map: dict):
    """Where modules mapped to "cpu" run: on the CPU itself (a GPU + CPU map runs on both, not offloaded)."""
    return "cpu" if "cpu" in set(device_map.values()) else None


def _from_pretrained(path: Path, dev, dt, device_map):
    from transformers import AutoModelForCausalLM

    placement = placement_kwargs(dev, device_map)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dt, **placement)
    if not placement:
        model = model.to(dev)
    return model, tokenizer_from(path)


def from_pretrained_streamed(path: Path, dev, dt):
    """(model, tokenizer) with the decoder layers streamed from the checkpoint's own safetensors files (cast to
    `dt` as each layer is brought in, as from_pretrained casts) and the rest loaded onto `dev`; None where the
    checkpoint's names do not map one to one onto the model's tensors (then it is loaded whole and its layers
    written out once: engine.place.streaming.stream)."""
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

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
    return model, tokenizer_from(path)


def tokenizer_from(folder: str | Path):
    """The tokenizer in `folder` (AutoTokenizer); one line (exit 2) where transformers cannot make one of its files
    (its message is a page: how to convert a slow tokenizer)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, TypeError, KeyError) as e:
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise HieruiError(f"{folder}: no usable tokenizer ({first[:160]})") from None


def load_tokenizer(name: str, progress: Progress | None = None):
    """Only the tokenizer of a --model name (fetching the model once if it has to)."""
    ref = resolve(name)
    if ref.kind in ("tiny", "zoo"):
        from engine.models.tiny import byte_tokenizer

        return byte_tokenizer()
    if ref.kind == "random":
        from engine.models.random_shapes import random_tokenizer

        return random_tokenizer()

    say = progress or (lambda _m: None)
    folder = fetch_light(name, say) if ref.kind == "hub" else local_path_for(ref, say)
    return tokenizer_from(folder)
