"""Streamed layers: decoder-layer weights kept off the execution device, each layer brought in for its forward.

A streamed model keeps its embeddings, final norm and head resident on the execution device; each decoder
layer's parameters live in safetensors files on disk (memory-mapped, read when needed: the checkpoint's own
files where its names match, else files written once) and are meta tensors in the module. An accelerate
`AlignDevicesHook` with `offload=True` on each layer (`StreamHook`) loads them onto the execution device
before the layer's forward and drops them after, so stepping holds one layer's weights at a time.

The perturbed copy of a streamed model (`clone_streamed`, called by engine.perturb.pair.clone_sharing) has the same
placement: its layers read the dense model's files, overlaid by a store of its own (`Overlay`) where pruning
writes the new weights of the layer in flight (`resident`), so the dense model's files are never written.

Nothing here gathers all layers' weights in memory (a streamed model is one that does not fit): the pruned-weight
cache entry is written one tensor at a time (`write_own`, `write_safetensors`) and a cached entry becomes the
clone's own store by pointing into (a hard link of) the file (`adopt_file`); `hierui prune --save` writes one
shard per layer (engine.perturb.export).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import math
import os
import shutil
import struct
import sys
import tempfile
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import NamedTuple

import torch
from accelerate.hooks import AlignDevicesHook, add_hook_to_module
from accelerate.utils import set_module_tensor_to_device

from engine.anatomy.linears import decoder_layers, decoder_layers_prefix
from engine.record.paths import open_for_writing, writing

STREAM_ATTR = "hierui_stream"  # set on a streamed model: its StreamInfo


class StreamInfo:
    """Where a streamed model's own files live (a temporary folder, removed with the model) and where it runs."""

    def __init__(self, model, execution_device, folder: Path | None = None):
        self.execution_device = torch.device(execution_device)
        self.folder = Path(folder or tempfile.mkdtemp(prefix="hierui-stream-"))
        weakref.finalize(model, shutil.rmtree, str(self.folder), True)
        _return_freed_memory()  # each layer is read into host memory first, whatever the device


MMAP_THRESHOLD = 1 << 20  # bytes: a host allocation at least this large gets pages of its own (glibc mallopt)


