"""Recipes: a sweep described in a small TOML file, run with `hierui batch --recipe NAME_OR_PATH`.

    name = "hierarchy"
    description = "one line on what the sweep shows"
    model = "smollm2-135m"                      # optional (default: batch's default model)
    prompts = ["suite:open", "suite:mc", "my_prompts.jsonl"]
    specs = ["wanda:0.3", "wanda:0.5", "int8"]
    modes = ["shared", "free"]
    max_new_tokens = 32                         # optional, like temperature, sample, seed, raw, topk
    batch_size = 8                              # optional
    ray = "auto"                                # optional: run on Ray (engine.sweep.distributed), like batch --ray;
    ray_cpus = 1                                #   also ray_gpus, ray_collect (the command line overrides them)
    [calibration]                               # optional: samples, length, seed, source
    samples = 64
    length = 128

A prompt source is a file (text, one prompt per line, or JSONL as `hierui batch --prompts` reads it;
relative paths are relative to the recipe file) or `suite:NAME`, a suite shipped in engine/data/suites
(`suite:open`: open-ended prompts, `suite:mc`: multiple-choice items with `choices` and `answer`).
`recipe_prompts` concatenates the sources into one JSONL file (OUT/prompts.jsonl): every item keeps its
fields (choices, answer, topic, …) and its id is prefixed by the source's name (`open.p003`, `mc.q12`), so
ids stay unique across sources. A shipped recipe is engine/data/recipes/NAME.toml.

Every problem with a recipe is a HieruiError of one line naming the file and the problem, raised before
anything slow starts.
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from engine.errors import HieruiError
from engine.record.paths import check_regular_file
from engine.record.settings import (
    CALIB_DEFAULTS,
    LENS_MODES,
    MODES,
    SWEEP_DEFAULTS,
    SWEEP_FIELDS,
    StepSettings,
    lens_mode,
)

DATA = Path(__file__).parent.parent / "data"
RECIPES = DATA / "recipes"
SUITES = DATA / "suites"
# the keys a recipe may set, with the TOML type of each: the step settings a sweep takes and the
# calibration's (engine.record.settings), typed like their defaults (the calibration source: a path)
SETTINGS = {k: float if k == "tie_margin" else type(SWEEP_DEFAULTS[k]) for k in SWEEP_FIELDS}
CALIBRATION = {k: str if k == "source" else type(v) for k, v in CALIB_DEFAULTS.items()}
KEYS = {
    "name": str,
    "description": str,
    "model": str,
    "prompts": list,
    "specs": list,
    "modes": list,
    "batch_size": int,
    "calibration": dict,
    **SETTINGS,
    # batch --ray and its options (engine.sweep.ray_options.RayOptions), as ray, ray_cpus, ray_gpus, ray_collect
    "ray": str,
    "ray_cpus": int,
    "ray_gpus": int,
    "ray_collect": str,
}
RAY_KEYS = {"ray": "address", "ray_cpus": "cpus", "ray_gpus": "gpus", "ray_collect": "collect"}
REQUIRED = ("prompts", "specs")


@dataclass
class Recipe:
    name: str
    path: Path
    description: str = ""
    model: str | None = None
    prompts: list[str] = field(default_factory=list)  # sources as written in the recipe
    specs: list[str] = field(default_factory=list)
    modes: list[str] = field(default_factory=lambda: ["shared"])
    settings: dict = field(default_factory=dict)  # SETTINGS given in the recipe
    batch_size: int | None = None
    calibration: dict = field(default_factory=dict)  # CALIBRATION given in the recipe (source resolved)
    sources: list[tuple[str, Path]] = field(default_factory=list)  # (id prefix, file) per prompt source
    ray: dict = field(default_factory=dict)  # the RAY_KEYS given, by RayOptions' names (address, cpus, ...)


def shipped_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES.glob("*.toml"))


def shipped_suites() -> list[str]:
    return sorted(p.stem for p in SUITES.glob("*.jsonl"))


def recipe_path(name_or_path: str | Path) -> Path:
    """A shipped recipe's file for a bare name (`hierarchy`), else the path itself."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        return check_regular_file(path, "--recipe")  # a FIFO: one line, not a read that blocks
    if re.fullmatch(r"[A-Za-z0-9_.-]+", text) and not text.endswith(".toml"):
        shipped = RECIPES / f"{text}.toml"
        if shipped.is_file():
            return shipped
        raise HieruiError(
            f"recipe '{text}' not found: not a file, and not a shipped recipe "
            f"(shipped: {', '.join(shipped_recipes()) or 'none'})"
        )
    raise HieruiError(f"recipe file not found: {path}")


