"""`hierui check` (hierui's self-test on a model) and `hierui noise` (the dense model's numerical noise floor):
what hierui's measurements can be trusted to."""

from pathlib import Path
from typing import Optional

import typer

from engine.errors import HieruiError
from hierui.cli import checks, launch, options
from hierui.cli.apps import app
from hierui.output import console, err_console

CheckSpecs = options.specs("; repeatable (default: none and one of every kind)")


@app.command()
def check(
    model: options.Model = "smollm2-135m",
    specs: CheckSpecs = None,
    steps: int = typer.Option(8, "--steps", min=1, help="tokens stepped per check"),
    device: options.Device = "auto",
    dtype: options.Dtype = "auto",
    gpu_mem: options.GpuMem = None,
    gpus: options.Gpus = None,
    calib_samples: int = typer.Option(
        8,
        "--calib-samples",
        min=1,
        help="calibration sequences: the self-check's own small calibration (it tests the code paths, not the "
        "quality), not the other commands' default",
    ),
    calib_len: int = typer.Option(64, "--calib-len", min=2, help="tokens per calibration sequence"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="also write the results to this JSON file"),
    use_cache: bool = typer.Option(
        False, "--use-cache", help="use the caches (default: compute everything afresh and store nothing)"
    ),
) -> None:
    """Self-test hierui on a model; exit 1 when a check fails.

    none is exactly zero, KV-cached = full pass, batched = one at a time, unchanged tensors shared, sparsity
    exact."""
    from engine.check.selfcheck import DEFAULT_SPECS
    from engine.models.names import resolve
    from engine.perturb.spec import parse_spec, unperturbed

    resolve(model)  # everything the user typed is checked before anything is loaded
    parsed = list({str(s): s for s in map(parse_spec, specs or [])}.values())
    checks.check_dtype(dtype)
    checks.output_file(json_out, "--json")
    from engine.run.open import check_specs

    check_specs(model, parsed or [unperturbed()], device)  # the device, a checkpoint's path, each spec's fit
    from dataclasses import replace

    from engine.run.open import open_dense, pair_request

    calib = {"samples": calib_samples, "length": calib_len}
    request = pair_request(model, parsed, device, dtype, gpu_mem, gpus, calib=calib, use_cache=use_cache, lens="off")
    names = [str(s) for s in parsed] or list(DEFAULT_SPECS)  # a default spec that does not fit the model is n/a
    request = replace(request, specs=tuple(map(parse_spec, names)))  # the plan sees every spec checked
    plan = launch.print_plan(request, always=False, strict=False)  # a spec that cannot stream is n/a there
    from engine.check.selfcheck import run_selfcheck
    from hierui.progress import stage_progress
    from hierui.views.check import print_check

    with stage_progress(err_console) as (_say, step):
        loaded = open_dense(request, plan, progress=step)
        result = run_selfcheck(
            loaded,
            names,
            steps=steps,
            calib_options={"samples": calib_samples, "length": calib_len},
            use_cache=use_cache,
            progress=step,
        )
    print_check(console, result)
    if json_out is not None:
        import json

        from engine.record.paths import atomic_write

        atomic_write(json_out.expanduser(), json.dumps(result.to_dict(), indent=2, ensure_ascii=False) + "\n")
        console.print(f"results: {json_out}", highlight=False, soft_wrap=True)
    if not result.ok:
        raise typer.Exit(1)


@app.command()
def noise(
    model: options.Model = "smollm2-135m",
    device: options.Device = "auto",
    gpu_mem: options.GpuMem = None,
    gpus: options.Gpus = None,
    prompts: Optional[Path] = typer.Option(
        None, "--prompts", help='a text file, one prompt per line, or .jsonl with "prompt" (default: --suite open)'
    ),
    suite: Optional[str] = typer.Option(None, "--suite", help="a shipped prompt suite (default open)"),
    max_new_tokens: Optional[int] = typer.Option(
        None, "--max-new-tokens", min=1, help="steps per prompt (default 8)", show_default=False
    ),
    dtypes: str = typer.Option("float32,bfloat16", "--dtypes", help="dtypes to measure, comma-separated"),
) -> None:
    """Measure the dense model's numerical noise floor and store its near-tie threshold.

    The dense model against itself in another dtype, another batch shape, and without its KV cache: the KL and
    flips numerical noise alone gives, and the top-1/top-2 margin below which a flip could be noise."""
    from engine.models.devices import check_device
    from engine.models.names import resolve
    from engine.record.prompts import read_prompts
    from engine.run.floor import noise_dir, parse_dtypes, save_floor
    from engine.run.noise import DEFAULT_STEPS, measure_floor
    from engine.sweep.recipe import SUITES, shipped_suites

    resolve(model)  # everything the user typed is checked before anything is loaded
    wanted = parse_dtypes(dtypes)
    check_device(device)
    if prompts is not None and suite is not None:
        raise HieruiError("give --prompts or --suite, not both")
    if prompts is None:
        name = (suite or "open").strip()
        if name not in shipped_suites():
            raise HieruiError(f"unknown suite '{name}' (shipped: {', '.join(shipped_suites()) or 'none'})")
        prompts = SUITES / f"{name}.jsonl"
    items = read_prompts(prompts)
    checks.writable_folder(noise_dir(), "the noise store")  # where save_floor writes, probed before loading
    from engine.run.open import open_dense, pair_request

    reference = "float32" if "float32" in wanted else wanted[0]
    steps = max_new_tokens or DEFAULT_STEPS
    request = pair_request(model, (), device, reference, gpu_mem, gpus, max_new_tokens=steps, lens="off")
    plan = launch.print_plan(request, always=False)  # the dense model alone, one load per dtype measured
    from hierui.progress import stage_progress
    from hierui.views.noise import print_noise

    with stage_progress(err_console) as (_say, step):
        loaded = open_dense(request, plan, progress=step)
        floor = measure_floor(loaded, items, steps, wanted, progress=step, request=request)
    path = save_floor(floor)
    print_noise(console, floor, path)
