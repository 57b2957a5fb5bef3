"""`hierui batch` (a headless sweep: prompts × specs × modes, locally or on Ray) and `hierui report` (one HTML
page from a sweep's or a kld run's output folder)."""

from pathlib import Path
from typing import Annotated, Optional

import typer

from engine.record.methods import DEFAULT_SPEC
from hierui.cli import checks, launch, options
from hierui.cli.apps import app
from hierui.output import console, err_console

# batch's own options with a long declaration, kept out of its signature; None: not given (a recipe or the
# session of --from may set it)
Model = options.model(options.MODEL_HELP + " (default smollm2-135m, or the session's)")
Specs = options.specs(f"; repeatable (default {DEFAULT_SPEC})")
Out = options.out("output folder (default runs/<time>); rerun into it to resume")
CalibSamples = options.calib_samples(min=None)
CalibLen = options.calib_len(min=None)
Prompts = Annotated[
    Optional[Path],
    typer.Option(
        "--prompts", help='a text file, one prompt per line, or .jsonl with "prompt" and optional "choices", "id"'
    ),
]
FromSession = Annotated[
    Optional[Path], typer.Option("--from", help="rerun this session's prompt and settings under the --prune specs")
]
Modes = Annotated[
    Optional[list[str]], typer.Option("--mode", help="shared or free; repeatable (default shared, or the session's)")
]
Lens = options.lens("sampled", "; a resumed --out keeps its own")
Counterfactual = Annotated[
    Optional[bool],
    typer.Option("--counterfactual", help=options.COUNTERFACTUAL_HELP + "; the free runs only", show_default=False),
]
BatchSize = Annotated[
    Optional[int],
    typer.Option("--batch-size", "-b", min=1, help="prompts stepped at once (default 8 on CPU, 16 on GPU)"),
]
Recipe = Annotated[
    Optional[str],
    typer.Option(
        "--recipe",
        help="a sweep described in a TOML file, or a shipped recipe's name (hierarchy); the other options override it",
    ),
]
Attribute = Annotated[
    str,
    typer.Option(
        "--attribute",
        help="flips: attribute every flip step of each run by patching the dense units into the perturbed model "
        "(attribution.parquet); none",
    ),
]
Ray = Annotated[
    Optional[str],
    typer.Option(
        "--ray",
        help="run the sweep on a Ray cluster: auto (the one started here with `ray start --head`, else a local "
        "one) or the cluster's ADDRESS; needs pip install 'hierui[ray]'",
        show_default=False,
    ),
]
RayCpus = Annotated[
    Optional[int],
    typer.Option(
        "--ray-cpus", help="with --ray: CPUs per pair worker on nodes without GPUs (default 1)", show_default=False
    ),
]
RayGpus = Annotated[
    Optional[int],
    typer.Option(
        "--ray-gpus", help="with --ray: GPUs per pair worker, reserved together (default 1)", show_default=False
    ),
]
RayCollect = Annotated[
    Optional[str],
    typer.Option(
        "--ray-collect",
        help="with --ray: who writes the sessions: auto (each worker that sees --out, else the driver), shared "
        "(the workers; --out must be shared) or driver",
        show_default=False,
    ),
]


