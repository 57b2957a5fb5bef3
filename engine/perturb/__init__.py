"""Perturbations: from a loaded dense model and a spec, build the perturbed model as a `ModelPair`.

One module per family: magnitude, wanda, sparsegpt (pruning), drop (attndrop/mlpdrop/blockdrop),
quant (int8/nf4), checkpoint. The perturbed model is a `clone_sharing` copy of the dense one, so every
tensor a perturbation leaves alone is shared. Pruned weights are cached on disk keyed by
(model, spec, calibration) so a repeated run does not prune again.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

from engine.errors import HieruiError
from engine.perturb.spec import Spec, parse_spec

# progress(stage, done, total): stage is a short label such as "calibrating" or "pruning"
Progress = Callable[[str, int, int], None]


@dataclass
class PerturbReport:
    """What a perturbation did, for the header, the prune table and the session file."""

    spec: str
    seconds: float = 0.0
    from_cache: bool = False
    measured_sparsity: float | None = None  # zero fraction over the decoder linears of the perturbed model
    dense_sparsity: float | None = None  # the same for the dense model (GGUF de-quantization leaves zeros)
    by_type: dict = field(default_factory=dict)  # {q_proj: {dense, perturbed, total}, ...}
    calibration: dict | None = None
    details: dict = field(default_factory=dict)  # method-specific: dropped indices, scores, ...

    def to_dict(self) -> dict:
        return asdict(self)


def perturb(loaded, spec: Spec | str, calibration=None, use_cache: bool = True,
            progress: Progress | None = None, calib_options: dict | None = None):
    """Build the ModelPair for `spec` over `loaded` (an engine.models.LoadedModel).

    `calibration`: an engine.calibration.Calibration; built with `calib_options` when the spec needs
    one and none is given.
    """
    from engine.pair import ModelPair

    spec = parse_spec(spec) if isinstance(spec, str) else spec
    say = progress or (lambda *_: None)
    dense = loaded.model
    if calibration is None and spec.needs_calibration:
        from engine.calibration import build_calibration

        opts = dict(calib_options or {})
        started = time.perf_counter()
        calibration = build_calibration(loaded, use_cache=use_cache,
                                        progress=lambda d, t: say("calibrating", d, t), **opts)
        calibration.seconds = time.perf_counter() - started

    report = PerturbReport(spec=str(spec), calibration=calibration.describe() if calibration is not None else None)
    start = time.perf_counter()
    try:
        perturbed = _build(loaded, spec, calibration, use_cache, say, report)
    except MemoryError:
        raise HieruiError(f"out of memory while applying {spec}: lower --calib-samples/--calib-len or use a smaller model", 1) from None
    except RuntimeError as e:
        if type(e).__name__ == "OutOfMemoryError":
            raise HieruiError(f"CUDA out of memory while applying {spec}: lower --calib-samples/--calib-len, "
                              f"use --dtype bfloat16 or a smaller model", 1) from None
        raise
    report.seconds = time.perf_counter() - start
    _measure_sparsity(dense, perturbed, report)
    return ModelPair(dense=dense, perturbed=perturbed, tokenizer=loaded.tokenizer, spec=spec, report=report, loaded=loaded)


def _build(loaded, spec: Spec, calibration, use_cache: bool, say: Progress, report: PerturbReport):
    from engine.pair import clone_sharing

    dense = loaded.model
    if spec.method == "none":
        return clone_sharing(dense)
    if spec.method == "checkpoint":
        from engine.perturb.checkpoint import load_checkpoint

        return load_checkpoint(loaded, spec, progress=lambda m: say(m, 0, 0))
    if spec.family == "quant":
        from engine.perturb.quant import quantize

        clone = clone_sharing(dense)
        report.details.update(quantize(clone, spec) or {})
        return clone
    if spec.family == "drop":
        from engine.perturb.drop import apply_drop, similarity_scores

        def score():
            return similarity_scores(dense, calibration.ids, progress=lambda d, t: say("scoring", d, t))

        scores = _cached_json(f"{_prune_key(loaded, 'similarity', calibration)}-similarity", score, use_cache)
        clone = clone_sharing(dense)
        report.details.update(apply_drop(dense, clone, spec, calibration.ids, scores=scores) or {})
        return clone

    # pruning: magnitude / wanda / sparsegpt
    key = _prune_key(loaded, spec, calibration)
    if use_cache:
        cached = _load_pruned(dense, key)
        if cached is not None:
            report.from_cache = True
            return cached
    clone = clone_sharing(dense)
    step = lambda d, t: say("pruning", d, t)  # noqa: E731
    if spec.method == "magnitude":
        from engine.perturb.magnitude import prune_magnitude

        prune_magnitude(clone, spec, progress=step)
    elif spec.method == "wanda":
        from engine.perturb.wanda import prune_wanda

        prune_wanda(clone, spec, calibration.ids, progress=step)
    elif spec.method == "sparsegpt":
        from engine.perturb.sparsegpt import prune_sparsegpt

        prune_sparsegpt(clone, spec, calibration.ids, progress=step)
    else:  # pragma: no cover - parse_spec rejects anything else
        raise HieruiError(f"unsupported method {spec.method}")
    if use_cache:
        _store_pruned(dense, clone, key)
    return clone


# ------------------------------------------------------------------ measuring


def _measure_sparsity(dense, perturbed, report: PerturbReport) -> None:
    from engine.perturb.linears import sparsity_by_type

    d = sparsity_by_type(dense)
    p = sparsity_by_type(perturbed)
    if p["all"]["total"] == 0:  # quantized: no float weights to count
        return
    report.by_type = {t: {"dense": d[t]["sparsity"] if t in d else None, "perturbed": row["sparsity"],
                          "total": row["total"]} for t, row in p.items()}
    report.measured_sparsity = p["all"]["sparsity"]
    report.dense_sparsity = d["all"]["sparsity"]


# ------------------------------------------------------------------ the pruned-weight cache


def _prune_key(loaded, spec: Spec | str, calibration) -> str:
    raw = json.dumps([loaded.ref.cache_key(), str(loaded.dtype), str(spec), calibration.key if calibration else None])
    return hashlib.sha1(raw.encode()).hexdigest()[:20]


def _cached_json(name: str, compute: Callable[[], dict], use_cache: bool) -> dict:
    """`compute()`, stored as $HIERUI_HOME/pruned/NAME.json and read back next time."""
    from engine.models import hierui_home

    path = hierui_home() / "pruned" / f"{name}.json"
    if use_cache and path.is_file():
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            pass  # a broken cache entry is recomputed
    value = compute()
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(value), encoding="utf-8")
        tmp.replace(path)
    return value


def _changed_tensors(dense, perturbed) -> dict:
    """Parameters of `perturbed` that are not the dense model's own tensors, by state-dict name."""
    dense_params = dict(dense.named_parameters())
    return {name: p for name, p in perturbed.named_parameters()
            if name not in dense_params or p.data_ptr() != dense_params[name].data_ptr()}


def _store_pruned(dense, perturbed, key: str) -> None:
    from safetensors.torch import save_file

    from engine.models import hierui_home

    target = hierui_home() / "pruned" / f"{key}.safetensors"
    target.parent.mkdir(parents=True, exist_ok=True)
    tensors = {n: p.detach().cpu().contiguous() for n, p in _changed_tensors(dense, perturbed).items()}
    tmp = target.with_suffix(".tmp")
    save_file(tensors, str(tmp))
    tmp.replace(target)


def _load_pruned(dense, key: str):
    import torch.nn as nn
    from safetensors.torch import load_file

    from engine.models import hierui_home
    from engine.pair import clone_sharing

    path = hierui_home() / "pruned" / f"{key}.safetensors"
    if not path.is_file():
        return None
    try:
        tensors = load_file(str(path))
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
        setattr(module, attr, nn.Parameter(tensor.to(device=old.device, dtype=old.dtype), requires_grad=False))
    return clone
