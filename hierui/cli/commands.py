"""The `hierui` command line (typer). Heavy imports (torch, transformers) happen inside commands."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from engine.errors import HieruiError, is_oom
from engine.record.settings import CALIB_LENGTH, DEFAULT_PROMPT, calib_samples_help
from hierui.output import console, err_console
from hierui.views.session import print_branch_comparison, print_comparison, print_warnings, show_path


def _help_without_type_artefacts() -> None:
    """typer 0.29's rich help prints a Python type beside every option: `<bool>` beside each flag (even
    `--help <bool>`, though a flag takes no value), `<str>`, `<list[str]>`, `<int range>`. Show what click
    shows instead: nothing beside a flag, TEXT, INTEGER, FLOAT or PATH beside a value."""
    from typer.core import TyperArgument, TyperOption

    names = {"str": "TEXT", "int": "INTEGER", "float": "FLOAT", "path": "PATH", "bool": "BOOLEAN"}
    for cls in (TyperOption, TyperArgument):
        shown = getattr(cls, "display_type_rich", None)
        if shown is None or getattr(shown, "hierui", False):
            continue

        def display_type_rich(self, ctx, _shown=shown, _names=names):
            if getattr(self, "is_flag", False):
                return None
            label = _shown(self, ctx)
            if not label or self.metavar is not None or not label.startswith("<"):
                return label
            inner, dots = label.rstrip("."), "..." if label.endswith("...") else ""
            inner = inner.strip("<>").removeprefix("list[").removesuffix("]").removesuffix(" range")
            return _names.get(inner, inner) + dots

        display_type_rich.hierui = True
        cls.display_type_rich = display_type_rich


_help_without_type_artefacts()

app = typer.Typer(
    name="hierui",
    help="Explore why pruning breaks generation: a dense and a perturbed LLM side by side.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
models_app = typer.Typer(help="List the model aliases and what is cached; fetch a model.", invoke_without_command=True)
app.add_typer(models_app, name="models")
cache_app = typer.Typer(
    help="List and clear the caches: pruned weights, drop scores, calibration batches.", invoke_without_command=True
)
app.add_typer(cache_app, name="cache")


MODEL_HELP = (
    "alias (smollm2-135m, llama-7b, …), tiny-random[:FAMILY], random:SHAPE, local directory, .gguf file or hub id"
)
CALIB_HELP = "plain-text calibration file (default: sequences sampled from the dense model)"
CALIB_LEN_HELP = f"tokens per calibration sequence (default {CALIB_LENGTH})"
GPU_MEM_HELP = (
    "the device's memory budget, e.g. 24GiB, 512MiB (default: the GPU's free memory): a pair whose predicted peak "
    "is above it runs with its decoder layers streamed from disk one at a time; on a CPU it simulates a smaller "
    "device (the layers are streamed the same way)"
)
SPEC_HELP = (
    "perturbation: wanda:0.5, sparsegpt:0.5, magnitude:2:4, attndrop:4, mlpdrop:4, blockdrop:4, int8, nf4, "
    "checkpoint:DIR, none"
)


# library warnings that say nothing to a hierui user (each seen in a real run): (category, message start, module)
QUIET_WARNINGS = (
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated", r"torch\.utils\._pytree"),
    (DeprecationWarning, r"`torch\.jit\.script_method` is deprecated", r"torch\.jit"),
)


def _quiet_libraries() -> None:
    """Silence the named library warnings and transformers' info logging and progress bars (every other
    warning still shows)."""
    import os
    import warnings

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for category, message, module in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


@models_app.callback()
def models_list(ctx: typer.Context) -> None:
    """List the aliases, their targets, and which are cached locally."""
    if ctx.invoked_subcommand is not None:
        return
    from rich import box

    from engine.models.loading import list_models
    from engine.record.paths import models_dir

    rows = list_models()
    table = Table(title="models (--model NAME)", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("alias", no_wrap=True)
    table.add_column("target", overflow="fold")
    table.add_column("cached", no_wrap=True)
    for row in rows:
        cached = "built in" if row["where"] == "built in" else "yes" if row["cached"] else "-"
        table.add_row(row["alias"], row["target"], cached)
    console.print(table)
    # where the cached ones are: paths of any length, wrapped (never cut) at the terminal's width
    console.print(f"converted models are kept in {models_dir()}", highlight=False, overflow="fold")
    for row in rows:
        if row["cached"] and row["where"] and row["where"] != "built in":
            console.print(f"  {row['alias']}: {row['where']}", highlight=False, overflow="fold")


@models_app.command("pull")
def models_pull(name: str = typer.Argument(..., help=MODEL_HELP)) -> None:
    """Fetch (and convert) a model so later runs need no network."""
    from engine.models.loading import pull, resolve

    resolve(name)
    _quiet_libraries()
    from hierui.progress import stage_progress

    with stage_progress(err_console) as (say, _step):
        where = pull(name, progress=say)
    console.print(f"{name}: ready" + (f" in {where}" if where else " (built in, nothing to fetch)"))


# ------------------------------------------------------------------ the caches (torch-free)


KIND_HELP = "only this kind: pruned (weights), scores (drop scores) or calib (calibration batches)"


@cache_app.callback()
def cache_list(ctx: typer.Context, kind: Optional[str] = typer.Option(None, "--kind", help=KIND_HELP)) -> None:
    """List the cache entries; stale ones (made by another algorithm or hierui version) are never reused."""
    if ctx.invoked_subcommand is not None:
        return
    from engine.perturb import cache
    from engine.record.paths import hierui_home

    found = cache.entries(kind)
    table = Table(title=f"cache of hierui {cache.hierui_version()} in {hierui_home()}", title_justify="left")
    for col in ("kind", "model", "spec", "made by", "size", "age", "stale"):
        table.add_column(col, justify="right" if col in ("size", "age") else "left")
    for e in found:
        table.add_row(e.kind, e.model, e.spec, e.versions, _size(e.size), _age(e.age()), "yes" if e.stale else "-")
    console.print(table)
    stale = sum(e.stale for e in found)
    console.print(
        f"{_entries(len(found))}, {_size(sum(e.size for e in found))}, {stale} stale"
        + (": hierui cache clear --stale removes them" if stale else "")
    )


@cache_app.command("clear")
def cache_clear(
    stale: bool = typer.Option(False, "--stale", help="only the stale entries"),
    kind: Optional[str] = typer.Option(None, "--kind", help=KIND_HELP),
) -> None:
    """Remove cache entries (all of them, or the stale ones); converted models are kept."""
    from engine.perturb import cache

    removed = cache.clear(kind, stale_only=stale)
    what = " ".join(w for w in ("stale" if stale else "", kind or "") if w)
    console.print(
        f"removed {len(removed)} {what + ' ' if what else ''}cache {_entries(len(removed), False)} "
        f"({_size(sum(e.size for e in removed))})"
    )


def _entries(n: int, count: bool = True) -> str:
    word = "entry" if n == 1 else "entries"
    return f"{n} {word}" if count else word


def _size(n: float) -> str:
    if n < 1000:
        return f"{int(n)} B"
    for unit in ("kB", "MB", "GB"):
        n /= 1000
        if n < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if n < 100 else f"{n:.0f} {unit}"


def _age(seconds: float) -> str:
    for limit, div, unit in ((60, 1, "s"), (3600, 60, "m"), (86400, 3600, "h")):
        if seconds < limit:
            return f"{int(seconds // div)}{unit}"
    return f"{int(seconds // 86400)}d"


# ------------------------------------------------------------------ show / replay (no model is loaded)


SESSION_HELP = "a session file (.jsonl), or a directory of sessions (a `hierui batch` output)"


def _interactive() -> bool:
    return sys.stdin.isatty() and sys.stdout.isatty()


NO_LENS_HELP = "do not compute the logit lens per layer (lens_kl …; it costs about a third of a step on a CPU)"
COUNTERFACTUAL_HELP = (
    "free mode: at the first divergence, branch, feeding the perturbed model the dense token, and record whether "
    "the texts agree again (recovered, recovery_steps)"
)
TIE_MARGIN_HELP = (
    "a flip whose dense top-1/top-2 probability margin is below this is a near tie "
    "(default: the model's noise floor from hierui noise, else a default for its dtype)"
)


def _output_file(path: Path | None, option: str) -> None:
    """One clear line, before anything is loaded, when `path` cannot be a new file: a folder, or a file in a
    folder that does not exist or cannot be written."""
    import os

    if path is None:
        return
    folder = path.expanduser().parent
    if path.is_dir() or not folder.is_dir() or not os.access(folder, os.W_OK):
        raise HieruiError(f"{option} {path}: not a file in an existing, writable folder")


@app.command()
def explore(
    model: str = typer.Option("smollm2-135m", "--model", "-m", help=MODEL_HELP),
    spec: str = typer.Option("wanda:0.5", "--prune", "-p", help=SPEC_HELP),
    prompt: str = typer.Option(DEFAULT_PROMPT, "--prompt", help="the prompt both models continue"),
    mode: str = typer.Option("shared", "--mode", help="shared (both fed the dense token) or free (each its own)"),
    temperature: float = typer.Option(1.0, "--temperature", "-T", help="T of the probability space"),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="tokens per run"),
    sample: bool = typer.Option(False, "--sample", help="sample both models with one seeded stream (default greedy)"),
    seed: int = typer.Option(0, "--seed", help="sampling seed"),
    choices: Optional[list[str]] = typer.Option(
        None, "--choices", help="a candidate token of the categorical subspace; repeatable"
    ),
    raw: bool = typer.Option(False, "--raw", help="do not apply the chat template"),
    topk: int = typer.Option(5, "--topk", help="size of the top-k lists"),
    run: bool = typer.Option(False, "--run", help="start stepping as soon as the models are ready"),
    truncate: bool = typer.Option(
        False, "--truncate", help="a prompt longer than the context allows: keep its last tokens (default: refuse)"
    ),
    no_lens: bool = typer.Option(False, "--no-lens", help=NO_LENS_HELP),
    tie_margin: Optional[float] = typer.Option(None, "--tie-margin", help=TIE_MARGIN_HELP, show_default=False),
    counterfactual: bool = typer.Option(False, "--counterfactual", help=COUNTERFACTUAL_HELP),
    sessions: Optional[Path] = typer.Option(
        None, "--sessions", help="folder for the session files (default: $HIERUI_HOME/sessions)", show_default=False
    ),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N"),
    dtype: str = typer.Option("auto", "--dtype", help="auto, float32, bfloat16 or float16"),
    gpu_mem: Optional[str] = typer.Option(None, "--gpu-mem", help=GPU_MEM_HELP, show_default=False),
    calib: Optional[Path] = typer.Option(None, "--calib", help=CALIB_HELP),
    calib_samples: Optional[int] = typer.Option(None, "--calib-samples", min=1, help=calib_samples_help("explore")),
    calib_len: Optional[int] = typer.Option(None, "--calib-len", min=2, help=CALIB_LEN_HELP),
    no_cache: bool = typer.Option(False, "--no-cache", help="recompute calibration and pruned weights"),
    from_kld: Optional[Path] = typer.Option(
        None,
        "--from-kld",
        help="a hierui kld output folder: its model and spec (--prune if the run has it), the prompt the raw text "
        "before its --worst N-th token",
    ),
    worst: int = typer.Option(1, "--worst", min=1, help="with --from-kld: the token's rank (1 = the highest KLD)"),
) -> None:
    """Open the explorer: step the dense and the perturbed model token by token and watch them drift apart."""
    from engine.models.loading import DTYPES, resolve
    from engine.perturb.spec import parse_spec
    from engine.record.settings import StepSettings, calibration_for

    if from_kld is not None:  # the context of a high-KLD token of a corpus run, as a raw prompt
        from engine.kld.corpus import worst_prompt

        found = worst_prompt(from_kld, worst, spec)
        model, spec, prompt, raw = found["model"], found["spec"], found["prompt"], True
    resolve(model)  # everything the user typed is checked before the UI starts
    parsed = parse_spec(spec)
    calibration = calibration_for(  # engine.record.settings: the one rule for the default calibration
        parsed.method, "explore", source=str(calib) if calib else None, samples=calib_samples, length=calib_len
    )
    settings = StepSettings(
        mode=mode,
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        sample=sample,
        seed=seed,
        choices=list(choices or []) or None,
        raw=raw,
        topk=topk,
        truncate=truncate,
        lens=not no_lens,
        tie_margin=tie_margin,
        counterfactual=counterfactual,
    ).validate()
    if counterfactual and settings.mode != "free":
        raise HieruiError("--counterfactual branches a free-mode run at its first divergence: add --mode free")
    if calib is not None and not calib.is_file():
        raise HieruiError(f"calibration file not found: {calib}")
    if dtype.lower() != "auto" and dtype.lower() not in DTYPES:
        raise HieruiError(f"unknown dtype '{dtype}': use auto, float32, bfloat16 or float16")
    if parsed.method == "checkpoint":
        resolve(parsed.path)
    config = _check_model_args(model, parsed, device)
    if config is not None:  # --max-new-tokens within the context, with a prompt of at least one token
        from engine.models.loading import config_int
        from engine.record.settings import fit_context

        fit_context(1, max_new_tokens, config_int(config, "max_position_embeddings"), truncate=True)
    sessions = _writable_folder(sessions, "--sessions")
    if not _interactive():
        raise HieruiError("explore needs an interactive terminal; for headless runs use hierui batch")
    from engine.models.loading import check_reachable, config_from_file, fetch_light

    check_reachable(model)  # a hub model that cannot be fetched: say so here, not inside the UI
    _quiet_libraries()
    light = fetch_light(model, progress=lambda m: err_console.print(f"[dim]{m}[/]")) if config is None else None
    if light is not None:  # a hub model's config, fetched without its weights: the same checks now
        from engine.perturb.spec import check_fits

        config = config_from_file(light / "config.json")
        check_fits(parsed, config)
    if settings.choices or config is not None:  # choices and the prompt's length need the tokenizer: before the UI
        from engine.models.loading import config_int, load_tokenizer
        from engine.models.tokens import choice_token_ids, prompt_ids
        from engine.record.settings import fit_context

        tokenizer = load_tokenizer(model, progress=lambda m: err_console.print(f"[dim]{m}[/]"))
        if settings.choices:
            choice_token_ids(tokenizer, settings.choices)
        if config is not None:
            n = len(prompt_ids(tokenizer, prompt, raw=raw))
            fit_context(n, max_new_tokens, config_int(config, "max_position_embeddings"), truncate)

    calib_options = calibration.to_dict()
    plan = _print_plan(
        model, [parsed], device, dtype, calib_options, max_new_tokens=max_new_tokens, lens=not no_lens, gpu_mem=gpu_mem
    )

    def make_pair(progress):
        from engine.models.loading import load
        from engine.perturb import perturb
        from engine.run.plan import planned_device_map, plans_streaming

        loaded = load(
            model,
            device=device,
            dtype=dtype,
            progress=progress,
            streamed=plans_streaming(plan),
            device_map=planned_device_map(plan),
        )
        pair = perturb(loaded, parsed, use_cache=not no_cache, progress=progress, calib_options=calibration.to_dict())
        pair.plan = plan.summary() if plan is not None else None  # the session header records it
        return pair

    from hierui.explorer.app import HieruiApp

    run_app(
        HieruiApp(
            pair_factory=make_pair,
            prompt=prompt,
            settings=settings,
            session_dir=sessions,
            title_hint=f"{model} · {parsed}",
            autorun=run,
        )
    )


def _check_model_args(model: str, parsed, device: str) -> dict | None:
    """The checks that need only the arguments, the config and the file system, before anything slow: the
    device, a checkpoint's path, the spec against the model's config.json (when it can be read without a
    download). Returns that config (None: not known before loading)."""
    from engine.models.loading import check_device, read_config, resolve
    from engine.perturb.spec import check_fits

    check_device(device)
    if parsed.method == "checkpoint":
        try:
            resolve(parsed.path)  # a local checkpoint that is not there fails here
        except HieruiError as e:
            raise HieruiError(f"--prune {parsed}: {e}") from None
    config = read_config(model)
    check_fits(parsed, config)
    return config


def run_app(app) -> None:
    """Run the Textual app; a crash inside it (after its screen closed) is one error line and exit 1."""
    app.run()
    if app.return_code:
        from engine.errors import one_line

        failure = getattr(app, "failure", None)
        why = one_line(failure) if failure is not None else f"exit code {app.return_code}"
        raise HieruiError(f"the explorer failed: {why}", exit_code=1)


def _writable_folder(folder: Path | None, option: str) -> Path:
    """`folder` (default: $HIERUI_HOME/sessions), created if needed; one clear line when it cannot be written."""
    import os

    from engine.record.paths import sessions_dir

    folder = (folder or sessions_dir()).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise HieruiError(f"{option} {folder}: cannot create the folder ({e.strerror or e})") from None
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise HieruiError(f"{option} {folder}: not a writable folder")
    return folder


@app.command()
def show(
    session: Path = typer.Argument(..., help=SESSION_HELP, show_default=False),
    steps: bool = typer.Option(False, "--steps", help="also print one table row per step"),
    full: bool = typer.Option(False, "--full", help="print long prompts and continuations whole (default: cut)"),
) -> None:
    """Print a recorded session: header, continuations, summary (and --steps: every step). Loads no model."""
    show_path(session, steps, full)


@app.command()
def replay(
    session: Path = typer.Argument(..., help=SESSION_HELP, show_default=False),
    rerun: bool = typer.Option(
        False, "--rerun", help="recompute the session with its models and report the largest deviation"
    ),
    print_only: bool = typer.Option(False, "--print", help="print the session as text instead of opening the explorer"),
    steps: bool = typer.Option(False, "--steps", help="with --print: also print one table row per step"),
    full: bool = typer.Option(False, "--full", help="with --print: print long prompts and continuations whole"),
    device: str = typer.Option("auto", "--device", help="--rerun: auto, cpu, cuda or cuda:N"),
    dtype: Optional[str] = typer.Option(
        None, "--dtype", help="--rerun: auto, float32, bfloat16 or float16 (default: the recorded dtype)"
    ),
    tol: float = typer.Option(
        1e-4,
        "--tol",
        min=0.0,
        help="--rerun: exit 1 when a metric deviates by this much or more (relative to values above 1)",
    ),
    no_cache: bool = typer.Option(False, "--no-cache", help="--rerun: recompute calibration and pruned weights"),
    save: Optional[Path] = typer.Option(None, "--save", help="--rerun: keep the recomputed session in this file"),
    model: Optional[str] = typer.Option(
        None, "--model", "-m", help="--rerun: the model to load (confirms a local path or hub id the session names)"
    ),
    calib: Optional[Path] = typer.Option(
        None, "--calib", help="--rerun: the calibration text file (confirms the one the session names)"
    ),
    spec: Optional[str] = typer.Option(
        None, "--prune", "-p", help="--rerun: the perturbation spec (confirms a checkpoint:PATH the session names)"
    ),
) -> None:
    """Replay a recorded session in the explorer, with no model loaded (--print: as text, like `show`).

    With --rerun: recompute every step with the models and compare; exit 0 when all tokens match and every
    metric is within --tol of the recording, 1 otherwise. A model, checkpoint or calibration file the session
    names by path (or hub id) is used only when you pass it again with --model, --prune or --calib.
    """
    if not rerun and (model is not None or calib is not None or spec is not None):
        raise HieruiError("--model, --prune and --calib apply to replay --rerun only")
    if not rerun and (print_only or not _interactive()):
        show_path(session, steps, full)  # no terminal to draw on: print it instead
        return
    if not rerun:
        if session.is_dir():
            raise HieruiError(f"{session} is a directory: replay opens one session file (hierui show DIR lists them)")
        from engine.record.session import load_session

        recorded = load_session(session)  # every problem with the file is reported here, before the UI starts
        from hierui.explorer.app import HieruiApp

        run_app(HieruiApp(session=recorded))
        return
    if session.is_dir():
        raise HieruiError(f"{session} is a directory: replay --rerun takes one session file")
    if save is not None and (save.exists() or not save.parent.is_dir()):
        why = "exists already" if save.exists() else f"is in a folder that does not exist ({save.parent})"
        raise HieruiError(f"--save {save} {why}: name a new file")
    from engine.models.loading import check_device

    check_device(device)  # before anything slow
    from engine.record.session import load_session

    loaded_session = load_session(session)
    print_warnings(loaded_session.warnings)
    if dtype is not None:
        from engine.models.loading import DTYPES

        if dtype.lower() != "auto" and dtype.lower() not in DTYPES:
            raise HieruiError(f"unknown dtype '{dtype}': use auto, float32, bfloat16 or float16")
    if calib is not None and not calib.is_file():
        raise HieruiError(f"calibration file not found: {calib}")
    from rich.text import Text

    from engine.run import rerun as R
    from hierui.tokentext import escape

    plan = R.plan_rerun(loaded_session, model=model, calib=calib, spec=spec)  # refuses paths the file names
    if model is not None:
        from engine.models.loading import resolve

        resolve(model)
    console.print(Text(f"rerunning with {escape(plan.describe())}"), highlight=False, soft_wrap=True)
    _quiet_libraries()
    from hierui.progress import stage_progress

    with stage_progress(err_console) as (_say, step):
        new = R.rerun_session(
            loaded_session, device=device, dtype=dtype, use_cache=not no_cache, progress=step, save=save, plan=plan
        )
    result = R.compare(loaded_session.steps, new.steps)
    print_comparison(loaded_session, result, tol)
    branch = R.compare_branch(loaded_session.branch, new.branch)  # None: the session has no counterfactual branch
    if branch is not None:
        print_branch_comparison(branch, tol)
    if not result.ok(tol) or (branch is not None and not branch.ok(tol)):
        raise typer.Exit(1)


@app.command()
def attribute(
    session: Path = typer.Argument(..., help="a session file (.jsonl)", show_default=False),
    steps: Optional[list[int]] = typer.Option(
        None,
        "--step",
        help="the step to attribute, counted from 1 as on screen and in `show --steps`; repeatable (default: flips)",
    ),
    out: Optional[Path] = typer.Option(
        None, "--out", "-o", help="write every unit's row here: Parquet if it ends in .parquet, else JSON Lines"
    ),
    top: int = typer.Option(10, "--top", min=0, help="units shown per list (sublayers, blocks); 0: all"),
    greedy: bool = typer.Option(True, "--greedy/--no-greedy", help="search the smallest set restoring the top-1"),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N"),
    dtype: Optional[str] = typer.Option(
        None, "--dtype", help="auto, float32, bfloat16 or float16 (default: the recorded dtype)"
    ),
    no_cache: bool = typer.Option(False, "--no-cache", help="recompute calibration and pruned weights"),
    model: Optional[str] = typer.Option(
        None, "--model", "-m", help="the model to load (confirms a local path or hub id the session names)"
    ),
    calib: Optional[Path] = typer.Option(
        None, "--calib", help="the calibration text file (confirms the one the session names)"
    ),
    spec: Optional[str] = typer.Option(
        None, "--prune", "-p", help="the perturbation spec (confirms a checkpoint:PATH the session names)"
    ),
) -> None:
    """Which units' damage flips the token at a recorded step (loads the session's models).

    At each step, patch the dense output of every block, attention and MLP into the perturbed forward and rank
    them by the KL their restoration removes."""
    from engine.models.loading import check_device

    if session.is_dir():
        raise HieruiError(f"{session} is a directory: attribute takes one session file")
    _output_file(out, "--out")
    if dtype is not None:
        from engine.models.loading import DTYPES

        if dtype.lower() != "auto" and dtype.lower() not in DTYPES:
            raise HieruiError(f"unknown dtype '{dtype}': use auto, float32, bfloat16 or float16")
    if calib is not None and not calib.is_file():
        raise HieruiError(f"calibration file not found: {calib}")
    check_device(device)
    from engine.record.session import load_session
    from engine.run import attribution as A
    from engine.run import rerun as R

    recorded = load_session(session)
    print_warnings(recorded.warnings)
    header, records = recorded.header, recorded.steps
    if not records:
        raise HieruiError(f"{session} has no recorded steps to attribute")
    mode = header.get("mode") or "shared"
    # --step counts from 1 (the screen's, `show`'s); records and tables count from 0
    for n in steps or []:
        if not 1 <= n <= len(records):
            raise HieruiError(f"no step {n} in {session}: it has steps 1..{len(records)} (counted from 1)")
    wanted = [n - 1 for n in dict.fromkeys(steps)] if steps else A.flip_steps(records, mode)
    for step in wanted:
        A.context_at(header, records, step)  # a step after the perturbed model's end: one line now
    plan = R.plan_rerun(recorded, model=model, calib=calib, spec=spec)  # refuses paths the file names
    if model is not None:
        from engine.models.loading import resolve

        resolve(model)
    if not wanted:
        console.print(f"no flip step to attribute in {session}: the two models' top-1 agree at every compared step")
        return
    from rich.text import Text

    from hierui.tokentext import escape

    console.print(Text(f"attributing with {escape(plan.describe())}"), highlight=False, soft_wrap=True)
    _quiet_libraries()
    from engine.models.loading import load
    from engine.perturb import perturb
    from hierui.progress import stage_progress

    temperature = float(header.get("temperature") or 1.0)
    rows, results = [], []
    with stage_progress(err_console) as (_say, step_progress):
        loaded = load(plan.model, device=device, dtype=dtype or header.get("dtype") or "auto", progress=step_progress)
        pair = perturb(
            loaded, plan.spec, use_cache=not no_cache, progress=step_progress, calib_options=plan.calib_options
        )
        for n, step in enumerate(wanted):
            step_progress("attributing", n, len(wanted))
            result = A.attribute(pair, A.context_at(header, records, step), temperature, greedy=greedy)
            results.append((step, result))
            rows += result.rows(step)
        step_progress("attributing", len(wanted), len(wanted))
    for step, result in results:
        _print_attribution(step, result, records[step], loaded.tokenizer, top, same=A.same_context(records, step))
    if out is not None:
        _write_rows(out.expanduser(), rows)
        console.print(f"{len(rows)} rows: {out}", highlight=False, soft_wrap=True)


def _print_attribution(step: int, result, record: dict, tokenizer, top: int, same: bool) -> None:
    """One step's attribution: the headline, the units ranked (sublayers, then blocks), the minimal set."""
    from rich.text import Text

    from hierui.tokentext import escape

    def token(t: int) -> str:
        return repr(escape(tokenizer.decode([t])))

    recorded = record.get("kl")
    from hierui.format import step_label

    tokens = f"dense {token(result.top1_d)} · perturbed {token(result.top1_p)}"
    head = f"step {step_label(step)}: {tokens} · KL {result.kl:.4g}"
    if recorded is not None:
        head += f" (recorded {recorded:.4g})"
    head += f" · {result.seconds:.1f} s"
    console.print(Text(head, style="bold"), highlight=False, soft_wrap=True)
    if not same:
        console.print(
            "  the texts split before this step: both models were given the perturbed model's context",
            style="yellow",
            highlight=False,
        )
    table = Table(box=None, pad_edge=False, show_edge=False)
    for name, justify in (("rank", "right"), ("unit", "left"), ("KL removed", "right"), ("KL patched", "right")):
        table.add_column(name, justify=justify)
    table.add_column("restores top-1")
    table.add_column("in set")
    chosen = set(result.minimal_set or [])
    for group in ("sublayer", "block"):
        units = result.ranked(group)
        shown = units[:top] if top else units
        for u in shown:
            table.add_row(
                str(u.rank),
                u.unit,
                "—" if u.restored_kl is None else f"{u.restored_kl:.1%}",
                f"{u.kl_patched:.4g}",
                "yes" if u.restores_top1 else "",
                "●" if u.unit in chosen else "",
            )
        if len(shown) < len(units):
            table.add_row("", f"… {len(units) - len(shown)} more", "", "", "", "", style="dim")
        if group == "sublayer" and units:
            table.add_section()
    console.print(table)
    if result.minimal_set is not None:
        if result.top1_d == result.top1_p:
            what = "the top-1 already agrees: nothing to restore"
        else:
            names = ", ".join(result.minimal_set)
            what = f"{names} ({'restores' if result.minimal_restores else 'does not restore'} the dense top-1)"
        console.print(f"  smallest set (greedy): {what}", highlight=False, soft_wrap=True)
    if result.skipped:
        console.print(f"  not in the perturbed model: {', '.join(result.skipped)}", style="dim", highlight=False)
    console.print()