def _return_freed_memory() -> None:
    """Make glibc give each host allocation of MMAP_THRESHOLD or more pages of its own, returned when freed.

    Streaming allocates and frees one layer's weights after another; with glibc's default (a threshold that
    rises to the largest block freed) those blocks come from the heap and stay there, fragmented, so the
    process's resident memory grows towards the whole model again (measured on SmolLM2-135M: peak 1.6 GiB
    streamed against 0.55 GiB with this). Where the C library is not glibc this does nothing."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD (fixed: no dynamic raise)
    except (OSError, AttributeError):
        pass


class FileStore(Mapping):
    """Tensor name (inside a layer) → tensor, read from safetensors files: {name: (file, key in file)}. Each
    read opens and closes its file, so no mapping of a file stays in the process's memory between reads."""

    def __init__(self, entries: dict[str, tuple[str, str]]):
        self.entries = dict(entries)

    def __getitem__(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        path, key = self.entries[name]
        with safe_open(path, framework="pt") as f:
            return f.get_tensor(key)

    def __iter__(self):
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __deepcopy__(self, memo):
        return FileStore(self.entries)


class Overlay(Mapping):
    """A model's own tensors (`own`, a FileStore) over those it shares (`base`, the dense model's store)."""

    def __init__(self, own: FileStore, base: Mapping):
        self.own, self.base = own, base

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.own[name] if name in self.own.entries else self.base[name]

    def __iter__(self):
        return iter(self.base)

    def __len__(self) -> int:
        return len(self.base)


class StreamHook(AlignDevicesHook):
    """accelerate's offloading hook on one decoder layer (`index`), over its store; `folder`: where pruning
    writes the layer's new tensors (the perturbed model's own folder); None for the dense model, never written."""

    def __init__(self, execution_device, store: Mapping, index: int, folder: Path | None):
        super().__init__(execution_device, offload=True, weights_map=store, place_submodules=True)
        self.index = index
        self.folder = folder


def is_streamed(model) -> bool:
    return getattr(model, STREAM_ATTR, None) is not None


def layer_hook(layer) -> StreamHook | None:
    hook = getattr(layer, "_hf_hook", None)
    return hook if isinstance(hook, StreamHook) else None


def layer_device(layer):
    """Where `layer` runs: a streamed layer's execution device, else its parameters' device."""
    hook = layer_hook(layer)
    return hook.execution_device if hook is not None else next(layer.parameters()).device


def _layer_tensors(layer) -> dict[str, torch.Tensor]:
    return {name: p for name, p in layer.named_parameters()}


def _attach(layer, execution_device, store: Mapping, index: int, folder: Path | None) -> None:
    add_hook_to_module(layer, StreamHook(execution_device, store, index, folder))


def stream(model, execution_device, sources: dict[int, dict[str, tuple[str, str]]] | None = None):
    """Stream `model`'s decoder layers from disk, running them on `execution_device`; returns the model.

    `sources[i]`: where layer i's parameters already are (checkpoint files: {name: (file, key)}), its
    parameters then being meta tensors; a layer without a source has its weights written once to the model's
    own folder and released from memory. What is outside the layers must already be on `execution_device`.
    """
    from safetensors.torch import save_file

    info = StreamInfo(model, execution_device)
    layers = decoder_layers(model)
    for index, layer in enumerate(layers):
        entries = (sources or {}).get(index)
        if entries is None:
            path = info.folder / f"dense-{index}.safetensors"
            tensors = {n: p.detach().cpu().contiguous() for n, p in _layer_tensors(layer).items()}
            with writing(path):  # a full disk: one line naming the file
                save_file(tensors, str(path))
            entries = {n: (str(path), n) for n in tensors}
        _attach(layer, info.execution_device, FileStore(entries), index, None)
    setattr(model, STREAM_ATTR, info)
    return model


def clone_streamed(model):
    """The perturbed copy of a streamed model: its resident tensors shared, its layers streamed from the dense
    model's files through an Overlay whose own store (empty now) takes what pruning changes."""
    layers = decoder_layers(model)
    saved = []
    for layer in layers:  # the hooks are not copied: the clone gets its own
        saved.append({k: layer.__dict__.pop(k) for k in ("_hf_hook", "_old_forward", "forward") if k in layer.__dict__})
    info = getattr(model, STREAM_ATTR)
    memo: dict = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    memo[id(info)] = None
    try:
        clone = copy.deepcopy(model, memo)
    finally:
        for layer, attrs in zip(layers, saved):
            layer.__dict__.update(attrs)
    own = StreamInfo(clone, info.execution_device)
    setattr(clone, STREAM_ATTR, own)
    for index, (layer, attrs) in enumerate(zip(decoder_layers(clone), saved)):
        base = attrs["_hf_hook"].weights_map
        base = base.base if isinstance(base, Overlay) else base
        _attach(layer, own.execution_device, Overlay(FileStore({}), base), index, own.folder)
    return clone


@contextlib.contextmanager
def resident(layer):
    """A streamed layer's weights on its execution device while the block runs (its forward then uses them
    as they are; nothing is reloaded); on leaving, the tensors that were replaced (pruned) are written to the
    model's own store, and the layer's weights are released. A layer that is not streamed: nothing happens."""
    hook = layer_hook(layer)
    if hook is None:
        yield
        return
    loaded = {}
    for name in hook.weights_map:
        set_module_tensor_to_device(layer, name, hook.execution_device, value=hook.weights_map[name])
        loaded[name] = _get(layer, name)
    hook.offload = False  # the forward passes inside use the resident weights as they are
    try:
        yield
        changed = {n: t for n, t in _layer_tensors(layer).items() if loaded.get(n) is not t}
        if changed:
            _write_own(layer, hook, changed)
    finally:
        hook.offload = True
        for name, _ in _layer_tensors(layer).items():
            set_module_tensor_to_device(layer, name, "meta")


def each_resident(layers):
    """(index, layer) for each layer, the layer `resident` while the loop's body runs on it."""
    for index, layer in enumerate(layers):
        with resident(layer):
            yield index, layer


def _get(layer, name: str):
    owner, _, attr = name.rpartition(".")
    return getattr(layer.get_submodule(owner) if owner else layer, attr)


def _write_own(layer, hook: StreamHook, tensors: dict) -> None:
    """Add `tensors` to the layer's own store (a new file per write; later writes take precedence)."""
    from safetensors.torch import save_file

    if hook.folder is None or not isinstance(hook.weights_map, Overlay):
        raise RuntimeError(f"decoder layer {hook.index} of the dense model was changed; its store stays dense")
    own = hook.weights_map.own
    # a name no other write took, whatever the numbering (blockdrop renumbers the layers, refit_layers)
    handle, name = tempfile.mkstemp(prefix=f"layer-{hook.index}-", suffix=".safetensors", dir=hook.folder)
    os.close(handle)
    path = Path(name)
    with writing(path):
        save_file({n: t.detach().cpu().contiguous() for n, t in tensors.items()}, str(path))
    own.entries.update({n: (str(path), n) for n in tensors})


def own_entries(model) -> dict[str, tuple[str, str]]:
    """Where each tensor of a streamed perturbed model's own store (what pruning changed) lives, by its name in
    the model's state dict ('model.layers.3.self_attn.q_proj.weight') → (file, key); layer by layer, nothing read."""
    prefix = decoder_layers_prefix(model)
    out = {}
    for index, layer in enumerate(decoder_layers(model)):
        hook = layer_hook(layer)
        if hook is not None and isinstance(hook.weights_map, Overlay):
            for name, where in hook.weights_map.own.entries.items():
                out[f"{prefix}{index}.{name}"] = where
    return out


def own_tensors(model) -> FileStore:
    """Every tensor a streamed perturbed model holds in its own store, by its state-dict name: a FileStore, so
    each tensor is read from disk only when it is asked for (a 70B model's pruned layers never all at once)."""
    return FileStore(own_entries(model))


class Pending(NamedTuple):
    """One tensor to be written by `write_safetensors`: its name, dtype and shape, and `read()` giving it."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    read: Callable[[], torch.Tensor]


SAFETENSORS_DTYPES = {  # the dtype codes of the safetensors header
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}


def write_safetensors(path, tensors: list[Pending], metadata: dict[str, str] | None = None) -> None:
    """A standard safetensors file at `path` holding `tensors`, read (`Pending.read`) and written one at a time.

    safetensors' own writers take every tensor in memory at once; this one writes the documented format itself
    (8-byte little-endian header length, the JSON header {name: {dtype, shape, data_offsets}} padded with spaces
    to 8 bytes, then the raw little-endian bytes), the header first from the names, dtypes and shapes alone.
    The widest dtypes come first (as safetensors orders them) so every tensor is aligned in a memory map."""
    if sys.byteorder != "little":  # the format is little-endian; torch's bytes are the machine's
        raise RuntimeError("writing safetensors files one tensor at a time needs a little-endian machine")
    ordered = sorted(tensors, key=lambda t: -t.dtype.itemsize)  # stable: a layer's tensors stay together
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for t in ordered:
        size = math.prod(t.shape) * t.dtype.itemsize
        header[t.name] = {
            "dtype": SAFETENSORS_DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with writing(path), open_for_writing(path, "wb") as f:  # never through a link at its name
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for t in ordered:
            tensor = t.read()
            if tensor.dtype != t.dtype or tuple(tensor.shape) != tuple(t.shape):
                raise RuntimeError(
                    f"{t.name}: read {tensor.dtype} {tuple(tensor.shape)}, announced {t.dtype} {t.shape}"
                )
            f.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
            del tensor  # before the next read: one tensor in memory at a time


def in_memory(tensors: dict[str, torch.Tensor]) -> list[Pending]:
    """`tensors` (already in memory) as `write_safetensors` takes them."""
    return [Pending(name, t.dtype, tuple(t.shape), functools.partial(_same, t)) for name, t in tensors.items()]


def _same(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def write_own(model, path, metadata: dict[str, str] | None = None) -> None:
    """A streamed perturbed model's own tensors (as `own_tensors` names them) written to one safetensors file at
    `path`, one tensor in memory at a time: the pruned-weight cache entry (engine.perturb._store_pruned)."""
    store = own_tensors(model)
    params = dict(model.named_parameters(remove_duplicate=False))  # meta in the layers: dtypes and shapes only
    pending = [
        Pending(name, params[name].dtype, tuple(params[name].shape), functools.partial(store.__getitem__, name))
        for name in store
    ]
    write_safetensors(path, pending, metadata)


def adopt_file(model, path) -> dict[str, str] | None:
    """Make the tensors of the safetensors file `path` (state-dict names inside the decoder layers, as
    `write_own` writes them) the streamed perturbed `model`'s own store, without reading them: the file is
    hard-linked (copied where it cannot be) into the model's own folder, so removing `path` (`hierui cache
    clear`) cannot take it away, and each layer's store points into it. Returns the file's metadata, or None
    (nothing adopted) where a name is not a parameter of a decoder layer or its dtype or shape differ."""
    from safetensors import safe_open

    prefix = decoder_layers_prefix(model)
    params = dict(model.named_parameters(remove_duplicate=False))
    folder = getattr(model, STREAM_ATTR).folder
    own = folder / f"cached-{len(list(folder.glob('cached-*')))}.safetensors"
    _link_or_copy(Path(path), own)
    by_layer: dict[int, dict[str, tuple[str, str]]] = {}
    with safe_open(str(own), framework="pt") as f:
        metadata = f.metadata() or {}
        for name in f.keys():
            view = f.get_slice(name)
            param = params.get(name)
            if (
                not name.startswith(prefix)
                or param is None
                or tuple(view.get_shape()) != tuple(param.shape)
                or view.get_dtype() != SAFETENSORS_DTYPES.get(param.dtype)
            ):
                own.unlink()
                return None
            index, _, inner = name[len(prefix) :].partition(".")
            by_layer.setdefault(int(index), {})[inner] = (str(own), name)
    layers = decoder_layers(model)
    for index, entries in by_layer.items():
        layer_hook(layers[index]).weights_map.own.entries.update(entries)
    return metadata


def _link_or_copy(source: Path, target: Path) -> None:
    """`target` the same file as `source`: a hard link where the file system allows one, else a copy."""
    try:
        os.link(source, target)
    except OSError:
        with writing(target):  # a full disk: one line naming the file
            shutil.copyfile(source, target)


def resident_state(model) -> dict[str, torch.Tensor]:
    """The state dict of what a streamed model holds outside its decoder layers (embeddings, final norm, head)."""
    prefix = decoder_layers_prefix(model)
    return {name: t for name, t in model.state_dict().items() if not name.startswith(prefix)}


def layer_state(model, index: int) -> dict[str, torch.Tensor]:
    """Decoder layer `index`'s state dict under the model's names, on the CPU: its parameters read from its store
    (a perturbed model's own tensors where pruned, else the dense files'), cast to the model's dtype as they are
    when the layer runs; its buffers as the module holds them."""
    prefix = f"{decoder_layers_prefix(model)}{index}."
    layer = decoder_layers(model)[index]
    hook = layer_hook(layer)
    stored = set(hook.weights_map) if hook is not None else set()  # names only: nothing read yet
    out = {}
    for name, tensor in layer.state_dict(keep_vars=True).items():
        value = hook.weights_map[name].to(tensor.dtype) if name in stored else tensor
        out[prefix + name] = value.detach().cpu()
    return out


def refit_layers(model) -> None:
    """After modules of a streamed perturbed `model` were replaced or removed (engine.perturb.drop): each decoder
    layer's hook numbered by its place in the layer list (blockdrop renumbers the layers) and its store narrowed
    to the parameters the layer still has. A dropped sublayer's tensors stay in the dense model's files, but the
    layer must not name them: `resident` and `layer_state` bring in every name of the store. New stores are made;
    the dense model's is never changed."""
    for index, layer in enumerate(decoder_layers(model)):
        hook = layer_hook(layer)
        if hook is None:
            continue
        hook.index = index
        store = hook.weights_map
        if not isinstance(store, Overlay) or not isinstance(store.base, FileStore):
            raise RuntimeError(f"decoder layer {index} is not a streamed perturbed layer: its store cannot be narrowed")
        names = {name for name, _ in layer.named_parameters()}
        own = {n: where for n, where in store.own.entries.items() if n in names}
        base = {n: where for n, where in store.base.entries.items() if n in names}
        hook.weights_map = Overlay(FileStore(own), FileStore(base))


def release_layers(model) -> None:
    """Every streamed decoder layer's parameters back to meta tensors (their store keeps them): after a pass over
    the layers that may have stopped inside a layer's forward, before its hook released the weights."""
    for layer in decoder_layers(model):
        if layer_hook(layer) is not None:
            for name, tensor in _layer_tensors(layer).items():
                if tensor.device.type != "meta":
                    set_module_tensor_to_device(layer, name, "meta")
