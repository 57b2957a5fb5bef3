"""`hierui check`: a self-test of hierui's own numbers on the user's model, before they are trusted. UI-free.

For each perturbation spec the pair is built as every command builds it (engine.run.open.open_pair, with a small
calibration) and these checks run, each giving pass, fail or n/a with the deviation it measured (each check's
module says what it compares and how):

  zero      `none` only: the dense model against itself gives exactly zero divergence (engine.check.zero).
  cache     KV-cached stepping equals a full forward pass (engine.check.cache).
  batch     batched stepping equals one-at-a-time (engine.check.batch).
  sharing   the perturbed model shares every tensor the perturbation need not change with the dense model, and
            the dense model is not changed by perturbing and stepping (engine.check.sharing).
  sparsity  pruning only: every prunable matrix has exactly the zeros the spec asks for (engine.check.sparsity).

Their tolerances scale with the dtype the model runs in (engine.check.tolerance); the prompts and settings every
check steps are engine.check.stepping's.

A spec whose perturbation raises fails every check that applies to it, with the one-line reason; the other
specs still run. int8/nf4 are n/a where bitsandbytes is missing or cannot run on the device; a default spec
that does not fit the model (a drop of every layer, an N:M wider than a linear) is n/a with the reason.

This module runs them (run_selfcheck), and is the package's face: what the command, its view and the tests use
is importable from here.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable

import torch

from engine.check.batch import batch_floor, check_batch
from engine.check.cache import check_cache
from engine.check.result import CheckResult, SelfCheckReport
from engine.check.sharing import check_sharing, fingerprint
from engine.check.sparsity import check_sparsity, weight_views
from engine.check.tolerance import (
    dtype_name,
    kernel_dtype,
    metric_tolerance,
    rel_tolerance,
    side_tolerance,
    tolerance_rule,
)
from engine.check.zero import check_zero
from engine.errors import HieruiError, one_line
from engine.perturb.spec import Spec, parse_spec
from engine.record.methods import identity, self_check_specs

__all__ = [
    "CALIB_LENGTH",
    "CALIB_SAMPLES",
    "CHECKS",
    "DEFAULT_SPECS",
    "DEFAULT_STEPS",
    "CheckResult",
    "SelfCheckReport",
    "applies",
    "architecture",
    "batch_floor",
    "check_batch",
    "check_cache",
    "check_sharing",
    "check_sparsity",
    "check_zero",
    "kernel_dtype",
    "metric_tolerance",
    "rel_tolerance",
    "run_selfcheck",
    "side_tolerance",
    "tolerance_rule",
    "weight_views",
]


# none first, then each family's (Method.self_check, engine.record.methods.self_check_specs)
DEFAULT_SPECS = self_check_specs()
CHECKS = ("zero", "cache", "batch", "sharing", "sparsity")
DEFAULT_STEPS = 8
CALIB_SAMPLES = 8  # the small default calibration of a self-check: it tests the code paths, not the quality
CALIB_LENGTH = 64

Progress = Callable[[str, int, int], None]


def architecture(model) -> dict:
    """engine.record.architecture.describe of the model's config, with its class and parameter count."""
    from engine.record.architecture import describe

    return {
        **describe(model.config),
        "class": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def run_selfcheck(
    loaded,
    specs: list[str] | None = None,
    steps: int = DEFAULT_STEPS,
    calib_options: dict | None = None,
    use_cache: bool = False,
    progress: Progress | None = None,
) -> SelfCheckReport:
    """Every check (CHECKS) of every spec (default DEFAULT_SPECS) on `loaded` (engine.models.loading.LoadedModel)."""
    say = progress or (lambda *_: None)
    started = time.perf_counter()
    calib = {"samples": CALIB_SAMPLES, "length": CALIB_LENGTH, **(calib_options or {})}
    report = SelfCheckReport(
        model=loaded.ref.name,
        display=loaded.ref.display,
        device=str(loaded.device),
        dtype=dtype_name(loaded.dtype),
        architecture=architecture(loaded.model),
        steps=steps,
        calibration=calib,
    )
    calibration: list = []  # built once, on the first spec that needs it: [Calibration] or [exception]
    # gc.collect() after each spec frees that spec's pair (cycles included) before the next is built. Everything
    # that existed before the first spec (the dense model, the libraries: hundreds of thousands of objects) is
    # frozen meanwhile (gc.freeze), so each collection scans only what the specs made: milliseconds instead of a
    # pass over the whole heap per spec, and the same garbage freed. Unfrozen afterwards; left alone where the
    # caller has frozen objects of its own.
    freeze = gc.get_freeze_count() == 0
    if freeze:
        gc.freeze()
    try:
        for text in specs or DEFAULT_SPECS:
            spec = parse_spec(text) if isinstance(text, str) else text
            t0 = time.perf_counter()
            report.results.extend(_check_spec(loaded, spec, steps, calib, calibration, use_cache, say))
            report.spec_seconds[str(spec)] = round(time.perf_counter() - t0, 3)
            gc.collect()
            if loaded.device.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        if freeze:
            gc.unfreeze()
    report.seconds = time.perf_counter() - started
    return report


def applies(spec: Spec, check: str) -> str | None:
    """None when `check` applies to `spec`, else why not."""
    if check == "zero" and not spec.declared.identity:
        return f"only for {identity().name}"
    if check == "sparsity" and spec.family != "prune":
        return "pruning specs only"
    if check == "sharing" and not spec.declared.shares:
        return "a checkpoint is loaded from elsewhere: it shares nothing by design"
    return None


def _check_spec(loaded, spec: Spec, steps: int, calib: dict, calibration: list, use_cache: bool, say) -> list:
    name = str(spec)

    def every(status: str, reason: str) -> list[CheckResult]:
        return [
            CheckResult(name, c, "n/a" if applies(spec, c) else status, reason=applies(spec, c) or reason)
            for c in CHECKS
        ]

    unfit = _does_not_fit(spec, loaded.model)
    if unfit:
        return every("n/a", f"does not apply to this model: {unfit}")
    unstreamable = _does_not_stream(spec, loaded.model)
    if unstreamable:
        return every("n/a", unstreamable)
    if spec.family == "quant":
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None:
            return every("n/a", "bitsandbytes is not installed")
    say(f"perturbing: {name}", 0, 0)
    before = fingerprint(loaded.model)
    try:
        given = None
        if spec.needs_calibration:
            given = _calibration(loaded, calib, calibration, use_cache, say)
        pair = _perturb(loaded, spec, given, use_cache, say)
    except KeyboardInterrupt:
        raise
    except Exception as e:  # the perturbation itself failed: a fail of every check, the other specs go on
        if spec.family == "quant" and isinstance(e, HieruiError) and "bitsandbytes" in str(e):
            return every("n/a", one_line(e))  # the backend cannot run here (engine.perturb.quant says so)
        return every("fail", f"the perturbation failed: {one_line(e)}")
    return _run_checks(pair, spec, steps, before, say)


def _run_checks(pair, spec: Spec, steps: int, before: dict, say) -> list[CheckResult]:
    """Every check of CHECKS on `pair`: n/a where it does not apply, fail with the reason where it raises."""
    name = str(spec)
    alone: dict = {}  # the prompts stepped one at a time, shared by the cache and the batch checks
    runs = {
        "zero": lambda: check_zero(pair, steps),
        "cache": lambda: check_cache(pair, steps, alone),
        "batch": lambda: check_batch(pair, steps, alone),
        "sharing": lambda: check_sharing(pair, before),
        "sparsity": lambda: check_sparsity(pair),
    }
    out = []
    todo = [c for c in CHECKS if not applies(spec, c)]
    for check in CHECKS:
        why = applies(spec, check)
        if why:
            out.append(CheckResult(name, check, "n/a", reason=why))
            continue
        say(f"checking {name}", todo.index(check), len(todo))
        try:
            result = runs[check]()
        except KeyboardInterrupt:
            raise
        except Exception as e:
            result = CheckResult(name, check, "fail", reason=f"the check raised {one_line(e)}")
        result.spec, result.check = name, check
        if result.status == "fail" and check in ("cache", "batch"):
            result.reason += spec.declared.tolerance_note
        out.append(result)
    say(f"checking {name}", len(todo), len(todo))
    return out


def _does_not_stream(spec: Spec, model) -> str | None:
    """Why `spec` cannot run on `model` when its layers are streamed (--gpu-mem below the pair), else None."""
    from engine.perturb.spec import check_streamable
    from engine.place.streaming import is_streamed

    if not is_streamed(model):
        return None
    try:
        check_streamable([spec])
    except HieruiError as e:
        return str(e)
    return None


def _does_not_fit(spec: Spec, model) -> str | None:
    from engine.perturb.spec import check_fits

    try:
        check_fits(spec, model.config.to_dict())
    except HieruiError as e:
        return str(e)
    return None


def _calibration(loaded, calib: dict, calibration: list, use_cache: bool, say):
    if not calibration:
        from engine.perturb.calibration import build_calibration

        try:
            calibration.append(
                build_calibration(loaded, use_cache=use_cache, progress=lambda d, t: say("calibrating", d, t), **calib)
            )
        except KeyboardInterrupt:
            raise
        except Exception as e:
            calibration.append(e)
    if isinstance(calibration[0], Exception):
        raise HieruiError(f"calibration failed: {one_line(calibration[0])}", 1)
    return calibration[0]


def _perturb(loaded, spec: Spec, calibration, use_cache: bool, say):
    from engine.run.open import PairRequest, open_pair

    request = PairRequest(loaded.ref.name, use_cache=use_cache)
    return open_pair(request, spec, dense=loaded, calibration=calibration, progress=say)
