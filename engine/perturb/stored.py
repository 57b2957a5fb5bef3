"""The pruned-weight cache: pruning's new tensors and drop scores stored on disk and read back, keyed by model,
dtype, spec, calibration and the algorithm's and hierui's versions (the entries themselves: engine.perturb.cache)."""

from __future__ import annotations

import json
from collections.abc import Callable

from engine.perturb.job import Job


def _prune_key(loaded, spec, calibration):
    """The cache entry (engine.perturb.cache.Slot) of pruning `loaded` with `spec` (a Spec)."""
    text = str(spec)
    if spec.allocation is not None and spec.allocation.kind == "file":  # the file's content, not only its name
        from engine.perturb.allocation import file_hash

        text += f"#{file_hash(spec.allocation.path)}"
    return _entry(loaded, "pruned", spec.declared.algorithm, text, calibration)


def _scores_key(loaded, algorithm: str, calibration):
    """The cache entry of the drop scores `algorithm` computes on `loaded` from `calibration`."""
    return _entry(loaded, "scores", algorithm, None, calibration)


def _entry(loaded, kind: str, algorithm: str, spec: str | None, calibration):
    from engine.perturb import cache

    identity = {
        "model_key": loaded.ref.cache_key(),
        "dtype": str(loaded.dtype),
        "spec": spec,
        "calibration": calibration.key if calibration else None,
    }
    return cache.slot(kind, algorithm, identity, {"model": loaded.ref.name})


def _cached_json(entry, compute: Callable[[], dict], use_cache: bool) -> dict:
    """`compute()`, stored as the cache entry `entry` (a JSON file, engine.perturb.cache.Slot), read back later."""
    path = entry.path
    if use_cache and path.is_file():
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            pass  # a broken cache entry is recomputed
    value = compute()
    if use_cache:
        entry.store(json.dumps(value))
    return value


def build_pruned(job: Job, prune: Callable, prepare: Callable | None = None) -> object:
    """The pruned clone of `job`'s dense model: from the cache when it holds it, else `prune(clone, progress)`
    (returning the pruning's details) on a clone sharing every tensor, stored afterwards. Every WeightView
    (engine.anatomy.linears) is pruned: linears, GPT-2 Conv1Ds, each expert of a 3-D expert tensor; never routers.
    The details (expert token counts) travel with the cached weights. `prepare(clone)`: what runs on the clone
    before the pruning's progress starts (a layer allocation's dense pass, engine.perturb.allocated), its result
    handed to `prune(clone, progress, prepared)`."""
    from engine.anatomy.linears import decoder_layers
    from engine.perturb.pair import clone_sharing

    dense = job.dense
    entry = _prune_key(job.loaded, job.spec, job.calibration)
    if job.use_cache:
        cached = _load_pruned(dense, entry)
        if cached is not None:
            clone, details = cached
            job.report.from_cache = True
            job.report.details.update(details)
            return clone
    clone = clone_sharing(dense)
    prepared = prepare(clone) if prepare is not None else None
    step = lambda d, t: job.say("pruning", d, t)  # noqa: E731
    step(0, len(decoder_layers(clone)))  # the bar (and its clock) starts before the first layer
    details = prune(clone, step, prepared) if prepare is not None else prune(clone, step)
    job.report.details.update(details or {})
    if job.use_cache:
        job.say("storing the pruned weights in the cache", 0, 0)
        _store_pruned(dense, clone, entry, details or {})
    return clone


def changed_tensors(dense, perturbed) -> dict:
    """Parameters of `perturbed` that are not the dense model's own tensors, by state-dict name. Streamed layers:
    its own store (engine.place.streaming), a mapping that reads each tensor from disk only when it is asked for."""
    from engine.place.streaming import is_streamed, own_tensors

    if is_streamed(perturbed):
        return own_tensors(perturbed)
    dense_params = dict(dense.named_parameters())
    return {
        name: p
        for name, p in perturbed.named_parameters()
        if name not in dense_params or p.data_ptr() != dense_params[name].data_ptr()
    }


def _store_pruned(dense, perturbed, entry, details: dict | None = None) -> None:
    """Store the tensors `perturbed` does not share with `dense` as the cache entry `entry` (engine.perturb.cache.Slot),
    whole 3-D expert parameters and GPT-2 Conv1D weights included (stored as the model holds them), with the
    pruning's `details` (JSON) in the file's metadata. Streamed layers: the same file, written one tensor at a
    time (engine.place.streaming.write_own), never all the pruned layers in memory."""
    from safetensors.torch import save_file

    from engine.place.streaming import is_streamed, write_own

    metadata = {"details": json.dumps(details or {})}
    if is_streamed(perturbed):
        entry.store(lambda tmp: write_own(perturbed, tmp, metadata))
        return
    tensors = {n: p.detach().cpu().contiguous() for n, p in changed_tensors(dense, perturbed).items()}
    entry.store(lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def _load_pruned(dense, entry):
    """(the clone with the cached tensors, the stored details), or None when there is no usable entry. Streamed
    layers: nothing is read, the clone's own store points into (a hard link of) the file (engine.place.streaming)."""
    import torch.nn as nn
    from safetensors import safe_open
    from safetensors.torch import load_file

    from engine.perturb.pair import clone_sharing
    from engine.place.streaming import adopt_file, is_streamed

    path = entry.path
    if not path.is_file():
        return None
    if is_streamed(dense):
        clone = clone_sharing(dense)
        try:
            metadata = adopt_file(clone, path)
            details = json.loads((metadata or {}).get("details") or "{}")
        except Exception:
            return None  # a corrupt cache entry is recomputed
        return None if metadata is None else (clone, details)
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            details = json.loads((f.metadata() or {}).get("details") or "{}")
    except Exception:
        return None  # a corrupt cache entry is recomputed
    clone = clone_sharing(dense)
    modules = dict(clone.named_modules())
    for name, tensor in tensors.items():
        owner, _, attr = name.rpartition(".")
        module = modules.get(owner)
        old = getattr(module, attr, None) if module is not None else None
        if old is None or old.shape != tensor.shape:
            return None
        # a copy: fresh memory, aligned as the computed weights were, so a cache hit computes bit for bit alike
        new = tensor.to(device=old.device, dtype=old.dtype, copy=True)
        setattr(module, attr, nn.Parameter(new, requires_grad=False))
    return clone, details