def _write_rows(path: Path, rows: list[dict]) -> None:
    """`hierui attribute --out`: Parquet (engine.record.schema's types) for a .parquet suffix, else JSON Lines."""
    import json

    from engine.record import schema
    from engine.record.paths import atomic_write

    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        table = schema.to_table(rows, {"step": schema.INT, **schema.ATTRIBUTION_FIELDS}, str(path))
        atomic_write(path, lambda tmp: pq.write_table(table, str(tmp)))
    else:
        atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


@app.command()
def batch(
    prompts: Optional[Path] = typer.Option(
        None, "--prompts", help='a text file, one prompt per line, or .jsonl with "prompt" and optional "choices", "id"'
    ),
    from_session: Optional[Path] = typer.Option(
        None, "--from", help="rerun this session's prompt and settings under the --prune specs"
    ),
    model: Optional[str] = typer.Option(
        None, "--model", "-m", help=MODEL_HELP + " (default smollm2-135m, or the session's)"
    ),
    specs: Optional[list[str]] = typer.Option(
        None, "--prune", "-p", help=SPEC_HELP + "; repeatable (default wanda:0.5)"
    ),
    modes: Optional[list[str]] = typer.Option(
        None, "--mode", help="shared or free; repeatable (default shared, or the session's)"
    ),
    out: Optional[Path] = typer.Option(
        None, "--out", "-o", help="output folder (default runs/<time>); rerun into it to resume"
    ),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", help="tokens per run (default 32)"),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="T of the probability space (default 1.0)"),
    sample: Optional[bool] = typer.Option(
        None, "--sample/--greedy", help="sample both models with one seed (default greedy)"
    ),
    seed: Optional[int] = typer.Option(None, "--seed", help="sampling seed (default 0)"),
    raw: Optional[bool] = typer.Option(None, "--raw/--chat", help="do not apply the chat template (default: apply it)"),
    topk: Optional[int] = typer.Option(None, "--topk", help="size of the recorded top-k lists (default 5)"),
    truncate: Optional[bool] = typer.Option(
        None, "--truncate", help="a prompt longer than the context allows: keep its last tokens (default: refuse)"
    ),
    lens: Optional[bool] = typer.Option(
        None, "--lens/--no-lens", help="record the logit lens per layer (default: on)", show_default=False
    ),
    tie_margin: Optional[float] = typer.Option(None, "--tie-margin", help=TIE_MARGIN_HELP, show_default=False),
    counterfactual: Optional[bool] = typer.Option(
        None, "--counterfactual", help=COUNTERFACTUAL_HELP + "; the free runs only", show_default=False
    ),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N"),
    dtype: str = typer.Option("auto", "--dtype", help="auto, float32, bfloat16 or float16"),
    gpu_mem: Optional[str] = typer.Option(None, "--gpu-mem", help=GPU_MEM_HELP, show_default=False),
    calib: Optional[Path] = typer.Option(None, "--calib", help=CALIB_HELP),
    calib_samples: Optional[int] = typer.Option(None, "--calib-samples", help=calib_samples_help("batch")),
    calib_len: Optional[int] = typer.Option(None, "--calib-len", help=CALIB_LEN_HELP),
    calib_seed: Optional[int] = typer.Option(
        None, "--calib-seed", help="seed of the self-generated calibration (default 0)"
    ),
    no_cache: bool = typer.Option(False, "--no-cache", help="recompute calibration and pruned weights"),
    batch_size: Optional[int] = typer.Option(
        None, "--batch-size", "-b", min=1, help="prompts stepped at once (default 8 on CPU, 16 on GPU)"
    ),
    recipe: Optional[str] = typer.Option(
        None,
        "--recipe",
        help="a sweep described in a TOML file, or a shipped recipe's name (hierarchy); the other options override it",
    ),
    attribute: str = typer.Option(
        "none",
        "--attribute",
        help="flips: attribute every flip step of each run by patching the dense units into the perturbed model "
        "(attribution.parquet); none",
    ),
    ray: Optional[str] = typer.Option(
        None,
        "--ray",
        help="run the sweep on a Ray cluster: auto (the one started here with `ray start --head`, else a local "
        "one) or the cluster's ADDRESS; needs pip install 'hierui[ray]'",
        show_default=False,
    ),
    ray_cpus: Optional[int] = typer.Option(
        None,
        "--ray-cpus",
        help="with --ray: CPUs per pair worker on nodes without GPUs (default 1)",
        show_default=False,
    ),
    ray_gpus: Optional[int] = typer.Option(
        None, "--ray-gpus", help="with --ray: GPUs per pair worker, reserved together (default 1)", show_default=False
    ),
    ray_collect: Optional[str] = typer.Option(
        None,
        "--ray-collect",
        help="with --ray: who writes the sessions: auto (each worker that sees --out, else the driver), shared "
        "(the workers; --out must be shared) or driver",
        show_default=False,
    ),
) -> None:
    """Sweep prompts × --prune specs × --mode headless: a session per run, steps.parquet, summary.parquet/.csv."""
    from engine.sweep.folder import complete_runs, default_out_dir
    from engine.sweep.runner import run_sweep
    from engine.sweep.sweeps import plan_sweep
    from engine.sweep.tables import GROUP_FIELDS, group_summary

    args = dict(
        prompts_file=prompts,
        from_session=from_session,
        model=model,
        specs=specs,
        modes=modes,
        calib={
            "source": str(calib) if calib else None,
            "samples": calib_samples,
            "length": calib_len,
            "seed": calib_seed,
        },
        device=device,
        dtype=dtype,
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        sample=sample,
        seed=seed,
        raw=raw,
        topk=topk,
        truncate=truncate,
        lens=lens,
        tie_margin=tie_margin,
        counterfactual=counterfactual,
        attribute=attribute,
    )
    if recipe is not None:  # the recipe's prompts go to OUT/prompts.jsonl once the sweep starts
        from engine.sweep.recipe import apply_recipe

        out = out or default_out_dir()
        args, batch_size = apply_recipe(recipe, out, args, batch_size)
    ray_options = _ray_options(recipe, ray, ray_cpus, ray_gpus, ray_collect)  # Ray missing: one line, exit 2
    sweep = plan_sweep(**args)
    from engine.record.settings import default_batch_size

    plan = _print_plan(
        sweep.model,
        sweep.specs,
        sweep.device,
        sweep.dtype,
        sweep.calib.to_dict(),
        batch_size=batch_size or default_batch_size(sweep.device),
        max_new_tokens=sweep.settings.max_new_tokens,
        lens=sweep.settings.lens,
        gpu_mem=gpu_mem,
    )
    sweep.plan = plan.summary() if plan is not None else None  # batch.json and every session header record it
    out = out or default_out_dir()
    _quiet_libraries()
    from hierui.views.batch import BatchBars, RayBars, batch_table, choice_table

    bars = BatchBars(err_console) if ray_options is None else RayBars(err_console)
    try:
        if ray_options is None:
            result = run_sweep(sweep, out, use_cache=not no_cache, hooks=bars, batch_size=batch_size)
        else:
            from engine.sweep.distributed import run_ray_sweep

            result = run_ray_sweep(sweep, out, ray_options, use_cache=not no_cache, hooks=bars, batch_size=batch_size)
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


