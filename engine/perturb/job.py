"""What a method's algorithm gets to build the perturbed model (`Job`), and what it hands back beside the model."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# progress(stage, done, total): stage is a short label such as "calibrating" or "pruning"
Progress = Callable[[str, int, int], None]


@dataclass
class Job:
    """One perturbation to build: a method's `build(job)` (named by Method.apply, engine.record.methods) returns
    the perturbed model, fills `report.details`, and sets `hidden_map` when the layers no longer correspond one to
    one (engine.perturb.pair.ModelPair.hidden_map)."""

    loaded: Any  # engine.models.loading.LoadedModel of the dense model
    spec: Any  # engine.perturb.spec.Spec
    calibration: Any  # engine.perturb.calibration.Calibration, None for a method that does not calibrate
    use_cache: bool
    say: Progress
    report: Any  # engine.perturb.PerturbReport
    hidden_map: list[int] | None = None

    @property
    def dense(self):
        return self.loaded.model
