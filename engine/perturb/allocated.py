"""The sparsity of every matrix of a model for a pruning spec with a layer allocation (`wanda:0.6@owl`,
`@FILE.json`; engine.perturb.allocation says what they mean), as the pruning methods read it: `Rates`."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from engine.anatomy.linears import decoder_layers, weight_views
from engine.perturb.allocation import (
    Matrix,
    by_layer,
    check_file,
    file_hash,
    file_sparsities,
    owl_sparsities,
    read_file,
)
from engine.perturb.allocation import realize as realize_counts
from engine.perturb.allocation import realized as realized_fractions
from engine.place.streaming import each_resident


@dataclass
class Rates:
    """Per matrix (layer, name) the sparsity handed to the method, and what the report records (`details`)."""

    spec: object  # the Spec
    given: dict = field(default_factory=dict)
    details: dict = field(default_factory=dict)

    def spec_for(self, view):
        """The spec to prune `view` (an engine.anatomy.linears.WeightView) with: the spec at its own sparsity."""
        return replace(self.spec, sparsity=self.given[(view.layer, view.name)], allocation=None)

    def of(self, view) -> float:
        return self.given[(view.layer, view.name)]


def matrices(model) -> list[Matrix]:
    """Every pruned matrix of the model's decoder layers (WeightViews: linears, Conv1Ds, expert slices)."""
    out = []
    for index, layer in each_resident(decoder_layers(model)):
        for v in weight_views(layer, index):
            out.append(Matrix(index, v.name, v.out_features, v.in_features))
    return out


AUTO = "engine.sensitivity.auto:allocation_for"  # @auto's measurement, named (it sits above engine.perturb)


def rates(model, spec, calib_ids: torch.Tensor | None = None, say=None, job=None) -> Rates | None:
    """The Rates of `spec` on `model` (dense: the OWL ratios read its weights and activations), None for a spec
    without an allocation. `calib_ids`: the calibration of a method that calibrates (OWL's ‖X‖); `say(stage, done,
    total)`: progress (engine.perturb.Progress); `job` (engine.perturb.job.Job): what @auto measures with (its
    loaded model, calibration and cache setting)."""
    allocation = spec.allocation
    if allocation is None:
        return None
    found = matrices(model)
    per_row = bool(spec.declared.per_row)
    details: dict = {"allocation": str(allocation), "kind": allocation.kind, "target": spec.sparsity}
    if allocation.kind == "owl":
        from engine.perturb import owl

        step = (lambda d, t: say("outlier ratios (OWL)", d, t)) if say else None
        if spec.declared.calibrates:
            ratios = owl.wanda_ratios(model, calib_ids, allocation.m, progress=step)
        else:
            ratios = owl.magnitude_ratios(model, allocation.m, progress=step)
        layer_wanted = owl_sparsities(ratios, spec.sparsity, allocation.lam)
        wanted = {(m.layer, m.name): layer_wanted[m.layer] for m in found}
        details.update(m=allocation.m, lam=allocation.lam, outlier_ratios=ratios, wanted=layer_wanted)
    elif allocation.kind == "auto":
        wanted, details["auto"] = _auto(spec, found, job, say)
    else:
        shapes = [(m.layer, m.name, m.weights) for m in found]
        check_file(allocation.path, shapes, spec.sparsity)
        wanted = file_sparsities(read_file(allocation.path), shapes, allocation.path)
        details["sha256"] = file_hash(allocation.path)
    given = realize_counts(found, wanted, per_row, spec.sparsity)
    fractions = realized_fractions(found, given, per_row)
    details["layers"] = by_layer(found, fractions)
    details["given"] = {f"layers.{layer}.{name}": s for (layer, name), s in given.items()}  # what the method read
    total = sum(m.weights for m in found)
    details["sparsity"] = sum(fractions[(m.layer, m.name)] * m.weights for m in found) / total
    return Rates(spec, given, details)


def _auto(spec, found: list[Matrix], job, say) -> tuple[dict, dict]:
    """@auto's wanted sparsities per matrix and what the report keeps of its measurement: engine.sensitivity.auto
    (imported by name) on the job's model and calibration, cached as the pruned weights are keyed."""
    import importlib

    from engine.errors import HieruiError
    from engine.perturb.stored import _cached_json, _entry

    if job is None:
        raise HieruiError(f"{spec}: @auto measures the model's sensitivity through perturb(); call it from there")
    module, _, function = AUTO.partition(":")
    measure = getattr(importlib.import_module(module), function)
    entry = _entry(job.loaded, "scores", spec.declared.algorithm, f"{spec}#auto-v1", job.calibration)
    data = _cached_json(entry, lambda: measure(job, say), job.use_cache)
    shapes = [(m.layer, m.name, m.weights) for m in found]
    wanted = file_sparsities(data, shapes, f"{spec}'s measured allocation")
    kept = {k: data[k] for k in ("levels", "bounds", "predicted_kl", "measured_on") if k in data}
    return wanted, kept


def check_before_loading(spec, config: dict | None) -> None:
    """A spec's allocation file against the model's config.json, before the weights load: the file itself
    (engine.perturb.allocation.read_file), and where the model's shape can be built from the config (on torch's
    meta device, no memory), its layer and matrix names and its mean sparsity (check_file). One line, exit 2."""
    allocation = spec.allocation
    if allocation is None or allocation.kind != "file":
        return
    read_file(allocation.path)
    if not config:
        return
    try:
        from transformers import AutoConfig, AutoModelForCausalLM

        fields = {k: v for k, v in config.items() if k != "model_type"}
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.for_model(config["model_type"], **fields))
    except Exception:  # a config transformers cannot build here: checked once the model has loaded (rates)
        return
    check_file(allocation.path, [(m.layer, m.name, m.weights) for m in matrices(model)], spec.sparsity)
