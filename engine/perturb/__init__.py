"""Perturbations: from a loaded dense model and a spec, build the perturbed model as a `ModelPair`.

What each method is, is declared in the registry (engine.record.methods); its algorithm lives here, one module
per family: magnitude, wanda, sparsegpt (pruning), drop (attndrop/mlpdrop/blockdrop), quant (int8/nf4),
checkpoint, and pair (none, and the sharing clone every method starts from), each with the `build(job)` its
declaration names (engine.perturb.job.Job). The perturbed model is a `clone_sharing` copy of the dense one, so
every tensor a perturbation leaves alone is shared. Pruned weights and drop scores are cached on disk keyed by
(model, dtype, spec, calibration, the algorithm's ALGORITHM_VERSION, the hierui version), see engine.perturb.stored
and engine.perturb.cache, so a repeated run does not prune again and an upgraded algorithm never reuses an old result.
"""

from __future__ import annotations

import importlib
import time
from dataclasses import asdict, dataclass, field

from engine.errors import HieruiError, is_oom
from engine.perturb.job import Job, Progress
from engine.perturb.spec import Spec, parse_spec
from engine.perturb.stored import changed_tensors

__all__ = ["PerturbReport", "Progress", "changed_tensors", "perturb"]


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

    `calibration`: an engine.perturb.calibration.Calibration; built with `calib_options` (source, samples, length,
    seed; the others the method's defaults, engine.record.settings.calibration_for) when the spec needs one and
    none is given.
    """
    from engine.perturb.pair import ModelPair
    from engine.perturb.spec import check_streamable
    from engine.place.streaming import is_streamed
    from engine.record.methods import method

    spec = parse_spec(spec) if isinstance(spec, str) else spec
    declared = method(spec.method)
    say = progress or (lambda *_: None)
    dense = loaded.model
    if is_streamed(dense):  # streamed layers (engine.place.streaming): some methods only
        check_streamable([spec])
    if calibration is None and declared.calibrates:
        from engine.perturb.calibration import build_calibration
        from engine.record.settings import calibration_for

        # what was not given is the method's default, the same in every command (engine.record.settings)
        opts = calibration_for(spec.method, **(calib_options or {})).to_dict()
        started = time.perf_counter()
        calibration = build_calibration(
            loaded, use_cache=use_cache, progress=lambda d, t: say("calibrating", d, t), **opts
        )
        calibration.seconds = time.perf_counter() - started

    report = PerturbReport(spec=str(spec), calibration=calibration.describe() if calibration is not None else None)
    job = Job(loaded, spec, calibration, use_cache, say, report)
    start = time.perf_counter()
    try:
        perturbed = _algorithm(declared.apply)(job)
    except (MemoryError, RuntimeError) as e:
        if not is_oom(e):
            raise
        raise HieruiError(
            f"out of memory while applying {spec}: lower --calib-samples/--calib-len, use "
            f"--dtype bfloat16 or a smaller model",
            1,
        ) from None
    report.seconds = time.perf_counter() - start
    if declared.measures_zeros:  # quantized weights are not pruned: zeros of de-quantized experts mean nothing
        _measure_sparsity(dense, perturbed, report)
    if declared.keeps_layers:  # layer ℓ of both on one device (engine.place.placement); a drop renumbers the layers
        from engine.place.placement import check_same_placement

        check_same_placement(dense, perturbed)
    pair = ModelPair(
        dense=dense, perturbed=perturbed, tokenizer=loaded.tokenizer, spec=spec, report=report, loaded=loaded
    )
    if job.hidden_map is not None:  # -1: no counterpart (engine.perturb.pair)
        pair.hidden_map = list(job.hidden_map)
    return pair


def _algorithm(name: str):
    """The function a declaration names as "module:function" (Method.apply), imported now."""
    module, _, function = name.partition(":")
    return getattr(importlib.import_module(module), function)


def _measure_sparsity(dense, perturbed, report: PerturbReport) -> None:
    """Zeros over every WeightView (linears, Conv1Ds, expert slices; not routers), per type and in all; on
    MoE models also per expert in details['by_expert'] ([{layer, expert, dense, perturbed, total}]); per decoder
    layer in details['layer_sparsity']."""
    from engine.perturb.sparsity import count_zeros, sparsity_by_expert, sparsity_by_type

    d = sparsity_by_type(dense)
    p, by_layer = count_zeros(perturbed)
    if p["all"]["total"] == 0:  # quantized: no float weights to count
        return
    # each decoder layer's zeros (6 digits): the batch and kld tables' layer_sparsity, the report's chart
    report.details["layer_sparsity"] = [None if s is None else round(s, 6) for s in by_layer]
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