@app.command()
def batch(
    prompts: Prompts = None,
    from_session: FromSession = None,
    model: Model = None,
    specs: Specs = None,
    modes: Modes = None,
    out: Out = None,
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", help="tokens per run (default 32)"),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="T of the probability space (default 1.0)"),
    sample: Optional[bool] = typer.Option(
        None, "--sample/--greedy", help="sample both models with one seed (default greedy)"
    ),
    seed: Optional[int] = typer.Option(None, "--seed", help="sampling seed (default 0)"),
    raw: Optional[bool] = typer.Option(None, "--raw/--chat", help="do not apply the chat template (default: apply it)"),
    topk: Optional[int] = typer.Option(None, "--topk", help="size of the recorded top-k lists (default 5)"),
    truncate: Optional[bool] = typer.Option(None, "--truncate", help=options.TRUNCATE_HELP),
    lens: Lens = None,
    no_lens: options.NoLens = False,
    tie_margin: options.TieMargin = None,
    counterfactual: Counterfactual = None,
    device: options.Device = "auto",
    dtype: options.Dtype = "auto",
    gpu_mem: options.GpuMem = None,
    gpus: options.Gpus = None,
    calib: options.Calib = None,
    calib_samples: CalibSamples = None,
    calib_len: CalibLen = None,
    calib_seed: options.CalibSeed = None,
    no_cache: options.NoCache = False,
    batch_size: BatchSize = None,
    recipe: Recipe = None,
    attribute: Attribute = "none",
    ray: Ray = None,
    ray_cpus: RayCpus = None,
    ray_gpus: RayGpus = None,
    ray_collect: RayCollect = None,
) -> None:
    """Sweep prompts × --prune specs × --mode headless: a session per run, steps.parquet, summary.parquet/.csv."""
    from engine.sweep.folder import default_out_dir, recorded_sweep_lens
    from engine.sweep.sweeps import plan_sweep

    lens = checks.lens_choice(lens, no_lens, None)  # None: the recipe's, the session's, OUT's or "sampled"
    calib_given = {"source": str(calib) if calib else None, "samples": calib_samples, "length": calib_len}
    args = dict(prompts_file=prompts, from_session=from_session, model=model, specs=specs, modes=modes)
    args |= dict(calib={**calib_given, "seed": calib_seed}, device=device, dtype=dtype, temperature=temperature)
    args |= dict(max_new_tokens=max_new_tokens, sample=sample, seed=seed, raw=raw, topk=topk, truncate=truncate)
    args |= dict(lens=lens, tie_margin=tie_margin, counterfactual=counterfactual, attribute=attribute)
    if recipe is not None:  # the recipe's prompts go to OUT/prompts.jsonl once the sweep starts
        from engine.sweep.recipe import apply_recipe

        out = out or default_out_dir()
        args, batch_size = apply_recipe(recipe, out, args, batch_size)
    ray_options = checks.ray_options(recipe, ray, ray_cpus, ray_gpus, ray_collect)  # Ray missing: one line, exit 2
    checks.check_dtype(dtype)
    out = checks.writable_folder(out or default_out_dir(), "--out")  # a file can be made there (none is left)
    if args["lens"] is None:  # resuming a sweep: its own lens (one recorded before the modes: all, or off)
        args["lens"] = recorded_sweep_lens(out)
    sweep = plan_sweep(**args)
    calibration = {"--calib": calib, "--calib-samples": calib_samples, "--calib-len": calib_len}
    _check_mode(sweep, seed, {**calibration, "--calib-seed": calib_seed})
    from engine.record.settings import default_batch_size
    from engine.run.open import budget
    from engine.sweep.runner import sweep_request

    request = sweep_request(sweep, not no_cache, batch_size or default_batch_size(sweep.device))
    plan = launch.print_plan(budget(request, gpu_mem, gpus))
    sweep.plan = plan.summary() if plan is not None else None  # batch.json and every session header record it
    out = out or default_out_dir()
    launch.quiet_libraries()
    result = _run(sweep, out, ray_options, not no_cache, batch_size)
    _print_outcome(sweep, result, out)


def _check_mode(sweep, seed, calibration: dict) -> None:
    """Every option the user typed has an effect in the sweep planned (after a recipe and the session of --from;
    hierui.cli.checks.refuse_unused): --seed only with sampling, the calibration options only with a spec that
    calibrates (--counterfactual without free runs: engine.sweep.sweeps.plan_sweep)."""
    if not sweep.settings.sample:
        checks.refuse_unused({"--seed": seed is not None}, "--sample", only=True)
    checks.calibration_unused(sweep.specs, calibration)


