"""The one rule for what hierui's own output files may name on their own when they are read back as input.

A session header, a kld_worst.json, a batch.json or a kld base file comes from anyone. A model, a
`checkpoint:PATH` spec or a calibration file such a file names is used as it stands only when it is a known
name (the embedded model, an alias of ALIASES, tiny-random[:FAMILY], a shipped `random:` shape) or an existing
file or folder under $HIERUI_HOME, where hierui writes its own; any other local path or hub id is used only when
the user names it again on the command line (`--model`, `--prune`, `--calib`), and is otherwise refused with
one line, exit 2, before anything is read, fetched or loaded. `trusted(named, given, kind, file)` applies it.

Readers: `replay --rerun` and `attribute` (engine.run.rerun.plan_rerun), `batch --from` (engine.sweep.sweeps),
`explore --from-kld` (engine.kld.corpus.worst_prompt). batch.json and a kld base file name their model only to
describe the run: nothing loads what they name (the user gives `--model` and `--base`). A recipe is the user's
own input, not an output: its paths are the user's.
"""

from __future__ import annotations

from pathlib import Path

from engine.errors import HieruiError
from engine.record.paths import hierui_home
from engine.record.validate import escape

# what a file may name, and the option by which the user confirms it
OPTIONS = {"model": "--model", "spec": "--prune", "calib": "--calib"}
NAMES = {"model": "the model", "spec": "the perturbation", "calib": "the calibration file"}


def trusted(named: str | None, given: str | None, kind: str, file, confirm_only: bool = False) -> str | None:
    """What a run uses for `kind` ("model", "spec" or "calib": a calibration text file) that `file` names as
    `named`: the user's own value `given` when there is one (it replaces the file's); else `named` when a file
    may name it on its own; None when neither names one. Anything else is one HieruiError naming the option to
    repeat. A bare name that is neither known nor a local folder is "unknown model" (engine.models.loading), said
    of the file. `confirm_only`: a reader that reproduces the file's run (replay --rerun, attribute, explore
    --from-kld), where the option only confirms what the file names: a `given` value naming something else
    (`same`) is refused."""
    if kind not in OPTIONS:
        raise ValueError(f"unknown kind {kind!r}")
    if given is not None:
        if confirm_only and named is not None and not same(named, given, kind):
            option = OPTIONS[kind]
            raise HieruiError(
                f"{option} {escape(str(given))}: {escape(str(file))} names {NAMES[kind]} '{escape(named)}', and "
                f"{option} only confirms it here: repeat it exactly or leave {option} out"
            )
        return given
    try:
        if named is None or allowed(named, kind):
            return named
    except HieruiError as e:  # an unknown bare model name: said of the file that names it
        raise HieruiError(f"{escape(str(file))} names {NAMES[kind]} '{escape(named)}': {e}", e.exit_code) from None
    what = {
        "model": f"the model '{escape(named)}', a local path or hub id: it is loaded",
        "spec": f"the perturbation '{escape(named)}', a local checkpoint: it is loaded",
        "calib": f"the calibration file '{escape(named)}': it is read",
    }[kind]
    raise HieruiError(f"{escape(str(file))} names {what} only when you confirm it with {OPTIONS[kind]} {escape(named)}")


def same(named: str, given: str, kind: str) -> bool:
    """Whether the user's `given` value names what a file names as `named`: the same text, or the same weights
    (a model's cache key: an alias and its hub id, a relative and an absolute path), spec (as parsed) or file."""
    if given.strip() == named.strip():
        return True
    try:
        if kind == "model":
            from engine.models.names import resolve

            return resolve(given).cache_key() == resolve(named).cache_key()
        if kind == "spec":
            return _spec_fields(given) == _spec_fields(named) is not None
        return Path(given).expanduser().resolve() == Path(named).expanduser().resolve()
    except (HieruiError, OSError, RuntimeError):
        return False


def _spec_fields(spec: str) -> tuple | None:
    """A spec as its method's grammar reads it (engine.record.methods; what engine.perturb.spec.parse_spec builds a
    Spec from): 'wanda:0.50' and 'wanda:0.5' are one spec. None for an unknown method."""
    from engine.record.methods import find

    name, colon, rest = spec.strip().partition(":")
    name = name.strip().lower()
    declared = find(name)
    return None if declared is None else (name, declared.grammar.parse(spec, name, rest if colon else None))


def allowed(named: str, kind: str) -> bool:
    """Whether a file may name `named` (a `kind` value) without the user repeating it."""
    if kind == "model":
        if known_model(named) or under_home(named):
            return True
        if not any(c in named for c in "/\\.~"):  # a bare name: an unknown one is said so, nothing is touched
            from engine.models.names import resolve

            resolve(named)
        return False
    if kind == "spec":
        path = checkpoint_path(named)
        return path is None or under_home(path)
    return under_home(named)


def known_model(name: str) -> bool:
    """Whether `name` is a model hierui knows by name: the embedded model, tiny-random (or a member of its zoo), a
    shipped random:SHAPE or an alias (engine.models.names.ALIASES). Never a path (random:PATH included) or a
    free hub id."""
    from engine.models.names import ALIASES, DEFAULT_MODEL
    from engine.models.tiny import TINY_RANDOM
    from engine.models.zoo import FAMILIES, family_of

    low = (name or "").strip().lower()
    known = (DEFAULT_MODEL, "default", "smollm2", "embedded", TINY_RANDOM)
    return low in known or low in ALIASES or family_of(low) in FAMILIES or _shipped_random_shape(low)


def _shipped_random_shape(name: str) -> bool:
    """random:ALIAS[@SEED] of a shape hierui ships (never random:PATH, a file the header would point at)."""
    from engine.models.random_shapes import is_random, parse_random

    if not is_random(name):
        return False
    try:
        return parse_random(name).alias
    except HieruiError:
        return False


def checkpoint_path(spec: str) -> str | None:
    """The path of a `checkpoint:PATH` spec, of any method that takes a path (Method.takes_path, engine.record.methods),
    as engine.perturb.spec.parse_spec reads it; None for any other spec."""
    from engine.record.methods import find

    method, _, rest = spec.strip().partition(":")
    found = find(method.strip().lower())
    return rest.strip() if found is not None and found.takes_path else None


def under_home(path: str) -> bool:
    """Whether `path` is an absolute path to something that exists under $HIERUI_HOME, links followed (a relative
    path would depend on where the command runs, and a link may point anywhere)."""
    candidate = Path(path).expanduser()
    if not candidate.is_absolute():
        return False
    try:
        real = candidate.resolve(strict=True)
        home = hierui_home().expanduser().resolve()
    except (OSError, RuntimeError):
        return False
    return real.is_relative_to(home)
