"""A sweep planned: prompts × perturbation specs × modes as Runs, every input checked before anything loads
(plan_sweep), including a session's prompt and settings rerun under other specs (`batch --from`)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from engine.errors import HieruiError
from engine.models.names import DEFAULT_MODEL
from engine.perturb.spec import Spec, expand_specs, parse_spec
from engine.record.header import SessionHeader
from engine.record.methods import DEFAULT_SPEC
from engine.record.prompts import PromptItem, read_prompts
from engine.record.session import load_session
from engine.record.settings import (
    SWEEP_DEFAULTS,
    SWEEP_FIELDS,
    CalibSettings,
    StepSettings,
    calibration_for,
    calibrations,
)

ATTRIBUTE_CHOICES = ("none", "flips")  # batch --attribute


@dataclass(frozen=True)
class Run:
    run_id: str
    prompt: PromptItem
    spec: Spec
    mode: str


@dataclass
class Sweep:
    """What a sweep runs: model × prompts × specs × modes, with the step and calibration settings. `calib`: the
    calibration values given (by the options, a recipe or the session of --from; a file's path absolute); the
    others are each spec's method's defaults (calib_for: the same model as in every other command)."""

    model: str
    prompts: list[PromptItem]
    specs: list[Spec]
    modes: list[str]
    settings: StepSettings = field(default_factory=lambda: StepSettings(**SWEEP_DEFAULTS))  # SWEEP_FIELDS used
    calib: dict = field(default_factory=dict)
    device: str = "auto"
    dtype: str = "auto"
    source: str | None = None  # the prompts file or session it came from (for the manifest only)
    # files written into OUT beside batch.json when the sweep really starts (a recipe's prompts.jsonl and
    # recipe.toml), by name: a failed start leaves nothing behind
    files: dict[str, str] = field(default_factory=dict)
    # "flips": attribute every flip step of each run once it is recorded (engine.run.attribution); "none"
    attribute: str = "none"
    # batch --from: the session's header. Its prompt is swept as text, tokenized by the sweep's model as every
    # prompt is; engine.sweep.runner.tokenizer_notes says when that differs from the ids the session recorded
    from_header: SessionHeader | None = None
    # where a setting came from when the user did not type it (a recipe's key), as errors about it name it
    labels: dict[str, str] = field(default_factory=dict)

    def runs(self) -> list[Run]:
        """Every generation run, in loop order: spec, then prompt, then mode (multiple-choice items excluded)."""
        return [
            Run(f"{p.id}-{s.slug}-{m}", p, s, m)
            for s in self.specs
            for p in self.prompts
            if not p.is_choice
            for m in self.modes
        ]

    @property
    def choice_items(self) -> list[PromptItem]:
        """The multiple-choice items: scored once per spec, without generation."""
        return [p for p in self.prompts if p.is_choice]

    def calib_for(self, spec: Spec) -> CalibSettings:
        """The calibration `spec` is perturbed with (engine.record.settings.calibration_for)."""
        return calibration_for(spec.method, **self.calib)

    def calibrations(self) -> dict[str, dict]:
        """Per spec that calibrates, its calibration settings (batch.json's `calibration`; kld records the same)."""
        return calibrations(self.specs, **self.calib)

    def step_settings(self, mode: str) -> StepSettings:
        """The settings the runs of `mode` are stepped with (each prompt's choices go to the stepper per row).
        `counterfactual` applies to the free runs only (shared mode has no divergence to branch from)."""
        return replace(self.settings, mode=mode, counterfactual=self.settings.counterfactual and mode == "free")

    def settings_dict(self) -> dict:
        """The SWEEP_FIELDS of the settings, as batch.json records them."""
        values = self.settings.to_dict()
        # truncate and counterfactual only when set, tie_margin only when given: a manifest written before they
        # existed still matches on resume; the lens always, as its word (an older manifest's: recorded_lens)
        optional = {
            "truncate": bool(values["truncate"]),
            "counterfactual": bool(values["counterfactual"]),
            "tie_margin": values["tie_margin"] is not None,
        }
        return {k: values[k] for k in SWEEP_FIELDS if optional.get(k, True)}

    def manifest(self) -> dict:
        return {
            "format": "hierui-batch",
            "version": 1,
            "model": self.model,
            "prompts": [
                {"id": p.id, "prompt": p.prompt, "choices": p.choices, **({"answer": p.answer} if p.is_choice else {})}
                for p in self.prompts
            ],
            "specs": [str(s) for s in self.specs],
            "modes": list(self.modes),
            "settings": self.settings_dict(),
            "calibration": self.calibrations(),
            "device": self.device,
            "dtype": self.dtype,
            "source": self.source,
            # only when on: a manifest written before the option existed still matches on resume
            **({"attribute": self.attribute} if self.attribute != "none" else {}),
        }


@dataclass
class SweepResult:
    out: Path
    runs: list[Run]
    skipped: list[str] = field(default_factory=list)  # run ids already complete
    computed: list[str] = field(default_factory=list)  # run ids recorded by this call
    summary: list[dict] = field(default_factory=list)  # summary.parquet's rows
    choice_summary: list[dict] = field(default_factory=list)  # mc_summary.parquet's rows (one per spec)


class SweepHooks:
    """Progress callbacks of run_sweep; the CLI draws bars with them. Every method is optional."""

    def sweep_started(self, total: int, done: int) -> None: ...
    def message(self, text: str) -> None: ...
    def stage(self, stage: str, done: int, total: int) -> None: ...
    def run_started(self, run: Run, max_tokens: int) -> None: ...
    def batch_started(self, runs: list[Run], max_tokens: int) -> None:
        """Several runs stepped together (max_tokens over all of them); by default the first run's start."""
        self.run_started(runs[0], max_tokens)

    def step(self, run: Run, record: dict) -> None: ...
    def run_finished(self, run: Run) -> None: ...


def plan_sweep(
    *,
    prompts_file: str | Path | None = None,
    from_session: str | Path | None = None,
    model: str | None = None,
    specs: list[str] | None = None,
    modes: list[str] | None = None,
    calib: dict | None = None,
    device: str = "auto",
    dtype: str = "auto",
    prompts_text: str | None = None,
    files: dict[str, str] | None = None,
    attribute: str = "none",
    labels: dict[str, str] | None = None,
    **settings,
) -> Sweep:
    """Check the whole sweep before anything is loaded. `settings` (SWEEP_FIELDS) and `calib` values left
    None take the session's (with `from_session`) or the defaults (engine.record.settings). `prompts_text`: the
    content of `prompts_file` when it is not written yet; `files`: see Sweep.files."""
    from engine.models.names import resolve

    if (prompts_file is None) == (from_session is None):
        raise HieruiError("give the prompts with exactly one of --prompts FILE or --from SESSION")
    unknown = set(settings) - set(SWEEP_FIELDS)
    if unknown:
        raise TypeError(f"unknown settings {sorted(unknown)}")
    given = {k: v for k, v in settings.items() if v is not None}
    calib_given = {k: v for k, v in (calib or {}).items() if v is not None}
    if from_session is not None:
        header, prompts, model, modes, base, base_calib = _rerun_inputs(from_session, model, specs, modes, calib_given)
        source = str(from_session)
    else:
        prompts, source = _read_sweep_prompts(prompts_file, prompts_text)
        header, base, base_calib = None, dict(SWEEP_DEFAULTS), {}
    base.update(given)

    model = model or DEFAULT_MODEL
    resolve(model)  # an unknown model fails here, before anything slow
    check_placement(device, dtype)
    parsed = _unique([parse_spec(s) for s in expand_specs(specs or [DEFAULT_SPEC])])
    config = _check_specs(parsed, model, device)
    calibration = _calibration({**base_calib, **calib_given}, model, parsed)
    modes = _unique([m.strip().lower() for m in (modes or ["shared"])])
    if base.get("counterfactual") and "free" not in modes:
        raise HieruiError("--counterfactual branches free-mode runs at their first divergence: add --mode free")
    attribute = (attribute or "none").strip().lower()
    if attribute not in ATTRIBUTE_CHOICES:
        raise HieruiError(f"unknown --attribute '{attribute}': use {' or '.join(ATTRIBUTE_CHOICES)}")
    sweep = Sweep(
        model, prompts, parsed, modes, StepSettings(**base), calibration, device, dtype, source, dict(files or {})
    )
    sweep.attribute = attribute
    sweep.from_header = header
    sweep.labels = dict(labels or {})
    _check_runs(sweep, config)
    return sweep


def _rerun_inputs(
    from_session, model: str | None, specs: list[str] | None, modes: list[str] | None, calib_given: dict
) -> tuple[SessionHeader, list[PromptItem], str | None, list[str], dict, dict]:
    """`batch --from`: the session's header, and its prompt, model, mode, settings and calibration as the sweep's
    (prompts, model, modes, settings, calibration) before the user's options override them."""
    if not specs:
        raise HieruiError("--from SESSION reruns a session under other perturbations: give at least one --prune")
    base, base_calib = dict(SWEEP_DEFAULTS), {}
    header, model, base_calib["source"] = _from_header(from_session, model, calib_given)
    prompts = [PromptItem("p000", header.prompt, list(header.choices) if header.choices else None)]
    # the recorded settings (not truncate: the header keeps what it did, truncated_from)
    recorded = {k: getattr(header, k, None) for k in SWEEP_FIELDS}
    base.update({k: v for k, v in recorded.items() if v is not None})
    if header.calibration is not None:
        sizes = {k: getattr(header.calibration, k) for k in ("samples", "length", "seed")}
        base_calib.update({k: v for k, v in sizes.items() if v is not None})
    return header, prompts, model, modes or [header.mode], base, base_calib


def _read_sweep_prompts(prompts_file, prompts_text: str | None) -> tuple[list[PromptItem], str]:
    """`batch --prompts`: the prompts of a file (or of its text not written yet, or of a shipped suite:NAME), and
    the file named in the manifest."""
    if prompts_text is None and str(prompts_file).startswith("suite:"):  # a shipped suite: --prompts suite:open
        from engine.sweep.recipe import suite_file

        prompts_file = suite_file(str(prompts_file))
    return read_prompts(prompts_file, text=prompts_text), str(prompts_file)


def _calibration(values: dict, model: str, specs: list[Spec]) -> dict:
    """The calibration values given, checked for every spec before anything loads (engine.record.settings), a
    calibration file as every text file a user names and against one sequence of the model's tokens where its
    tokenizer is local (engine.perturb.calibration.check_calibration_file), its path made absolute."""
    from engine.perturb.calibration import check_calibration_file

    values = {k: v for k, v in values.items() if v is not None}
    settings = [calibration_for(s.method, **values) for s in specs if s.needs_calibration]
    settings = settings or [calibration_for(None, **values)]  # bad values fail even where no spec calibrates
    if values.get("source") is not None:
        length = max(c.length for c in settings)
        values["source"] = check_calibration_file(values["source"], length, model)
    return values


def _check_specs(specs: list[Spec], model: str, device: str) -> dict | None:
    """The device, each checkpoint path and each spec against the model's config where it is known without a
    download; the config (None: not known before loading, a hub model not in the cache)."""
    from engine.models.configs import read_config
    from engine.models.devices import check_device
    from engine.perturb.spec import check_fits

    check_device(device)
    config = read_config(model)
    for spec in specs:
        if spec.declared.takes_path and not Path(spec.path).expanduser().exists():
            raise HieruiError(f"checkpoint not found: {spec.path}")
        check_fits(spec, config)
    return config


def _check_runs(sweep: Sweep, config: dict | None) -> None:
    """Each mode's settings within their bounds, every prompt within the context, and one name per run."""
    for mode in sweep.modes:
        sweep.step_settings(mode).validate()  # the mode and every bound (engine.record.settings)
    _check_context(sweep, config)
    ids = [r.run_id for r in sweep.runs()]
    if len(set(ids)) != len(ids):
        raise HieruiError("two specs give the same run name (e.g. checkpoints in folders of the same name)")


def check_placement(device: str, dtype: str) -> None:
    """An unknown or absent device and an unknown dtype fail before anything is loaded or written."""
    from engine.models.devices import check_dtype, pick_device

    check_dtype(dtype)
    pick_device(device)


def _from_header(from_session, model: str | None, calib_given: dict) -> tuple[SessionHeader, str | None, str | None]:
    """The header of `batch --from`'s session (checked by load_session: every field's type and range), with the
    model and the calibration file the sweep takes from it: the user's --model and --calib, else the header's
    where engine.models.trust lets a file name them on its own (a path or hub id needs --model, a calibration
    file --calib: one line each). Where the sweep's model is the session's, every token id the session holds is
    checked against its embedding before anything loads (engine.run.rerun.check_ids_before_loading, as replay
    --rerun does): a file with an impossible id is refused in one line; with another --model its ids are of
    another vocabulary, and the sweep uses none of them (the prompt is swept as text)."""
    from engine.models.trust import same, trusted
    from engine.record.validate import escape
    from engine.run.rerun import check_ids_before_loading

    session = load_session(from_session)
    header = session.header
    where = escape(str(from_session))
    header.require(from_session, ("prompt",), "nothing to rerun")
    if not header.prompt.strip():
        raise HieruiError(f"{where}: the header's prompt is empty; nothing to rerun")
    if header.is_branch:
        raise HieruiError(
            f"{where} is a branch of another run (it continues it from a step): --from reruns a prompt from its "
            "start; use the parent session, or replay --rerun this one"
        )
    model = trusted(header.model, model, "model", from_session)
    source = trusted(header.calibration_file, calib_given.get("source"), "calib", from_session)
    swept = model or DEFAULT_MODEL
    if header.model is not None and same(header.model, swept, "model"):
        check_ids_before_loading(session, swept)
    return header, model, source


def _check_context(sweep: Sweep, config: dict | None) -> None:
    """Every prompt and --max-new-tokens within the model's context, before loading: only where the config and
    the tokenizer are known without a download (else the stepper checks it, before its first step)."""
    from engine.models.configs import config_int
    from engine.models.loading import load_tokenizer
    from engine.models.names import resolve
    from engine.models.tokens import prompt_ids
    from engine.record.settings import fit_context

    context = config_int(config, "max_position_embeddings")
    s = sweep.settings
    option = sweep.labels.get("max_new_tokens", "--max-new-tokens")
    fit_context(1, s.max_new_tokens, context, truncate=True, option=option)  # --max-new-tokens alone must fit
    if context is None or s.truncate or not any(not p.is_choice for p in sweep.prompts):
        return
    if resolve(sweep.model).kind == "hub":
        return
    tokenizer = load_tokenizer(sweep.model)
    for item in sweep.prompts:
        if not item.is_choice:
            try:
                fit_context(
                    len(prompt_ids(tokenizer, item.prompt, raw=s.raw)), s.max_new_tokens, context, option=option
                )
            except HieruiError as e:
                raise HieruiError(f"prompt {item.id}: {e}") from None


def _unique(items: list) -> list:
    return list(dict.fromkeys(items))
