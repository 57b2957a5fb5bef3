"""`hierui explore`: every argument checked, the memory plan printed, then the explorer opens on the pair."""

from dataclasses import replace
from pathlib import Path
from typing import Annotated, Optional

import typer

from engine.errors import HieruiError
from engine.record.methods import DEFAULT_SPEC
from engine.record.settings import DEFAULT_PROMPT
from hierui.cli import checks, launch, options
from hierui.cli.apps import app
from hierui.output import err_console

# explore's own options with a long declaration, kept out of its signature
Choices = Annotated[
    Optional[list[str]], typer.Option("--choices", help="a candidate token of the categorical subspace; repeatable")
]
Sessions = Annotated[
    Optional[Path],
    typer.Option(
        "--sessions", help="folder for the session files (default: $HIERUI_HOME/sessions)", show_default=False
    ),
]
FromKld = Annotated[
    Optional[Path],
    typer.Option(
        "--from-kld",
        help="a hierui kld output folder: its model, spec (--prune if the run has it) and that spec's calibration "
        "(the --calib options only confirm it), the prompt the raw text before its --worst N-th token; a model, "
        "checkpoint or calibration file it names by path or hub id is used only when you repeat it with --model, "
        "--prune or --calib",
    ),
]


@app.command()
def explore(
    ctx: typer.Context,
    model: options.Model = "smollm2-135m",
    spec: options.Spec = DEFAULT_SPEC,
    prompt: str = typer.Option(DEFAULT_PROMPT, "--prompt", help="the prompt both models continue"),
    mode: str = typer.Option("shared", "--mode", help="shared (both fed the dense token) or free (each its own)"),
    temperature: float = typer.Option(1.0, "--temperature", "-T", help="T of the probability space"),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="tokens per run"),
    sample: bool = typer.Option(False, "--sample", help="sample both models with one seeded stream (default greedy)"),
    seed: int = typer.Option(0, "--seed", help="sampling seed"),
    choices: Choices = None,
    raw: bool = typer.Option(False, "--raw", help="do not apply the chat template"),
    topk: int = typer.Option(5, "--topk", help="size of the top-k lists"),
    run: bool = typer.Option(False, "--run", help="start stepping as soon as the models are ready"),
    truncate: bool = typer.Option(False, "--truncate", help=options.TRUNCATE_HELP),
    lens: options.lens("all", ", computed behind the stepping: the loop never waits for it") = None,
    no_lens: options.NoLens = False,
    tie_margin: options.TieMargin = None,
    counterfactual: bool = typer.Option(False, "--counterfactual", help=options.COUNTERFACTUAL_HELP),
    sessions: Sessions = None,
    device: options.Device = "auto",
    dtype: options.Dtype = "auto",
    gpu_mem: options.GpuMem = None,
    gpus: options.Gpus = None,
    calib: options.Calib = None,
    calib_samples: options.CalibSamples = None,
    calib_len: options.CalibLen = None,
    calib_seed: options.CalibSeed = None,
    no_cache: options.NoCache = False,
    from_kld: FromKld = None,
    worst: int = typer.Option(1, "--worst", min=1, help="with --from-kld: the token's rank (1 = the highest KLD)"),
) -> None:
    """Open the explorer: step the dense and the perturbed model token by token and watch them drift apart."""
    from engine.models.names import resolve
    from engine.perturb.spec import parse_spec
    from engine.record.settings import StepSettings, calibration_for
    from engine.run.open import blamed

    lens = checks.lens_choice(lens, no_lens, "all")
    source = None  # where the model and spec came from, when a file named them (engine.run.open.pair_request)
    given_calib = dict(source=calib, samples=calib_samples, length=calib_len, seed=calib_seed)
    if from_kld is not None:  # the context of a high-KLD token of a corpus run, as a raw prompt
        found = _from_kld(ctx, from_kld, worst, spec, model, given_calib)
        model, spec, prompt, raw = found["model"], found["spec"], found["prompt"], True
        source = found["source"]
        if found["calibration"] is not None:  # the run's own calibration: the model that scored its tokens
            given_calib = found["calibration"]
            calib = Path(given_calib["source"]) if given_calib["source"] is not None else None
    with blamed(source, "model"):
        resolve(model)  # everything the user typed is checked before the UI starts
    with blamed(source, "spec"):
        parsed = parse_spec(spec)
    _check_mode(ctx, from_kld is not None, sample, parsed)
    # engine.record.settings: the one default calibration, the same in every command
    sizes = {k: v for k, v in given_calib.items() if k != "source"}
    calibration = calibration_for(parsed.method, **sizes)
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
        lens=lens,
        tie_margin=tie_margin,
        counterfactual=counterfactual,
    ).validate()
    # --calib: a text file, at least one sequence long (before the UI starts)
    calibration = replace(calibration, source=checks.check_calib_file(calib, model, calibration.length))
    placed = (device, gpu_mem, gpus)
    sessions = _check_before_the_ui(model, parsed, settings, prompt, placed, dtype, sessions, source)
    from engine.run.open import pair_request

    placed = dict(device=device, dtype=dtype, gpu_mem=gpu_mem, gpus=gpus, use_cache=not no_cache, source=source)
    workload = dict(max_new_tokens=max_new_tokens, lens=lens)
    request = pair_request(model, [parsed], calib=calibration.to_dict(), **placed, **workload)
    plan = launch.print_plan(request)
    from hierui.explorer.app import HieruiApp

    launch.run_app(
        HieruiApp(
            pair_factory=_pair_factory(request, plan),
            prompt=prompt,
            settings=settings,
            session_dir=sessions,
            title_hint=f"{model} · {parsed}",
            autorun=run,
        )
    )