def _ray_options(recipe: str | None, address: str | None, cpus: int | None, gpus: int | None, collect: str | None):
    """batch --ray's engine.sweep.ray_options.RayOptions (the command line over the recipe's), or None without --ray;
    checks that Ray is installed."""
    from engine.sweep.distributed import check_address, import_ray
    from engine.sweep.ray_options import RayOptions

    given = {"address": address, "cpus": cpus, "gpus": gpus, "collect": collect}
    if recipe is not None:
        from engine.sweep.recipe import load_recipe

        given = {**load_recipe(recipe).ray, **{k: v for k, v in given.items() if v is not None}}
    given = {k: v for k, v in given.items() if v is not None}
    if "address" not in given:
        if given:
            raise HieruiError(f"--ray-{next(iter(given))} is an option of --ray: add --ray auto or --ray ADDRESS")
        return None
    options = RayOptions(
        **{**given, "address": given["address"].strip(), "collect": given.get("collect", "auto").lower()}
    )
    options.validate()
    import_ray()
    check_address(options.address)
    return options


@app.command()
def report(
    run_dir: Path = typer.Argument(..., help="the --out folder of hierui batch or hierui kld", show_default=False),
    out: Optional[Path] = typer.Option(
        None, "--out", "-o", help="the HTML file to write (default RUN_DIR/report.html)"
    ),
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


@app.command()
def prune(
    model: str = typer.Option("smollm2-135m", "--model", "-m", help=MODEL_HELP),
    spec: str = typer.Option("wanda:0.5", "--prune", "-p", help=SPEC_HELP),
    save: Optional[Path] = typer.Option(
        None, "--save", help="write the perturbed model as a transformers checkpoint here"
    ),
    prompt: str = typer.Option(DEFAULT_PROMPT, "--prompt", help="prompt for the side-by-side greedy text"),
    tokens: int = typer.Option(24, "--tokens", min=1, help="greedy tokens to show from each model"),
    raw: bool = typer.Option(False, "--raw", help="do not apply the chat template to the prompt"),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N"),
    dtype: str = typer.Option("auto", "--dtype", help="auto, float32, bfloat16 or float16"),
    gpu_mem: Optional[str] = typer.Option(None, "--gpu-mem", help=GPU_MEM_HELP, show_default=False),
    calib: Optional[Path] = typer.Option(None, "--calib", help=CALIB_HELP),
    calib_samples: Optional[int] = typer.Option(None, "--calib-samples", min=1, help=calib_samples_help("prune")),
    calib_len: Optional[int] = typer.Option(None, "--calib-len", min=2, help=CALIB_LEN_HELP),
    seed: int = typer.Option(0, "--seed", help="seed of the self-generated calibration"),
    no_cache: bool = typer.Option(False, "--no-cache", help="recompute calibration and pruned weights"),
) -> None:
    """Perturb a model and report sparsity, time, perplexity and greedy text, dense vs perturbed."""
    from engine.models.loading import resolve
    from engine.perturb.spec import parse_spec
    from engine.record.settings import calibration_for

    ref = resolve(model)  # bad names fail here, before anything slow
    parsed = parse_spec(spec)
    calibration = (
        calibration_for(  # engine.record.settings: the one rule (the explorer's, so the two share their caches)
            parsed.method,
            "prune",
            source=str(calib) if calib else None,
            samples=calib_samples,
            length=calib_len,
            seed=seed,
        )
    )
    if save is not None and parsed.family == "quant":
        raise HieruiError(f"{parsed} models are quantized on the fly and not saved; use --prune {parsed} directly")
    if save is not None and save.is_dir() and any(save.iterdir()):
        raise HieruiError(f"--save directory {save} is not empty")
    if save is not None:  # an unwritable place fails here, not after the pruning
        save = _writable_folder(save, "--save")
    config = _check_model_args(model, parsed, device)  # before the dense model is loaded
    if config is not None:  # the prompt and --tokens within the context (the tokenizer is local: no download)
        from engine.models.loading import config_int, load_tokenizer
        from engine.models.tokens import prompt_ids as _prompt_ids
        from engine.record.settings import fit_context

        n = len(_prompt_ids(load_tokenizer(model), prompt, raw=raw))
        fit_context(n, tokens, config_int(config, "max_position_embeddings"), option="--tokens", can_truncate=False)
    if dtype.lower() != "auto":
        from engine.models.loading import DTYPES

        if dtype.lower() not in DTYPES:
            raise HieruiError(f"unknown dtype '{dtype}': use auto, float32, bfloat16 or float16")
    calib_options = calibration.to_dict()
    options = dict(max_new_tokens=tokens, lens=False, perplexity=512, gpu_mem=gpu_mem)
    plan = _print_plan(model, [parsed], device, dtype, calib_options, **options)
    _quiet_libraries()

    from engine.models.loading import load
    from engine.models.tokens import prompt_ids
    from engine.perturb import perturb
    from engine.run import quality
    from engine.run.plan import planned_device_map, plans_streaming
    from hierui.progress import stage_progress

    with stage_progress(err_console) as (say, step):
        loaded = load(
            model,
            device=device,
            dtype=dtype,
            progress=step,
            streamed=plans_streaming(plan),
            device_map=planned_device_map(plan),
        )
        pair = perturb(loaded, parsed, use_cache=not no_cache, progress=step, calib_options=calibration.to_dict())
        measuring = "measuring perplexity and greedy text"
        step(measuring, 0, 4)
        text = quality.heldout_text()
        ppl_d = quality.perplexity(pair.dense, loaded.tokenizer, text)
        step(measuring, 1, 4)
        ppl_p = quality.perplexity(pair.perturbed, loaded.tokenizer, text)
        step(measuring, 2, 4)
        ids = prompt_ids(loaded.tokenizer, prompt, raw=raw)
        out_d = quality.greedy_tokens(pair.dense, loaded.tokenizer, ids, tokens)
        step(measuring, 3, 4)
        out_p = quality.greedy_tokens(pair.perturbed, loaded.tokenizer, ids, tokens)
        step(measuring, 4, 4)

    report = pair.report
    console.print(
        f"[bold]{ref.display}[/] · [bold cyan]{parsed}[/] · {loaded.device} {str(loaded.dtype).replace('torch.', '')}"
    )
    if report.by_type and parsed.family in ("prune", "checkpoint"):
        table = Table(title="zero weights in the decoder linears", title_justify="left")
        table.add_column("linear")
        table.add_column("weights", justify="right")
        table.add_column("dense", justify="right")
        table.add_column("perturbed", justify="right")
        for name, row in report.by_type.items():
            style = "bold" if name == "all" else None
            table.add_row(name, f"{row['total']:,}", f"{row['dense']:.2%}", f"{row['perturbed']:.2%}", style=style)
        console.print(table)
    experts = _expert_table(report.details)
    if experts is not None:
        console.print(experts)
    console.print(_describe_details(report.details))
    how = "loaded from cache" if report.from_cache else f"{report.seconds:.2f} s"
    calib_note = ""
    if report.calibration:
        from engine.perturb.calibration import describe_calibration

        c = report.calibration
        made = "from the cache" if c["from_cache"] else f"made in {c['seconds']:.1f} s"
        calib_note = f" · {describe_calibration(c)} ({made})"
    console.print(f"perturbation time: {how}{calib_note}", highlight=False)
    ratio = ppl_p / ppl_d
    console.print(f"perplexity on the held-out text: dense {ppl_d:.2f} · perturbed {ppl_p:.2f} · ratio {ratio:.2f}×")

    side = Table(title=f"greedy continuation of {prompt!r}", title_justify="left", expand=True)
    side.add_column("dense", ratio=1)
    side.add_column(f"perturbed ({parsed})", ratio=1)
    side.add_row(loaded.tokenizer.decode(out_d), loaded.tokenizer.decode(out_p))
    console.print(side)

    if save is not None:
        from engine.perturb.export import save_checkpoint

        save_checkpoint(pair, save)
        console.print(f"saved to {save} (load it with --prune checkpoint:{save} or from_pretrained)")


def _print_plan(model: str, specs: list, device: str, dtype: str, calib: dict, gpu_mem=None, **options):
    """engine.run.plan's estimate as one line on stdout before anything is loaded (stderr keeps its one line per
    error), kept for an out-of-memory message; nothing where the config is not known before loading. A pair that
    cannot fit even streamed, or a streamed one with a spec that cannot stream: exit 2 here. `gpu_mem`: the
    --gpu-mem text."""
    from engine.run.plan import parse_size, plan_for_run, plans_streaming, remember

    _quiet_libraries()
    size = parse_size(gpu_mem) if gpu_mem is not None else None
    plan = plan_for_run(model, specs, device, dtype, calib, gpu_mem=size, **options)
    if plans_streaming(plan):
        from engine.perturb.spec import check_streamable

        check_streamable(specs)
    remember(plan)
    if plan is not None:
        console.print(plan.line(), style="dim", markup=False, highlight=False, soft_wrap=True)
    return plan


@app.command()
def plan(
    model: str = typer.Option("smollm2-135m", "--model", "-m", help=MODEL_HELP),
    specs: Optional[list[str]] = typer.Option(
        None, "--prune", "-p", help=SPEC_HELP + "; repeatable, one pair at a time (default wanda:0.5)"
    ),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N"),
    dtype: str = typer.Option("auto", "--dtype", help="auto, float32, bfloat16 or float16"),
    gpus: Optional[int] = typer.Option(
        None,
        "--gpus",
        help="GPUs to spread the pair over, one device_map for both models (default: every visible one, as "
        "explore, batch and prune do)",
        show_default=False,
    ),
    gpu_mem: Optional[str] = typer.Option(
        None,
        "--gpu-mem",
        help="memory per GPU, e.g. 80GiB, 24GB, 512MiB (default: the GPU's free memory); on a CPU, a simulated "
        "device of that size (above it the layers are streamed)",
    ),
    batch_size: int = typer.Option(1, "--batch-size", "-b", min=1, help="prompts stepped at once"),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1, help="tokens per run"),
    prompt_tokens: Optional[int] = typer.Option(
        None, "--prompt-tokens", min=1, help="prompt length in tokens (default 64)", show_default=False
    ),
    calib_samples: Optional[int] = typer.Option(None, "--calib-samples", min=1, help=calib_samples_help("batch")),
    calib_len: Optional[int] = typer.Option(None, "--calib-len", min=2, help=CALIB_LEN_HELP),
    calib: Optional[Path] = typer.Option(None, "--calib", help=CALIB_HELP),
    no_lens: bool = typer.Option(False, "--no-lens", help="without the logit lens per layer"),
) -> None:
    """Predict the peak memory of the dense + perturbed pair, and where it would go, before loading anything.

    From the model's config alone: the dense weights, the tensors the perturbation replaces, calibration
    activations, the pruning workspace of the layer in flight, both KV caches for --batch-size × (prompt +
    --max-new-tokens), logits and the lens; whether it fits the device, and the placement: one device, several
    GPUs with one device_map for both models, or streamed offload."""
    from engine.models.loading import resolve
    from engine.perturb.spec import parse_spec
    from engine.record.settings import calibration_for
    from engine.run.plan import PROMPT_TOKENS, estimate, gib, parse_size, visible_gpus

    resolve(model)
    parsed = [parse_spec(s) for s in (specs or ["wanda:0.5"])]
    size = parse_size(gpu_mem) if gpu_mem is not None else None
    if calib is not None and not calib.is_file():
        raise HieruiError(f"calibration file not found: {calib}")
    for p in parsed:
        _check_model_args(model, p, device)
    calibrating = [p for p in parsed if p.needs_calibration]
    source = str(calib) if calib else None
    settings = [
        calibration_for(p.method, "batch", source=source, samples=calib_samples, length=calib_len) for p in calibrating
    ]
    largest = max(settings, key=lambda c: c.samples * c.length) if settings else None
    _quiet_libraries()
    result = estimate(
        model,
        parsed,
        device=device,
        dtype=dtype,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        prompt_tokens=prompt_tokens or PROMPT_TOKENS,
        calib=(largest.samples, largest.length) if largest else None,
        self_calibration=calib is None,
        lens=not no_lens,
        gpus=gpus if gpus is not None else visible_gpus(device),
        gpu_mem=size,
        fetch=True,
    )
    if result is None:
        raise HieruiError(f"the config of {model} is not known before it is fetched: hierui models pull {model}")
    title = f"{result.display} · {result.dtype} on {result.device} · {', '.join(result.specs)}"
    table = Table(title=title, title_justify="left")
    table.add_column("item")
    table.add_column("memory", justify="right")
    table.add_column("resident during")
    table.add_column("counted as", overflow="fold")
    for item in result.items:
        where = ", ".join(item.stages) if len(item.stages) < 4 else "all"
        host = " (host)" if not item.on_device and result.device != "cpu" else ""
        table.add_row(item.name, gib(item.nbytes), where + host, item.note)
    console.print(table)
    stages = " · ".join(f"{s} {gib(n)}" for s, n in result.stages.items())
    console.print(f"by stage: {stages}", highlight=False, soft_wrap=True)
    if result.calibration:
        samples, length = result.calibration
        console.print(f"calibration {samples}×{length}; prompt {result.prompt_tokens} tokens", highlight=False)
    if result.gpu_loads:
        spread = Table(title="one device_map for both models", title_justify="left")
        for column in ("GPU", "modules (dense and perturbed alike)", "dense weights", "pair, at most"):
            spread.add_column(column, justify="right" if column != "modules (dense and perturbed alike)" else "left")
        for gpu, (modules, dense, peak) in sorted(result.gpu_loads.items()):
            spread.add_row(f"cuda:{gpu}", modules, gib(dense), gib(peak))
        console.print(spread)
    console.print(result.line(), highlight=False, soft_wrap=True)


