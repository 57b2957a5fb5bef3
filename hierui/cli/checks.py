"""The checks of what the user typed that several commands share: each fails with one line (exit 2) before
anything slow is loaded."""

from pathlib import Path

from engine.errors import HieruiError


def check_dtype(dtype: str | None) -> None:
    """`--dtype`: auto or a dtype engine.models.loading knows (None: the command's own default, e.g. the
    recorded one)."""
    from engine.models.devices import check_dtype as check

    check(dtype)


def lens_choice(lens: str | None, no_lens: bool, default: str | None) -> str | None:
    """The lens mode of `--lens WORD` and its alias `--no-lens` (engine.record.settings.LENS_MODES); `default` where
    neither is given (None: left to what the run records). An unknown word, or --no-lens with another --lens, is one
    line (exit 2), before anything loads."""
    from engine.record.settings import LENS_MODES, lens_mode

    if lens is None:
        return "off" if no_lens else default
    try:
        mode = lens_mode(lens)
    except HieruiError:
        raise HieruiError(f"unknown --lens '{lens}': use {', '.join(LENS_MODES)}") from None
    if no_lens and mode != "off":
        raise HieruiError(f"--no-lens is --lens off: it contradicts --lens {mode}")
    return mode


def check_calib_file(calib: Path | None, model: str | None = None, length: int | None = None) -> str | None:
    """`--calib`: a text file a user can name and, where `model`'s tokenizer is on this machine, at least one
    calibration sequence (`length` tokens, default --calib-len's) long (engine.perturb.calibration.
    check_calibration_file); its absolute path (None without --calib)."""
    if calib is None:
        return None
    from engine.perturb.calibration import check_calibration_file
    from engine.record.settings import CALIB_LENGTH

    return check_calibration_file(calib, length or CALIB_LENGTH, model)


def check_model_args(model: str, parsed, device: str, source: dict[str, str] | None = None) -> dict | None:
    """The device, a checkpoint's path and the spec against the model's config.json, before anything slow
    (engine.run.open.check_specs, the checks every pair request makes). Returns that config (None: not known
    before loading). `source`: where the model or spec came from when not typed (check_specs)."""
    from engine.run.open import check_specs

    return check_specs(model, [parsed], device, source)


def output_file(path: Path | None, option: str) -> None:
    """One clear line, before anything is loaded, when `path` cannot be written: a folder or something else
    that is not a file at its name (a FIFO, a device), a folder that does not exist, or one where no file can be
    created, found by creating one (engine.record.paths.check_output_file: it holds for root too)."""
    if path is not None:
        from engine.record.paths import check_output_file

        check_output_file(path, f"{option} {path}")


def writable_folder(folder: Path | None, option: str) -> Path:
    """`folder` (default: $HIERUI_HOME/sessions) when a file can be created there, found by creating one
    (engine.record.paths.check_writable: it holds for root too, and leaves no folder it had to make: the
    writers make it when they write); one clear line when not."""
    from engine.record.paths import check_writable, sessions_dir

    folder = (folder or sessions_dir()).expanduser()
    check_writable(folder, f"{option} {folder}")
    return folder


def ray_options(recipe: str | None, address: str | None, cpus: int | None, gpus: int | None, collect: str | None):
    """batch's and kld's --ray as engine.sweep.ray_options.RayOptions (the command line over the recipe's), or
    None without --ray; checks that Ray is installed."""
    from engine.sweep.cluster import check_address, import_ray
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


PATH_OPTIONS = ("--out", "-o", "--save", "--sessions", "--calib", "--prompts", "--from")
PATH_OPTIONS += ("--text", "--base", "--save-base", "--json", "--recipe", "--from-kld")  # kld, check, batch, explore


def reject_empty_paths(args: list[str]) -> None:
    """An empty path option (`--out ""`) is an error, not the current folder (click turns "" into ".")."""
    for i, arg in enumerate(args):
        if arg == "--":
            return
        name, eq, value = arg.partition("=")
        if name in PATH_OPTIONS and (
            (eq and not value.strip()) or (not eq and i + 1 < len(args) and not args[i + 1].strip())
        ):
            raise HieruiError(f"{name} is empty: give a path")


# ------------------------------------------------------------------ options that do nothing in the mode chosen


def given_options(ctx, *names: str) -> dict[str, bool]:
    """{an option as the user would type it: whether they gave it} for the command's parameters `names` (their
    Python names), from click's record of where each value came from: one left at its default was not given
    (typing the default value is giving it)."""
    params = {p.name: p for p in ctx.command.params}
    out = {}
    for name in names:
        source = ctx.get_parameter_source(name)
        value = ctx.params.get(name)
        param = params[name]
        flag = max(param.opts, key=len)
        if getattr(param, "is_flag", False) and param.secondary_opts and value is False:
            flag = max(param.secondary_opts, key=len)  # --greedy, --no-lens: the side the user typed
        # typer vendors click: its ParameterSource is typer's own (a private module), so compared by name
        out[flag] = source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")
    return out


def refuse_unused(given: dict[str, bool], mode: str, why: str = "", only: bool = False) -> None:
    """The one rule for an option that has no effect in the mode chosen: one line, exit 2, before anything slow,
    naming every such option the user gave (`given`: given_options). `only`: the options work in `mode` alone
    ("--save, --tol only apply with --rerun"); else they do nothing in `mode` ("--prompt does nothing with
    --from-kld: …"). `why`: what the mode does instead."""
    names = [option for option, typed in given.items() if typed]
    if not names:
        return
    one = len(names) == 1
    if only:
        what = f"only {'applies' if one else 'apply'} with {mode}"
    else:
        what = f"{'does' if one else 'do'} nothing with {mode}"
    raise HieruiError(f"{', '.join(names)} {what}" + (f": {why}" if why else ""))


def calibration_unused(specs, given: dict) -> None:
    """The calibration options do nothing when no spec of the run calibrates (magnitude, int8, none, a
    checkpoint): refused (refuse_unused). `given`: each option (--calib, --calib-samples, ...) → whether it was
    given (given_options) or its value (None: not given). `specs`: the parsed specs (engine.perturb.spec.Spec)."""
    specs = list(specs)
    if not specs or any(spec.needs_calibration for spec in specs):
        return
    they = "it calibrates" if len(specs) == 1 else "they calibrate"
    typed = {option: value is not None and value is not False for option, value in given.items()}
    refuse_unused(typed, f"--prune {', '.join(map(str, specs))}", f"{they} nothing")