def _from_kld(ctx: typer.Context, run_dir: Path, worst: int, spec: str, model: str, calib: dict) -> dict:
    """--from-kld: the model, spec and prompt of the run's --worst N-th token (engine.kld.corpus.worst_prompt),
    the calibration kld.json records for that spec (engine.kld.folder.recorded_calibration; None: none, the
    defaults then), and `source`, the labels an error about the model or spec starts with. The file's model and
    spec only where engine.models.trust allows; a --model the user typed only confirms the file's, a --prune picks
    one of its specs, and the calibration options (`calib`: source, samples, length, seed; None: not given) only
    confirm the calibration kld.json records for it (anything else is refused)."""
    from engine.kld.corpus import worst_prompt
    from engine.kld.folder import recorded_calibration
    from engine.record.validate import escape

    given = checks.given_options(ctx, "model", "spec")
    found = worst_prompt(run_dir, worst, spec if given["--prune"] else None, model if given["--model"] else None)
    found["calibration"] = recorded_calibration(run_dir, found["spec"], calib)
    where = escape(str(Path(run_dir).expanduser() / "kld_worst.json"))
    return {**found, "source": {"model": f"{where}: the run's model", "spec": f"{where}: the run's perturbation"}}


def _check_mode(ctx: typer.Context, from_kld: bool, sample: bool, parsed) -> None:
    """Every option explore was given has an effect (hierui.cli.checks.refuse_unused): with --from-kld the prompt
    is the raw text before the file's token (--prompt, --raw do nothing); --worst only with --from-kld; --seed
    only with --sample; the calibration options only with a spec that calibrates."""
    if from_kld:
        why = "the prompt is the raw text before the run's token"
        checks.refuse_unused(checks.given_options(ctx, "prompt", "raw"), "--from-kld", why)
    else:
        checks.refuse_unused(checks.given_options(ctx, "worst"), "--from-kld", only=True)
    if not sample:
        checks.refuse_unused(checks.given_options(ctx, "seed"), "--sample", "", only=True)
    calibration = checks.given_options(ctx, "calib", "calib_samples", "calib_len", "calib_seed")
    checks.calibration_unused([parsed], calibration)


def _check_before_the_ui(model: str, parsed, settings, prompt: str, placed, dtype, sessions, source=None) -> Path:
    """Every other argument, checked before the explorer starts (a mistake inside the UI would be lost with its
    screen); `placed`: (--device, --gpu-mem, --gpus); `source`: where the model and spec came from when a file
    named them (engine.run.open.pair_request). Returns the folder for the sessions."""
    from engine.run.open import check_budget

    device, gpu_mem, gpus = placed
    if settings.counterfactual and settings.mode != "free":
        raise HieruiError("--counterfactual branches a free-mode run at its first divergence: add --mode free")
    checks.check_dtype(dtype)
    config = _check_model(model, parsed, device, settings.max_new_tokens, source)
    check_budget(gpu_mem, gpus, device)
    sessions = checks.writable_folder(sessions, "--sessions")
    if not launch.interactive():
        raise HieruiError("explore needs an interactive terminal; for headless runs use hierui batch")
    config = _fetch_config(model, parsed, config)
    _check_prompt(model, settings, config, prompt)
    return sessions


def _check_model(model: str, parsed, device: str, max_new_tokens: int, source=None) -> dict | None:
    """A checkpoint's path, the device, the spec against the config and --max-new-tokens within the context (with
    a prompt of at least one token), from local files only; returns the config (None: not known yet)."""
    from engine.models.configs import config_int
    from engine.models.names import resolve
    from engine.record.settings import fit_context
    from engine.run.open import blamed

    if parsed.declared.takes_path:
        with blamed(source, "spec"):
            resolve(parsed.path)
    config = checks.check_model_args(model, parsed, device, source)
    if config is not None:
        fit_context(1, max_new_tokens, config_int(config, "max_position_embeddings"), truncate=True)
    return config


def _fetch_config(model: str, parsed, config: dict | None) -> dict | None:
    """A hub model that cannot be fetched fails here, not inside the UI; one whose config is not local yet has
    its config fetched (without its weights) and the spec checked against it."""
    from engine.models.configs import config_from_file
    from engine.models.hub import check_reachable, fetch_light

    check_reachable(model)
    launch.quiet_libraries()
    light = fetch_light(model, progress=lambda m: err_console.print(f"[dim]{m}[/]")) if config is None else None
    if light is not None:
        from engine.perturb.spec import check_fits

        config = config_from_file(light / "config.json")
        check_fits(parsed, config)
    return config


def _check_prompt(model: str, settings, config: dict | None, prompt: str) -> None:
    """--choices as tokens and the prompt within the context: both need the tokenizer, loaded before the UI."""
    if not settings.choices and config is None:
        return
    from engine.models.configs import config_int
    from engine.models.loading import load_tokenizer
    from engine.models.tokens import choice_token_ids, prompt_ids
    from engine.record.settings import fit_context

    tokenizer = load_tokenizer(model, progress=lambda m: err_console.print(f"[dim]{m}[/]"))
    if settings.choices:
        choice_token_ids(tokenizer, settings.choices)
    if config is not None:
        n = len(prompt_ids(tokenizer, prompt, raw=settings.raw))
        fit_context(n, settings.max_new_tokens, config_int(config, "max_position_embeddings"), settings.truncate)


def _pair_factory(request, plan):
    """What the explorer calls (in its worker, with its progress) to open the pair of `request`
    (engine.run.open.open_pair: the dense model placed as `plan` says, the perturbed copy through the cache); the
    pair carries the plan's summary for the session header."""

    def make_pair(progress):
        from engine.run.open import open_pair

        return open_pair(request, plan=plan, progress=progress)

    return make_pair