@app.command()
def kld(
    model: str = typer.Option("smollm2-135m", "--model", "-m", help=MODEL_HELP),
    specs: Optional[list[str]] = typer.Option(None, "--prune", "-p", help=SPEC_HELP + "; repeatable"),
    text: Optional[Path] = typer.Option(None, "--text", help="a UTF-8 text file to score"),
    suite: Optional[str] = typer.Option(None, "--suite", help="a shipped corpus: heldout (the default)"),
    ctx: int = typer.Option(512, "--ctx", help="tokens per window; the second half of each is scored"),
    stride: Optional[int] = typer.Option(None, "--stride", help="tokens between window starts (default --ctx)"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="output folder (default runs/kld-<time>)"),
    save_base: Optional[Path] = typer.Option(
        None,
        "--save-base",
        help="write a dense base file here (safetensors): the dense head's inputs, exact; with --base-k K, the "
        "top-K log-probabilities (smaller, KL lower bounds)",
    ),
    base: Optional[Path] = typer.Option(
        None, "--base", help="compare against this base file instead of running the dense model"
    ),
    base_k: Optional[int] = typer.Option(None, "--base-k", min=1, help="write a top-K base file (e.g. 64)"),
    ray: Optional[str] = typer.Option(
        None, "--ray", help="score the specs on a Ray cluster: auto or its address (pip install 'hierui[ray]')"
    ),
    ray_cpus: Optional[int] = typer.Option(None, "--ray-cpus", help="with --ray: CPUs per worker (default 1)"),
    ray_gpus: Optional[int] = typer.Option(None, "--ray-gpus", help="with --ray: GPUs per worker (default 1)"),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N"),
    dtype: str = typer.Option("auto", "--dtype", help="auto, float32, bfloat16 or float16"),
    no_cache: bool = typer.Option(False, "--no-cache", help="recompute calibration and pruned weights"),
) -> None:
    """Teacher-forced KL divergence of a corpus, dense vs each --prune spec, in llama.cpp's report.

    --save-base FILE stores the dense model's side of the comparison (exact by default; --base-k K writes a
    small top-K file whose KL is a lower bound), and --base FILE scores against it without running the dense
    model. Without --prune, --base scores --model itself: `hierui prune --save DIR`, then
    `hierui kld --model DIR --base FILE`, holds only the pruned model in memory."""
    import time

    from engine.kld import corpus as kldmod
    from engine.models.loading import resolve
    from engine.perturb.spec import parse_spec
    from engine.record.settings import calibration_for

    resolve(model)
    parsed = [parse_spec(s) for s in specs or []]
    if text is not None and suite is not None:
        raise HieruiError("give --text or --suite, not both")
    if base_k is not None and save_base is None:
        raise HieruiError("--base-k is the K of --save-base FILE; give both")
    if base is not None and save_base is not None:
        raise HieruiError("--base and --save-base do not go together: a base file is written from the dense model")
    ray_options = _ray_options(None, ray, ray_cpus, ray_gpus, None)  # Ray missing: one line, exit 2
    if ray_options is not None and save_base is not None:
        raise HieruiError("--save-base runs the dense model here: write the base file without --ray")
    if base is not None and not parsed:  # the model itself against the base file (a saved pruned checkpoint, say)
        parsed = [parse_spec("none")]
    if not parsed and save_base is None:
        raise HieruiError("nothing to do: give --prune SPEC (repeatable) and/or --save-base FILE")
    _output_file(save_base, "--save-base")
    corpus = str(text) if text is not None else (suite or "heldout")
    body = kldmod.read_text(text) if text is not None else kldmod.suite_text(suite or "heldout")
    base_file = None
    if base is not None:
        from engine.kld.base import BaseFile

        base_file = BaseFile(base)  # a truncated or foreign file fails here, before any model loads
    for p in parsed:
        _check_model_args(model, p, device)
    from engine.models.loading import check_device, config_int, load_tokenizer, read_config

    check_device(device)
    config = read_config(model)
    if config is not None:  # the corpus against the windows before the model loads
        tok = load_tokenizer(model)
        _ids, lay, _bos = kldmod.prepare(tok, body, ctx, stride, config_int(config, "max_position_embeddings"))
        if base_file is not None:
            base_file.check(tok, body, lay)
        if save_base is not None and base_k is not None and base_k > len(tok):
            raise HieruiError(f"--base-k {base_k} is beyond the vocabulary ({len(tok)} tokens)")
    out = _writable_folder(out or Path("runs") / time.strftime("kld-%Y%m%d-%H%M%S"), "--out")
    _quiet_libraries()

    from engine.models.loading import load
    from engine.perturb import perturb
    from hierui.progress import stage_progress
    from hierui.views.kld import print_report

    if ray_options is not None:
        _kld_on_ray(model, parsed, body, corpus, ctx, stride, out, ray_options, device, dtype, no_cache, base_file)
        return
    writer = None
    if save_base is not None:
        from engine.kld.base import BaseWriter

        writer = BaseWriter(save_base, base_k)
    with stage_progress(err_console) as (say, step):
        loaded = load(model, device=device, dtype=dtype, progress=step)
        if writer is not None and base_k is not None and base_k > len(loaded.tokenizer):
            raise HieruiError(f"--base-k {base_k} is beyond the vocabulary ({len(loaded.tokenizer)} tokens)")

        def perturbed(p):
            calibration = calibration_for(p.method, "prune")
            return perturb(loaded, p, use_cache=not no_cache, progress=step, calib_options=calibration.to_dict())

        if base_file is None:  # every spec beside the dense model: one dense forward per window serves them all
            pairs = [perturbed(p) for p in parsed]
            run = kldmod.score(loaded, pairs, body, corpus, ctx, stride, save_base=writer, progress=step)
        else:  # no dense forward to share: one perturbed copy at a time, so only one is ever in memory
            import gc

            run = None
            for p in parsed:
                pair = perturbed(p)
                part = kldmod.score(loaded, [pair], body, corpus, ctx, stride, base=base_file, progress=step)
                run = part if run is None else run.merged(part)
                del pair, part
                gc.collect()
        from engine.sweep.folder import noise_floor

        run.noise_floor = noise_floor(loaded.ref.name, loaded.model)
        if writer is not None:
            lay = kldmod.layout(len(run.ids), ctx, stride)
            writer.write(loaded.tokenizer, body, lay, loaded.ref.name)
        rows = kldmod.write_tables(run, out, loaded.tokenizer) if parsed else []
    if rows:
        worst = run.worst(loaded.tokenizer)
        print_report(console, run, rows, worst, out)
    if writer is not None:
        console.print(
            f"base file {save_base}: {writer.describe(len(run.positions))} (ctx {ctx}, stride {run.stride}), "
            f"{save_base.stat().st_size / 2**20:.1f} MiB",
            highlight=False,
        )


