"""Perturbations: from a loaded dense model and a spec, build the perturbed model as a `ModelPair`.

One module per family: magnitude, wanda, sparsegpt (pruning), drop (attndrop/mlpdrop/blockdrop),
quant (int8/nf4), checkpoint. The perturbed model is a `clone_sharing` copy of the dense one, so every
tensor a perturbation leaves alone is shared. Pruned weights and drop scores are cached on disk keyed by
(model, dtype, spec, calibration, the algorithm's ALGORITHM_VERSION, the hierui version), see engine.perturb.cache,
so a repeated run does not prune again and an upgraded algorithm never reuses an old result.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from engine.errors import HieruiError, is_oom
from engine.perturb.spec import Spec, parse_spec

# progress(stage, done, total): stage is a short label such as "calibrating" or "pruning"
Progress = Callable[[str, int, int], None]


@dataclass
class PerturbReport:
    """What a perturbation did, for the header, the prune table and the session file."""

    spec: str
    seconds: float = 0.0
    from_cache: bool = False
    # zero fraction over the decoder weight matrices of the perturbed model: every WeightView (linears, GPT-2
    # Conv1Ds, each expert's matrices; not routers), engine.anatomy.linears
    measured_sparsity: float | None = None
    dense_sparsity: float | None = None  # the same for the dense model (GGUF de-quantization leaves zeros)
    by_type: dict = field(default_factory=dict)  # {q_proj: {dense, perturbed, total}, ...}
    calibration: dict | None = None
    # method-specific: dropped indices, scores, ...; MoE pruning: by_expert, expert_tokens, experts_without_tokens
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def perturb(
    loaded,
    spec: Spec | str,
    calibration=None,
    use_cache: bool = True,
    progress: Progress | None = None,
    calib_options: dict | None = None,
):
    """Build the ModelPair for `spec` over `loaded` (an engine.models.loading.LoadedModel).

    `calibration`: an engine.perturb.calibration.Calibration; built with `calib_options` when the spec needs
    one and none is given.
    """
    from engine.perturb.pair import ModelPair

    spec = parse_spec(spec) if isinstance(spec, str) else spec
    say = progress or (lambda *_: None)
    dense = loaded.model
    from engine.perturb.spec import check_streamable
    from engine.place.streaming import is_streamed

    if is_streamed(dense):  # streamed layers (engine.place.streaming): some methods only
        check_streamable([spec])
    if calibration is None and spec.needs_calibration:
        from engine.perturb.calibration import build_calibration

        opts = dict(calib_options or {})
        started = time.perf_counter()
        calibration = build_calibration(
            loaded, use_cache=use_cache, progress=lambda d, t: say("calibrating", d, t), **opts
        )
        calibration.seconds = time.perf_counter() - started

    report = PerturbReport(spec=str(spec), calibration=calibration.describe() if calibration is not None else None)
    start = time.perf_counter()
    try:
        perturbed = _build(loaded, spec, calibration, use_cache, say, report)
    except (MemoryError, RuntimeError) as e:
        if not is_oom(e):
            raise
        raise HieruiError(
            f"out of memory while applying {spec}: lower --calib-samples/--calib-len, use "
            f"--dtype bfloat16 or a smaller model",
            1,
        ) from None
    report.seconds = time.perf_counter() - start
    if spec.family != "quant":  # quantized weights are not pruned: zeros of de-quantized experts mean nothing
        _measure_sparsity(dense, perturbed, report)
    if spec.family != "drop":  # layer ℓ of both on one device (engine.place.placement); a drop renumbers the layers
        from engine.place.placement import check_same_placement

        check_same_placement(dense, perturbed)
    pair = ModelPair(
        dense=dense, perturbed=perturbed, tokenizer=loaded.tokenizer, spec=spec, report=report, loaded=loaded
    )
    if spec.method == "checkpoint" and "hidden_map" in report.details.get("structure", {}):
        pair.hidden_map = list(report.details["structure"]["hidden_map"])  # -1: no counterpart (engine.perturb.pair)
    if spec.method == "blockdrop":
        from engine.perturb.drop import hidden_map_after_block_drop

        pair.hidden_map = hidden_map_after_block_drop(dense.config.num_hidden_layers, report.details["dropped"])
    return pair


def _build(loaded, spec: Spec, calibration, use_cache: bool, say: Progress, report: PerturbReport):
    from engine.perturb.pair import clone_sharing

    dense = loaded.model
    if spec.method == "none":
        return clone_sharing(dense)
    if spec.method == "checkpoint":
        from engine.perturb.checkpoint import load_checkpoint

        return load_checkpoint(loaded, spec, progress=lambda m: say(m, 0, 0), report=report)
    if spec.family == "quant":
        from engine.perturb.quant import quantize

        clone = clone_sharing(dense)
        say(f"quantizing to {spec}", 0, 0)
        report.details.update(quantize(clone, spec) or {})
        return clone
    if spec.family == "drop":
        from engine.perturb.drop import apply_drop, similarity_scores

        def score():
            return similarity_scores(dense, calibration.ids, progress=lambda d, t: say("scoring", d, t))

        scores = _cached_json(_prune_key(loaded, "similarity", calibration), score, use_cache)
        clone = clone_sharing(dense)
        report.details.update(apply_drop(dense, clone, spec, calibration.ids, scores=scores) or {})
        return clone

    # pruning: magnitude / wanda / sparsegpt
    # every WeightView (engine.anatomy.linears) is pruned: linears, GPT-2 Conv1Ds, each expert of a 3-D expert
    # tensor; never routers. The details (expert token counts) travel with the cached weights.
    entry = _prune_key(loaded, spec, calibration)
    if use_cache:
        cached = _load_pruned(dense, entry)
        if cached is not None:
            clone, details = cached
            report.from_cache = True
            report.details.update(details)
            return clone
    clone = clone_sharing(dense)
    step = lambda d, t: say("pruning", d, t)  # noqa: E731
    from engine.anatomy.linears import decoder_layers

    step(0, len(decoder_layers(clone)))  # the bar (and its clock) starts before the first layer
    if spec.method == "magnitude":
        from engine.perturb.magnitude import prune_magnitude

        details = prune_magnitude(clone, spec, progress=step)
    elif spec.method == "wanda":
        from engine.perturb.wanda import prune_wanda

        details = prune_wanda(clone, spec, calibration.ids, progress=step)
    elif spec.method == "sparsegpt":
        from engine.perturb.sparsegpt import prune_sparsegpt

        details = prune_sparsegpt(clone, spec, calibration.ids, progress=step)
    else:  # pragma: no cover - parse_spec rejects anything else
        raise HieruiError(f"unsupported method {spec.method}")
    report.details.update(details or {})
    if use_cache:
        say("storing the pruned weights in the cache", 0, 0)
        _store_pruned(dense, clone, entry, details or {})
    return clone


# ------------------------------------------------------------------ measuring


def _measure_sparsity(dense, perturbed, report: PerturbReport) -> None:
    """Zeros over every WeightView (linears, Conv1Ds, expert slices; not routers), per type and in all; on
    MoE models also per expert in details['by_expert'] ([{layer, expert, dense, perturbed, total}])."""
    from engine.perturb.sparsity import sparsity_by_expert, sparsity_by_type

    d = sparsity_by_type(dense)
    p = sparsity_by_type(perturbed)
    if p["all"]["total"] == 0:  # quantized: no float weights to count
        return
    report.by_type = {
        t: {"dense": d[t]["sparsity"] if t in d else None, "perturbed": row["sparsity"], "total": row["total"]}
        for t, row in p.items()
    }
    report.measured_sparsity = p["all"]["sparsity"]
    report.dense_sparsity = d["all"]["sparsity"]
    experts = sparsity_by_expert(perturbed)
    if experts:
        dense_experts = {(r["layer"], r["expert"]): r["sparsity"] for r in sparsity_by_expert(dense)}
        report.details["by_expert"] = [
            {
                "layer": r["layer"],
                "expert": r["expert"],
                "dense": dense_experts.get((r["layer"], r["expert"])),
                "perturbed": r["sparsity"],
                "total": r["total"],
            }
            for r in experts
        ]


# ------------------------------------------------------------------ the pruned-weight cache


def _prune_key(loaded, spec: Spec | str, calibration):
    """The cache entry (engine.perturb.cache.Slot) of pruning `loaded` with `spec`, or of its drop scores when
    `spec` is "similarity": keyed by model, dtype, spec, calibration and the algorithm and hierui versions."""
    from engine.perturb import cache

    scores = spec == "similarity"
    identity = {
        "model_key": loaded.ref.cache_key(),
        "dtype": str(loaded.dtype),
        "spec": None if scores else str(spec),
        "calibration": calibration.key if calibration else None,
    }
    return cache.slot(
        "scores" if scores else "pruned", "similarity" if scores else spec.method, identity, {"model": loaded.ref.name}
    )


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

    metadata = {"details": json.dumps(details or {})}
    from engine.place.streaming import is_streamed, write_own

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

    path = entry.path
    if not path.is_file():
        return None
    from engine.place.streaming import adopt_file, is_streamed

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