def _type_name(kind) -> str:
    return {
        int: "an integer",
        float: "a number",
        bool: "true or false",
        str: "a string",
        list: "a list",
        dict: "a table",
    }[kind]


def _check_type(where: str, key: str, value, kind) -> None:
    ok = isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if not ok:
        raise HieruiError(f"{where}: '{key}' must be {_type_name(kind)}, got {type(value).__name__} {value!r}")


def _string_list(where: str, key: str, value: list) -> list[str]:
    if not value:
        raise HieruiError(f"{where}: '{key}' is empty; give at least one")
    bad = [v for v in value if not isinstance(v, str) or not v.strip()]
    if bad:
        raise HieruiError(f"{where}: '{key}' must be a list of non-empty strings, got {bad[0]!r}")
    return [v.strip() for v in value]


def load_recipe(name_or_path: str | Path) -> Recipe:
    """Read and check a recipe: keys, types, specs, modes, prompt sources (files must exist)."""
    from engine.perturb.spec import parse_spec

    path = recipe_path(name_or_path)
    where = f"recipe {path}"
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise HieruiError(f"{where} is not valid TOML: {e}") from None
    except UnicodeDecodeError:
        raise HieruiError(f"{where} is not UTF-8 text") from None
    except OSError as e:
        raise HieruiError(f"{where} cannot be read: {e.strerror or e}") from None
    unknown = [k for k in data if k not in KEYS]
    if unknown:
        raise HieruiError(f"{where}: unknown key '{unknown[0]}' (known: {', '.join(KEYS)})")
    for key in REQUIRED:
        if key not in data:
            raise HieruiError(f"{where}: '{key}' is missing")
    if isinstance(data.get("lens"), bool):  # a recipe from before the lens modes: true "all", false "off"
        data["lens"] = lens_mode(data["lens"])
    for key, value in data.items():
        _check_type(where, key, value, KEYS[key])
    if "lens" in data and data["lens"] not in LENS_MODES:
        raise HieruiError(f"{where}: unknown lens '{data['lens']}' (use {', '.join(LENS_MODES)})")

    recipe = Recipe(
        name=data.get("name") or path.stem,
        path=path,
        description=data.get("description", ""),
        model=data.get("model") or None,
    )
    recipe.specs = _string_list(where, "specs", data["specs"])
    for spec in recipe.specs:
        try:
            parse_spec(spec)
        except HieruiError as e:
            raise HieruiError(f"{where}: spec '{spec}': {e}") from None
    recipe.modes = [m.lower() for m in _string_list(where, "modes", data.get("modes", ["shared"]))]
    for mode in recipe.modes:
        if mode not in MODES:
            raise HieruiError(f"{where}: unknown mode '{mode}' (use shared or free)")
    recipe.settings = {k: (float(v) if SETTINGS[k] is float else v) for k, v in data.items() if k in SETTINGS}
    for key in ("max_new_tokens", "topk"):
        if key in recipe.settings and recipe.settings[key] < 1:
            raise HieruiError(f"{where}: '{key}' must be at least 1, got {recipe.settings[key]}")
    try:  # every value a step setting must hold (a finite temperature in range, ...), named as the recipe's
        StepSettings(**{**SWEEP_DEFAULTS, **recipe.settings}).validate()
    except HieruiError as e:
        raise HieruiError(f"{where}: {e}") from None
    if "batch_size" in data:
        if data["batch_size"] < 1:
            raise HieruiError(f"{where}: 'batch_size' must be at least 1, got {data['batch_size']}")
        recipe.batch_size = data["batch_size"]
    recipe.calibration = _calibration(where, path, data.get("calibration", {}))
    recipe.ray = {RAY_KEYS[k]: v for k, v in data.items() if k in RAY_KEYS}
    if recipe.ray:
        from engine.sweep.ray_options import RayOptions

        try:
            RayOptions(**{"address": "auto", **recipe.ray}).validate()
        except HieruiError as e:
            raise HieruiError(f"{where}: {e}") from None
    recipe.prompts = _string_list(where, "prompts", data["prompts"])
    recipe.sources = _sources(where, path, recipe.prompts)
    return recipe


def _calibration(where: str, path: Path, table: dict) -> dict:
    out = {}
    for key, value in table.items():
        if key not in CALIBRATION:
            raise HieruiError(f"{where}: unknown key 'calibration.{key}' (known: {', '.join(CALIBRATION)})")
        _check_type(where, f"calibration.{key}", value, CALIBRATION[key])
        out[key] = value
    if "samples" in out and out["samples"] < 1:
        raise HieruiError(f"{where}: 'calibration.samples' must be at least 1, got {out['samples']}")
    if "length" in out and out["length"] < 2:
        raise HieruiError(f"{where}: 'calibration.length' must be at least 2, got {out['length']}")
    if "source" in out:
        from engine.record.texts import read_text_file

        source = (path.parent / Path(out["source"]).expanduser()).resolve()
        read_text_file(source, f"{where}: calibration.source")  # the one check of a text file a user names
        out["source"] = str(source)
    return out


