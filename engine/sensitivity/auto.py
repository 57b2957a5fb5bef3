"""`@auto` (engine.perturb.allocation): the layer sparsities of `wanda:0.6@auto` from the model's own measured
sensitivity, chosen by engine.perturb.allocation.allocate_from_table.

The sensitivity is measured as `hierui sensitivity --unit layer` measures it (engine.sensitivity.run: the whole model
perturbed once per level, each layer alone scored against the dense model from the cached dense input of its layer),
at three levels, the bounds and the target (LO, target, HI of `@auto:LO:HI`, default the target ± 0.15), on the
**calibration** the spec prunes with — its sequences decoded to text and scored in windows of the calibration's
length — never on a text a user evaluates on. engine.perturb.allocated calls `allocation_for` by name (the method
registry's way: engine.perturb sits below this package) and caches what it returns with the pruned weights' keys
(model, dtype, spec, calibration), so the measurement runs once per model, spec and calibration.
"""

from __future__ import annotations

import tempfile
from dataclasses import replace


def allocation_for(job, say=None) -> dict:
    """The allocation (engine.perturb.allocation.read_file's format) of `job.spec` (an @auto spec) on
    `job.loaded`, from its sensitivity at the bounds and the target on `job.calibration`."""
    from engine.errors import HieruiError
    from engine.kld.corpus import text_hash
    from engine.perturb import perturb
    from engine.perturb.allocation import bounds
    from engine.sensitivity import folder
    from engine.sensitivity.run import allocation, run_sensitivity, unit_table

    spec, loaded, calibration = job.spec, job.loaded, job.calibration
    if calibration is None:  # magnitude calibrates nothing: it measures on the calibration every command gives wanda
        from engine.perturb.calibration import build_calibration
        from engine.record.settings import calibration_for

        calibration = build_calibration(loaded, use_cache=job.use_cache, **calibration_for("wanda").to_dict())
    lo, hi = bounds(spec.allocation, spec.sparsity)
    levels = [replace(spec, sparsity=s, allocation=None) for s in sorted({lo, spec.sparsity, hi})]
    tokenizer = loaded.tokenizer
    text = "\n\n".join(tokenizer.decode(row, skip_special_tokens=True) for row in calibration.ids.tolist())
    ctx = int(calibration.ids.shape[1])
    step = (lambda stage, d, t: say(f"@auto {stage}", d, t)) if say else None
    wanted = folder.manifest(
        loaded.ref.name, spec, levels, "layer", "calibration", text_hash(text), ctx, None, str(loaded.device),
        str(loaded.dtype).removeprefix("torch."), calibration.describe(),
    )  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="hierui-auto-") as out:
        try:
            rows = run_sensitivity(
                loaded,
                lambda level: perturb(loaded, level, calibration=calibration, use_cache=job.use_cache),
                levels,
                "layer",
                text,
                "calibration",
                ctx,
                None,
                out,
                wanted,
                progress=step,
            )
        except HieruiError as e:
            raise HieruiError(f"@auto: {e}", e.exit_code) from None
        data = allocation(rows, unit_table(loaded.model, "layer"), "layer", spec.method, spec.sparsity, lo=lo, hi=hi)
    data["measured_on"] = f"the calibration ({calibration.describe().get('source')}), windows of {ctx} tokens"
    data["levels"] = [level.sparsity for level in levels]
    return data
