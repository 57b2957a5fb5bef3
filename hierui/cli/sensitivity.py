"""`hierui sensitivity`: the corpus KLD of perturbing one unit at a time (a layer, a sublayer or a weight matrix)
while everything else stays dense, in `hierui kld`'s windows and statistics (engine.sensitivity)."""

import time
from pathlib import Path
from typing import Optional

import typer

from engine.errors import HieruiError
from hierui.cli import checks, launch, options
from hierui.cli.apps import app
from hierui.cli.kld import _calibration, _check_corpus, _request
from hierui.output import console, err_console

UNIT_HELP = "what is perturbed alone: layer (a decoder layer), sublayer (its attention, its MLP) or matrix"
SPARSITIES_HELP = (
    "measure each unit at these sparsities (e.g. 0.3,0.5,0.7; an unstructured pruning spec's own sparsity is "
    "replaced): what --allocate and @auto need"
)
ALLOCATE_HELP = (
    "after measuring, choose per-unit sparsities averaging TARGET that minimise the predicted KLD, written to "
    "OUT/allocation.json (use it as --prune METHOD:TARGET@OUT/allocation.json)"
)
SHOWN = 40  # rows of the terminal table (the most damaging); the Parquet table holds them all
Out = options.out("output folder (default runs/sensitivity-<time>); the same command into it resumes")


@app.command()
def sensitivity(
    model: options.Model = "smollm2-135m",
    spec: Optional[str] = typer.Option(None, "--prune", "-p", help=options.SPEC_HELP),
    text: options.Text = None,
    suite: options.Suite = None,
    ctx: options.Ctx = 512,
    stride: options.Stride = None,
    unit: str = typer.Option("layer", "--unit", help=UNIT_HELP),
    sparsities: Optional[str] = typer.Option(None, "--sparsities", help=SPARSITIES_HELP),
    allocate: Optional[float] = typer.Option(None, "--allocate", help=ALLOCATE_HELP, show_default=False),
    out: Out = None,
    device: options.Device = "auto",
    dtype: options.Dtype = "auto",
    gpu_mem: options.GpuMem = None,
    gpus: options.Gpus = None,
    calib: options.Calib = None,
    calib_samples: options.CalibSamples = None,
    calib_len: options.CalibLen = None,
    calib_seed: options.CalibSeed = None,
    no_cache: options.NoCache = False,
) -> None:
    """Per-unit sensitivity: the damage of perturbing only one unit with --prune SPEC, everything else dense.

    For each decoder layer (--unit layer), attention and MLP (sublayer) or weight matrix (matrix): the corpus KLD
    against the dense model (mean with its bootstrap interval, median, 99th percentile), top-1 agreement and the
    perplexity change, scored as `hierui kld` scores. The model is perturbed once per level and each unit starts
    from the dense hidden states at its layer. Interrupted, the same command resumes."""
    from engine.kld import corpus as kldmod
    from engine.models.names import resolve
    from engine.perturb.spec import parse_spec
    from engine.sensitivity.levels import levels as levels_of
    from engine.sensitivity.levels import parse_sparsities
    from engine.sensitivity.units import check_unit

    resolve(model)
    if spec is None:
        raise HieruiError("give --prune SPEC: the perturbation each unit gets alone (e.g. wanda:0.5)")
    check_unit(unit)
    parsed = parse_spec(spec)
    levels = levels_of(parsed, parse_sparsities(sparsities))
    if allocate is not None:
        _check_allocate(parsed, allocate)
    if text is not None and suite is not None:
        raise HieruiError("give --text or --suite, not both")
    kldmod.check_window(ctx, stride)
    checks.check_dtype(dtype)
    typed = {"--calib": calib, "--calib-samples": calib_samples, "--calib-len": calib_len, "--calib-seed": calib_seed}
    checks.calibration_unused(levels, typed)
    given = _calibration(model, levels, calib, calib_samples, calib_len, calib_seed)
    corpus = str(text) if text is not None else (suite or "heldout")
    body = kldmod.read_text(text) if text is not None else kldmod.suite_text(suite or "heldout")
    _check_corpus(model, levels, device, body, ctx, stride, None, None, None, "hierui")
    out = checks.writable_folder(out or Path("runs") / time.strftime("sensitivity-%Y%m%d-%H%M%S"), "--out")
    request = _request(model, levels, ctx, device, dtype, gpu_mem, gpus, not no_cache, given)
    from engine.record.lock import lock_folder
    from engine.record.settings import calibrations
    from engine.sensitivity import folder

    calibration = calibrations(levels, **given)
    with lock_folder(out, warn=_say):
        wanted = folder.manifest(
            request.model, parsed, levels, unit, corpus, kldmod.text_hash(body), ctx, stride, request.device,
            request.dtype, calibration or None,
        )  # fmt: skip
        done = folder.check_out(wanted, out)
        if done:
            _say(f"{out}: resuming, {len(done)} row{'s' * (len(done) != 1)} already measured there")
        if allocate is not None and text is None:
            _say(
                f"note: allocating from the shipped {corpus} suite; evaluate the allocated model on another text "
                "(or measure here with --text)"
            )
        plan = launch.print_plan(request, always=False)
        from engine.run.plan import plans_streaming

        if plans_streaming(plan):
            raise HieruiError(
                "hierui sensitivity needs the model in memory, and this pair would be streamed from disk: raise "
                "--gpu-mem, use --dtype bfloat16 or a smaller model"
            )
        _measure(request, plan, parsed, levels, unit, body, corpus, ctx, stride, out, wanted, calibration, allocate)


def _check_allocate(spec, target: float) -> None:
    """--allocate TARGET: a sparsity in (0, 1) for an unstructured pruning spec."""
    if not 0 < target < 1:
        raise HieruiError(f"--allocate {target:g}: a target sparsity is in (0, 1)")
    if spec.sparsity is None or spec.declared is None or not spec.declared.allocates:
        from engine.record.methods import methods

        allocating = ", ".join(m.name for m in methods() if m.allocates)
        raise HieruiError(
            f"--allocate does not go with --prune {spec}: it allocates the sparsity of an unstructured pruning "
            f"method ({allocating})"
        )
    if spec.allocation is not None:
        raise HieruiError(f"--allocate does not go with --prune {spec}: measure without an allocation (@…)")


def _say(text: str) -> None:
    err_console.print(text, highlight=False, markup=False, soft_wrap=True)


def _measure(request, plan, spec, levels, unit, body, corpus, ctx, stride, out, wanted, calibration, allocate):
    """Load, measure every unit at every level (resuming OUT), print the table; --allocate writes the allocation."""
    from engine.run.open import open_dense, open_pair
    from engine.sensitivity.run import allocation, run_sensitivity, unit_table
    from hierui.progress import stage_progress
    from hierui.views.sensitivity import print_table

    with stage_progress(err_console) as (_say_stage, step):
        loaded = open_dense(request, plan, progress=step)

        def open_level(level):
            return open_pair(request, level, dense=loaded, calib=calibration.get(str(level), {}), progress=step)

        rows = run_sensitivity(loaded, open_level, levels, unit, body, corpus, ctx, stride, out, wanted, step)
    written = None
    if allocate is not None:
        written = allocation(rows, unit_table(loaded.model, unit), unit, spec.method, allocate, out)
    print_table(console, rows, out, limit=SHOWN, allocation=written)
