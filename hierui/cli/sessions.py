"""`hierui show` and `hierui replay`: a recorded session printed or replayed with no model loaded, or recomputed
with its models (`replay --rerun`) and compared."""

from pathlib import Path
from typing import Optional

import typer

from engine.errors import HieruiError
from hierui.cli import checks, launch, options
from hierui.cli.apps import app
from hierui.output import console, err_console
from hierui.views.session import print_branch_comparison, print_comparison, print_warnings, show_path

# replay's options that apply to --rerun only say so first
RerunDevice = options.device("--rerun: ")
RerunDtype = options.recorded_dtype("--rerun: ")
RerunNoCache = options.no_cache("--rerun: ")
RerunModel = options.confirmed_model("--rerun: ")
RerunCalib = options.confirmed_calib("--rerun: ")
RerunSpec = options.confirmed_spec("--rerun: ")
RerunGpuMem = options.gpu_mem("--rerun: " + options.GPU_MEM_HELP)
RerunGpus = options.gpus("--rerun: " + options.GPUS_HELP)


@app.command()
def show(
    session: options.Session,
    steps: bool = typer.Option(False, "--steps", help="also print one table row per step"),
    full: bool = typer.Option(False, "--full", help="print long prompts and continuations whole (default: cut)"),
) -> None:
    """Print a recorded session: header, continuations, summary (and --steps: every step). Loads no model."""
    show_path(session, steps, full)


@app.command()
def replay(
    ctx: typer.Context,
    session: options.Session,
    rerun: bool = typer.Option(
        False, "--rerun", help="recompute the session with its models and report the largest deviation"
    ),
    print_only: bool = typer.Option(False, "--print", help="print the session as text instead of opening the explorer"),
    steps: bool = typer.Option(False, "--steps", help="with --print: also print one table row per step"),
    full: bool = typer.Option(False, "--full", help="with --print: print long prompts and continuations whole"),
    device: RerunDevice = "auto",
    dtype: RerunDtype = None,
    gpu_mem: RerunGpuMem = None,
    gpus: RerunGpus = None,
    tol: float = typer.Option(
        1e-4,
        "--tol",
        min=0.0,
        help="--rerun: exit 1 when a metric deviates by this much or more (relative to values above 1)",
    ),
    no_cache: RerunNoCache = False,
    save: Optional[Path] = typer.Option(None, "--save", help="--rerun: keep the recomputed session in this file"),
    model: RerunModel = None,
    calib: RerunCalib = None,
    spec: RerunSpec = None,
) -> None:
    """Replay a recorded session in the explorer, with no model loaded (--print: as text, like `show`).

    With --rerun: recompute every step with the models and compare; exit 0 when all tokens match and every
    metric is within --tol of the recording, 1 otherwise. A model, checkpoint or calibration file the session
    names by path (or hub id) is used only when you pass it again with --model, --prune or --calib.
    """
    _check_mode(ctx, rerun, print_only)
    if not rerun and (print_only or not launch.interactive()):
        show_path(session, steps, full)  # no terminal to draw on: print it instead
    elif not rerun:
        _open_in_explorer(session)
    else:
        confirmed = dict(model=model, calib=calib, spec=spec)
        _rerun(session, device, dtype, tol, not no_cache, save, (gpu_mem, gpus), **confirmed)


RERUN_ONLY = ("device", "dtype", "gpu_mem", "gpus", "tol", "no_cache", "save", "model", "calib", "spec")


def _check_mode(ctx: typer.Context, rerun: bool, print_only: bool) -> None:
    """Every option replay was given has an effect in the mode chosen (hierui.cli.checks.refuse_unused): the
    rerun's options only with --rerun; --print, --steps and --full not with it; --steps and --full only where
    the session is printed (--print, or no terminal to draw the explorer on)."""
    if rerun:
        printing = checks.given_options(ctx, "print_only", "steps", "full")
        checks.refuse_unused(printing, "--rerun", "it prints how the recomputation compares with the recording")
        return
    checks.refuse_unused(checks.given_options(ctx, *RERUN_ONLY), "--rerun", only=True)
    if not print_only and launch.interactive():
        checks.refuse_unused(checks.given_options(ctx, "steps", "full"), "--print", "", only=True)


def _open_in_explorer(session: Path) -> None:
    """The recorded session in the explorer; every problem with the file is reported before the UI starts."""
    if session.is_dir():
        raise HieruiError(f"{session} is a directory: replay opens one session file (hierui show DIR lists them)")
    from engine.record.session import load_session

    recorded = load_session(session)
    from hierui.explorer.app import HieruiApp

    launch.run_app(HieruiApp(session=recorded))


def _rerun(session: Path, device: str, dtype, tol: float, use_cache: bool, save, memory, model, calib, spec) -> None:
    """replay --rerun: every step recomputed with the session's models and compared; exit 1 beyond `tol`."""
    if session.is_dir():
        raise HieruiError(f"{session} is a directory: replay --rerun takes one session file")
    if save is not None and (save.exists() or not save.parent.is_dir()):
        why = "exists already" if save.exists() else f"is in a folder that does not exist ({save.parent})"
        raise HieruiError(f"--save {save} {why}: name a new file")
    checks.output_file(save, "--save")  # a file can be made in its folder (a probe; holds for root)
    from engine.models.devices import check_device

    check_device(device)  # before anything slow
    from engine.record.session import load_session

    loaded_session = load_session(session)
    print_warnings(loaded_session.warnings)
    checks.check_dtype(dtype)
    checks.check_calib_file(calib)
    from rich.text import Text

    from engine.run import rerun as R
    from hierui.tokentext import escape

    plan = R.plan_rerun(loaded_session, model=model, calib=calib, spec=spec)  # refuses paths the file names
    if model is not None:
        from engine.models.names import resolve

        resolve(model)
    request = R.rerun_request(loaded_session, plan, device, dtype, *memory, use_cache=use_cache)
    console.print(Text(f"rerunning with {escape(plan.describe())}"), highlight=False, soft_wrap=True)
    placed = dict(plan=plan, request=request, memory=launch.print_plan(request, always=False))
    from hierui.progress import stage_progress

    def note(text: str) -> None:  # the rerun feeds the recorded prompt ids where a tokenization now differs
        err_console.print(Text(text, style="yellow"), highlight=False, soft_wrap=True)

    with stage_progress(err_console) as (_say, step):
        new = R.rerun_session(loaded_session, device=device, dtype=dtype, progress=step, save=save, note=note, **placed)
    result = R.compare(loaded_session.steps, new.steps)
    print_comparison(loaded_session, result, tol)
    branch = R.compare_branch(loaded_session.branch, new.branch)  # None: the session has no counterfactual branch
    if branch is not None:
        print_branch_comparison(branch, tol)
    if not result.ok(tol) or (branch is not None and not branch.ok(tol)):
        raise typer.Exit(1)