def _kld_on_ray(model, parsed, body, corpus, ctx, stride, out, ray_options, device, dtype, no_cache, base_file):
    """hierui kld --ray: the specs scored on the cluster (engine.kld.distributed), the tables and report as locally."""
    from engine.kld import corpus as kldmod
    from engine.kld.distributed import score_on_ray
    from engine.models.loading import load_tokenizer
    from hierui.views.kld import print_report

    def say(text: str) -> None:
        err_console.print(text, highlight=False, markup=False, soft_wrap=True)

    run = score_on_ray(
        model,
        [str(p) for p in parsed],
        body,
        corpus,
        ctx,
        stride,
        ray_options,
        device=device,
        dtype=dtype,
        use_cache=not no_cache,
        base=str(base_file.path.resolve()) if base_file is not None else None,  # the workers' cwd differs
        say=say,
    )
    tokenizer = load_tokenizer(model)
    rows = kldmod.write_tables(run, out, tokenizer)
    print_report(console, run, rows, run.worst(tokenizer), out)


@app.command()
def check(
    model: str = typer.Option("smollm2-135m", "--model", "-m", help=MODEL_HELP),
    specs: Optional[list[str]] = typer.Option(
        None, "--prune", "-p", help=SPEC_HELP + "; repeatable (default: none and one of every kind)"
    ),
    steps: int = typer.Option(8, "--steps", min=1, help="tokens stepped per check"),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N"),
    dtype: str = typer.Option("auto", "--dtype", help="auto, float32, bfloat16 or float16"),
    calib_samples: int = typer.Option(8, "--calib-samples", min=1, help="calibration sequences"),
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
    from engine.models.loading import DTYPES, resolve
    from engine.perturb.spec import Spec, parse_spec

    resolve(model)  # everything the user typed is checked before anything is loaded
    parsed = list({str(s): s for s in map(parse_spec, specs or [])}.values())
    if dtype.lower() != "auto" and dtype.lower() not in DTYPES:
        raise HieruiError(f"unknown dtype '{dtype}': use auto, float32, bfloat16 or float16")
    _output_file(json_out, "--json")
    for spec in parsed or [Spec("none")]:  # the device, a checkpoint's path, the spec against config.json
        _check_model_args(model, spec, device)
    _quiet_libraries()
    from engine.check.selfcheck import run_selfcheck
    from engine.models.loading import load
    from hierui.progress import stage_progress
    from hierui.views.check import print_check

    with stage_progress(err_console) as (_say, step):
        loaded = load(model, device=device, dtype=dtype, progress=step)
        result = run_selfcheck(
            loaded,
            [str(s) for s in parsed] or list(DEFAULT_SPECS),
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
    model: str = typer.Option("smollm2-135m", "--model", "-m", help=MODEL_HELP),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N"),
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
    from engine.models.loading import check_device, resolve
    from engine.record.prompts import read_prompts
    from engine.run.floor import parse_dtypes, save_floor
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
    _quiet_libraries()
    from engine.models.loading import load
    from hierui.progress import stage_progress
    from hierui.views.noise import print_noise

    reference = "float32" if "float32" in wanted else wanted[0]
    with stage_progress(err_console) as (_say, step):
        loaded = load(model, device=device, dtype=reference, progress=step)
        floor = measure_floor(loaded, items, max_new_tokens or DEFAULT_STEPS, wanted, progress=step)
    path = save_floor(floor)
    print_noise(console, floor, path)


def _expert_table(details: dict):
    """Per MoE layer and expert: the sparsity of its matrices and the calibration tokens routed to it."""
    rows = details.get("by_expert") or []
    if not rows:
        return None
    tokens = {(e["layer"], i): n for e in details.get("expert_tokens") or [] for i, n in enumerate(e["tokens"])}
    experts = sorted({r["expert"] for r in rows})
    table = Table(title="experts: zero weights (calibration tokens routed to each)", title_justify="left")
    table.add_column("layer", justify="right")
    for e in experts:
        table.add_column(f"expert {e}", justify="right")
    for layer in sorted({r["layer"] for r in rows}):
        cells = {r["expert"]: r for r in rows if r["layer"] == layer}
        table.add_row(
            str(layer),
            *[
                f"{cells[e]['perturbed']:.1%}" + (f" ({tokens[layer, e]:,})" if (layer, e) in tokens else "")
                if e in cells
                else "—"
                for e in experts
            ],
        )
    return table


def _describe_details(details: dict) -> str:
    """One line on what a drop or quantization did (empty for pruning)."""
    if "dropped" in details:
        sims = details.get("similarity") or []
        scored = ", ".join(f"{i} ({sims[i]:.3f})" if i < len(sims) else str(i) for i in details["dropped"])
        noun = {"attention": "attention sublayers", "mlp": "MLP sublayers", "block": "blocks"}[details["kind"]]
        return f"dropped {noun} (input/output cosine on calibration): {scored}"
    if "quantized_linears" in details:
        counts = details.get("quantized") or {}
        kinds = ", ".join(f"{n} {kind.replace('_', ' ')}" for kind, n in counts.items() if n)
        kept = ", ".join(details.get("full_precision") or [])
        skipped = len(details.get("skipped") or [])
        return (
            f"quantized {kinds or str(details['quantized_linears']) + ' linears'} to {details['bits']} bits "
            f"({details['backend']})"
            + (f"; routers kept in full precision ({kept})" if kept else "")
            + (f"; {skipped} skipped (see the session's details)" if skipped else "")
        )
    if details.get("experts_without_tokens"):
        missed = ", ".join(f"layer {layer} expert {expert}" for layer, expert in details["experts_without_tokens"])
        return f"experts that no calibration token reached (pruned by magnitude instead): {missed}"
    structure = details.get("structure")
    if isinstance(structure, dict) and structure.get("hidden_metrics"):
        return f"structurally different checkpoint: hidden-state metrics {structure['hidden_metrics']}"
    return ""


PATH_OPTIONS = ("--out", "-o", "--save", "--sessions", "--calib", "--prompts", "--from")
PATH_OPTIONS += ("--text", "--base", "--save-base")  # hierui kld


def _reject_empty_paths(args: list[str]) -> None:
    """An empty path option (`--out ""`) is an error, not the current folder (click turns "" into ".")."""
    for i, arg in enumerate(args):
        if arg == "--":
            return
        name, eq, value = arg.partition("=")
        if name in PATH_OPTIONS and (
            (eq and not value.strip()) or (not eq and i + 1 < len(args) and not args[i + 1].strip())
        ):
            raise HieruiError(f"{name} is empty: give a path")


def _unwrap_help() -> None:
    """The commands' docstrings are wrapped for the source; typer keeps those line breaks, so a terminal of
    another width showed ragged lines ("where it" / "breaks"). Each paragraph becomes one line, which rich
    then wraps at the terminal's width."""
    import inspect

    for typer_app in (app, models_app, cache_app):
        for info in typer_app.registered_commands:
            doc = info.help or (info.callback.__doc__ if info.callback else None)
            if doc:
                paragraphs = inspect.cleandoc(doc).split("\n\n")
                info.help = "\n\n".join(" ".join(line.strip() for line in p.splitlines()) for p in paragraphs)


_unwrap_help()


def main(argv: list[str] | None = None) -> None:
    """The `hierui` command: every HieruiError is one line on stderr and its exit code; out of memory and
    Ctrl-C likewise. `argv` (default: the process's arguments) lets tests run it in-process."""
    from engine.run.plan import forget

    forget()  # an out-of-memory message names this command's own plan only
    try:
        _reject_empty_paths(sys.argv[1:] if argv is None else argv)
        app(args=argv)
    except HieruiError as e:
        from rich.text import Text  # the message is plain text: a path like a[b] is not markup

        from engine.run.plan import last_figure
        from hierui.tokentext import escape  # a message may quote a file's text: no control characters

        message = str(e) + (last_figure() if e.exit_code == 1 and str(e).startswith("out of memory") else "")
        err_console.print(Text("error: ", style="bold red") + Text(escape(message)), highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
    except (MemoryError, RuntimeError) as e:  # torch.OutOfMemoryError (CUDA) derives from RuntimeError
        if not is_oom(e):
            raise
        from engine.run.plan import last_figure

        figure = last_figure()  # the estimate this run printed at its start, if any
        if isinstance(e, MemoryError):
            err_console.print(
                "error: out of memory: use a smaller model, --dtype bfloat16, a smaller --batch-size "
                f"or fewer --calib-samples{figure}",
                highlight=False,
                soft_wrap=True,
            )
        else:
            err_console.print(
                "error: CUDA out of memory: use --dtype bfloat16, a smaller --batch-size, fewer "
                f"--calib-samples, a smaller model or --device cpu{figure}",
                highlight=False,
                soft_wrap=True,
            )
        sys.exit(1)


if __name__ == "__main__":
    main()