def _run(sweep, out: Path, ray_options, use_cache: bool, batch_size: int | None):
    """The sweep, here or on Ray, with its progress bars; Ctrl-C says which runs are complete and exits 130."""
    from engine.sweep.folder import complete_runs
    from engine.sweep.runner import run_sweep
    from hierui.views.bars import BatchBars, RayBars

    bars = BatchBars(err_console) if ray_options is None else RayBars(err_console)
    try:
        if ray_options is None:
            return run_sweep(sweep, out, use_cache=use_cache, hooks=bars, batch_size=batch_size)
        from engine.sweep.distributed import run_ray_sweep

        return run_ray_sweep(sweep, out, ray_options, use_cache=use_cache, hooks=bars, batch_size=batch_size)
    except KeyboardInterrupt:
        bars.close()
        done = complete_runs(sweep, out)
        listed = f": {', '.join(done)}" if done else ""
        err_console.print(
            f"interrupted: {len(done)} of {len(sweep.runs())} runs complete in {out}{listed}", highlight=False
        )
        err_console.print(f"rerun with --out {out} to finish the others", highlight=False)
        raise typer.Exit(130) from None
    finally:
        bars.close()


def _print_outcome(sweep, result, out: Path) -> None:
    """The groups' table, the multiple-choice table, what was written where, and how to get the report."""
    from engine.sweep.tables import GROUP_FIELDS, group_summary
    from hierui.views.batch import batch_table, choice_table

    if result.runs:
        console.print(batch_table(group_summary(sweep, result.summary), GROUP_FIELDS, console.width))
    if result.choice_summary:
        console.print(choice_table(result.choice_summary))
    n = len(result.runs)
    if n:
        console.print(
            f"{n} run{'s' * (n != 1)} ({len(result.computed)} computed, {len(result.skipped)} already "
            f"complete) in {out}: sessions/, steps.parquet, summary.parquet, summary.csv",
            highlight=False,
            soft_wrap=True,
        )
    if result.choice_summary:
        console.print(
            f"{len(sweep.choice_items)} multiple-choice items × {len(sweep.specs)} specs in {out}: "
            f"mc/, mc.parquet, mc_summary.parquet, mc_summary.csv",
            highlight=False,
            soft_wrap=True,
        )
    if sweep.attribute == "flips" and n:
        console.print(
            f"attribution of the flip steps in {out}: attribution/, attribution.parquet (hierui attribute SESSION "
            f"prints one session's)",
            highlight=False,
            soft_wrap=True,
        )
    console.print(f"the report: hierui report {out}", highlight=False, soft_wrap=True)


ReportOut = options.out("the HTML file to write (default RUN_DIR/report.html)")


@app.command()
def report(
    run_dir: Path = typer.Argument(..., help="the --out folder of hierui batch or hierui kld", show_default=False),
    out: ReportOut = None,
    open_: bool = typer.Option(False, "--open", help="open the page in the default browser"),
    print_path: bool = typer.Option(False, "--print-path", help="print only the report's path (to hand to a browser)"),
    stamp: bool = typer.Option(
        False,
        "--stamp",
        help="say in the footer when the page was made (by default the page is the same for the same run)",
    ),
) -> None:
    """One self-contained HTML page from a batch output (or a hierui kld output).

    The hierarchy, KL vs theory, amplification, accumulation, first divergence, multiple choice, and where it
    breaks (the lens per layer, the units that flip tokens, recovery, the noise floor); then the corpus KLD
    where hierui kld --out wrote into the folder (a kld folder alone: that section only)."""
    from hierui.report.page import write_report

    path = write_report(run_dir, out, stamp=stamp)
    if print_path:
        print(path.resolve())
    else:
        batch = (Path(run_dir) / "batch.json").is_file()  # hierui show reads a batch output, not a kld one
        hint = f" (hierui show {run_dir} prints its table in the terminal)" if batch else ""
        console.print(f"report: {path}{hint}", highlight=False, soft_wrap=True)
    if open_:
        try:
            failed = typer.launch(str(path.resolve()))
        except OSError:
            failed = 1
        if failed:
            err_console.print(
                f"warning: could not open a browser; open {path.resolve()} yourself", highlight=False, soft_wrap=True
            )
