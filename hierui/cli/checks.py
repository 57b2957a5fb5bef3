"""The checks of what the user typed that several commands share: each fails with one line (exit 2) before
anything slow is loaded."""

import os
from pathlib import Path

from engine.errors import HieruiError


def check_dtype(dtype: str | None) -> None:
    """`--dtype`: auto or a dtype engine.models.loading knows (None: the command's own default, e.g. the
    recorded one)."""
    from engine.models.devices import check_dtype as check

    check(dtype)


def check_calib_file(calib: Path | None) -> None:
    """`--calib`: a file that is there."""
    if calib is not None and not calib.is_file():
        raise HieruiError(f"calibration file not found: {calib}")


def check_model_args(model: str, parsed, device: str) -> dict | None:
    """The device, a checkpoint's path and the spec against the model's config.json, before anything slow
    (engine.run.open.check_specs, the checks every pair request makes). Returns that config (None: not known
    before loading)."""
    from engine.run.open import check_specs

    return check_specs(model, [parsed], device)


def output_file(path: Path | None, option: str) -> None:
    """One clear line, before anything is loaded, when `path` cannot be a new file: a folder, or a file in a
    folder that does not exist or cannot be written."""
    if path is None:
        return
    folder = path.expanduser().parent
    if path.is_dir() or not folder.is_dir() or not os.access(folder, os.W_OK):
        raise HieruiError(f"{option} {path}: not a file in an existing, writable folder")


def writable_folder(folder: Path | None, option: str) -> Path:
    """`folder` (default: $HIERUI_HOME/sessions), created if needed; one clear line when it cannot be written."""
    from engine.record.paths import sessions_dir

    folder = (folder or sessions_dir()).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise HieruiError(f"{option} {folder}: cannot create the folder ({e.strerror or e})") from None
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise HieruiError(f"{option} {folder}: not a writable folder")
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
PATH_OPTIONS += ("--text", "--base", "--save-base")  # hierui kld


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