def suite_file(text: str, where: str = "--prompts") -> Path:
    """The file of a shipped suite named `suite:NAME`, or one HieruiError naming the shipped ones."""
    name = text.removeprefix("suite:").strip()
    file = SUITES / f"{name}.jsonl"
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name) or not file.is_file():
        shipped = ", ".join("suite:" + s for s in shipped_suites()) or "none"
        raise HieruiError(f"{where}: unknown suite '{text}' (shipped: {shipped})")
    return file


def _sources(where: str, path: Path, prompts: list[str]) -> list[tuple[str, Path]]:
    sources: list[tuple[str, Path]] = []
    used: set[str] = set()
    for text in prompts:
        if text.startswith("suite:"):
            name = text.removeprefix("suite:").strip()
            file = suite_file(text, where)
        else:
            from engine.record.paths import check_regular_file

            file = check_regular_file((path.parent / Path(text).expanduser()).resolve(), f"{where}: prompts file")
            name = file.stem
        prefix = re.sub(r"[^A-Za-z0-9_]+", "_", name).strip("_") or "prompts"
        unique, n = prefix, 2
        while unique in used:
            unique, n = f"{prefix}{n}", n + 1
        used.add(unique)
        sources.append((unique, file))
    return sources


def read_items(recipe: Recipe) -> list[dict]:
    """Every prompt item of the recipe's sources, in order, with all its fields and a prefixed id."""
    from engine.record.prompts import read_prompts

    items = []
    for prefix, file in recipe.sources:
        checked = read_prompts(file, what="recipe prompts")  # the batch's own checks, with the source's line numbers
        jsonl = file.suffix.lower() in (".jsonl", ".ndjson")
        lines = [line for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
        raws = [json.loads(line) for line in lines] if jsonl else [{"prompt": line} for line in lines]
        for item, raw in zip(checked, raws, strict=True):
            items.append({**raw, "id": f"{prefix}.{item.id}"})
    return items


def recipe_prompts(recipe: Recipe, out: str | Path) -> str:
    """The recipe's prompt sources concatenated into one JSONL text, the content of OUT/prompts.jsonl. An OUT
    that already holds a sweep with other prompts is refused, so its prompts.jsonl keeps describing its
    sessions. Nothing is written: the sweep writes the file when it really starts
    (engine.sweep.folder.write_manifest)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise HieruiError(f"--out {out} is a file, not a folder")
    text = "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in read_items(recipe))
    target = out / "prompts.jsonl"
    if target.is_file() and target.read_text(encoding="utf-8") != text:
        raise HieruiError(
            f"{out} holds a sweep with other prompts (its prompts.jsonl differs from the "
            f"recipe's): rerun the same recipe to resume it, or use another --out"
        )
    return text


def apply_recipe(
    name_or_path: str | Path, out: str | Path, args: dict, batch_size: int | None = None
) -> tuple[dict, int | None]:
    """plan_sweep's keyword arguments from a recipe, with `args` (the command line's; None = not given)
    overriding it. Writes nothing: the files the sweep keeps in OUT (the recipe's prompts as prompts.jsonl,
    unless args give prompts_file, and a copy of the recipe as recipe.toml, which the report shows) are
    handed to plan_sweep as `files` and written when the sweep really starts. Returns (args, batch_size)."""
    recipe = load_recipe(name_or_path)
    if args.get("from_session") is not None:
        raise HieruiError("--recipe gives the prompts: use it without --from")
    merged = dict(args)
    merged["model"] = args.get("model") or recipe.model
    merged["specs"] = args.get("specs") or recipe.specs
    merged["modes"] = args.get("modes") or recipe.modes
    labels = {}
    for key, value in recipe.settings.items():
        if merged.get(key) is None:
            merged[key] = value
            labels[key] = f"recipe {recipe.path.name}'s {key}"
    merged["labels"] = labels
    calib = dict(args.get("calib") or {})
    for key, value in recipe.calibration.items():
        if calib.get(key) is None:
            calib[key] = value
    merged["calib"] = calib
    files = {}
    if args.get("prompts_file") is None:
        files["prompts.jsonl"] = recipe_prompts(recipe, out)
        merged["prompts_file"] = Path(out) / "prompts.jsonl"
        merged["prompts_text"] = files["prompts.jsonl"]
    files["recipe.toml"] = recipe.path.read_text(encoding="utf-8")
    merged["files"] = files
    return merged, batch_size if batch_size is not None else recipe.batch_size
