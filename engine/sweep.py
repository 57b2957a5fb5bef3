"""Sweeps: prompts × perturbation specs × modes, planned, recorded headless into an output folder, and resumed.

    plan     plan_sweep() reads the prompts (a prompts file, engine.prompts; or the prompt and settings of a
             saved session) and checks every spec, mode and setting, before any model is loaded.
    run      run_sweep() loads the model once, builds one calibration shared by all specs, perturbs each
             spec once and records each run (spec → prompt → mode) as OUT/sessions/<run_id>.jsonl, with
             run_id = <prompt id>-<spec slug>-<mode>, e.g. p003-wanda-0.5-shared; runs of one mode are
             stepped together, `batch_size` at a time. Multiple-choice items are scored once per spec
             (OUT/mc/<spec slug>.jsonl). With attribute="flips" (batch --attribute flips) each recorded run's
             flip steps are attributed (engine.attribution) into OUT/attribution/<run_id>.jsonl, written whole;
             a complete run without that file gets it on resume. Then it writes the tables (engine.tables).
    resume   a run whose session file has its closing summary is complete and is skipped; an incomplete
             one is rerun from scratch. OUT/batch.json records the sweep; rerunning into the same OUT
             with other settings is refused (use another --out).
    lock     one writer per OUT: run_sweep holds OUT/.hierui.lock (engine.lock) while it runs; a second
             sweep into the same OUT is refused, naming the first. batch.json is written only once the
             sweep really starts (model and tokenizer loaded, choices checked), so a failed start leaves
             nothing that refuses the corrected command.

The step settings come from engine.settings: the sweep's `settings` (a frozen StepSettings, of which
batch.json records the SWEEP_FIELDS), with each run's mode put in by `dataclasses.replace`; each prompt's
choices go to the stepper per row.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from engine.errors import HieruiError
from engine.paths import atomic_write
from engine.perturb.spec import Spec, parse_spec
from engine.prompts import PromptItem, read_prompts
from engine.session import Session, load_session
from engine.settings import SWEEP_DEFAULTS, SWEEP_FIELDS, CalibSettings, StepSettings

MANIFEST = "batch.json"
DEFAULT_MODEL = "smollm2-135m"
DEFAULT_SPEC = "wanda:0.5"
ATTRIBUTE_CHOICES = ("none", "flips")  # batch --attribute


@dataclass(frozen=True)
class Run:
    run_id: str
    prompt: PromptItem
    spec: Spec
    mode: str


@dataclass
class Sweep:
    """What a sweep runs: model × prompts × specs × modes, with the step and calibration settings."""

    model: str
    prompts: list[PromptItem]
    specs: list[Spec]
    modes: list[str]
    settings: StepSettings = field(default_factory=lambda: StepSettings(**SWEEP_DEFAULTS))  # SWEEP_FIELDS used
    calib: CalibSettings = field(default_factory=CalibSettings)
    device: str = "auto"
    dtype: str = "auto"
    source: str | None = None  # the prompts file or session it came from (for the manifest only)
    # files written into OUT beside batch.json when the sweep really starts (a recipe's prompts.jsonl and
    # recipe.toml), by name: a failed start leaves nothing behind
    files: dict[str, str] = field(default_factory=dict)
    # "flips": attribute every flip step of each run once it is recorded (engine.attribution); "none"
    attribute: str = "none"

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

    def step_settings(self, mode: str) -> StepSettings:
        """The settings the runs of `mode` are stepped with (each prompt's choices go to the stepper per row).
        `counterfactual` applies to the free runs only (shared mode has no divergence to branch from)."""
        return replace(self.settings, mode=mode, counterfactual=self.settings.counterfactual and mode == "free")

    def settings_dict(self) -> dict:
        """The SWEEP_FIELDS of the settings, as batch.json records them."""
        values = self.settings.to_dict()
        # truncate and counterfactual only when set, lens only when off, tie_margin only when given: a manifest
        # written before they existed still matches on resume
        optional = {
            "truncate": bool(values["truncate"]),
            "counterfactual": bool(values["counterfactual"]),
            "lens": not values["lens"],
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
            "calibration": self.calib.to_dict(),
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


# ------------------------------------------------------------------ planning


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
    **settings,
) -> Sweep:
    """Check the whole sweep before anything is loaded. `settings` (SWEEP_FIELDS) and `calib` values left
    None take the session's (with `from_session`) or the defaults (engine.settings). `prompts_text`: the
    content of `prompts_file` when it is not written yet; `files`: see Sweep.files."""
    from engine.models import resolve

    if (prompts_file is None) == (from_session is None):
        raise HieruiError("give the prompts with exactly one of --prompts FILE or --from SESSION")
    unknown = set(settings) - set(SWEEP_FIELDS)
    if unknown:
        raise TypeError(f"unknown settings {sorted(unknown)}")
    given = {k: v for k, v in settings.items() if v is not None}
    calib_given = {k: v for k, v in (calib or {}).items() if v is not None}
    base, base_calib = dict(SWEEP_DEFAULTS), CalibSettings().to_dict()
    if from_session is not None:
        if not specs:
            raise HieruiError("--from SESSION reruns a session under other perturbations: give at least one --prune")
        header = _from_header(from_session, model, calib_given)
        prompts = [PromptItem("p000", header["prompt"], header.get("choices") or None)]
        base.update({k: header[k] for k in SWEEP_FIELDS if header.get(k) is not None})
        for k, v in (header.get("calibration") or {}).items():
            if k in base_calib and v is not None:
                base_calib[k] = None if k == "source" and v == "self" else v
        model = model or header.get("model")
        modes = modes or [header.get("mode") or "shared"]
        source = str(from_session)
    else:
        if prompts_text is None and str(prompts_file).startswith("suite:"):  # a shipped suite: --prompts suite:open
            from engine.recipe import suite_file

            prompts_file = suite_file(str(prompts_file))
        prompts = read_prompts(prompts_file, text=prompts_text)
        source = str(prompts_file)
    base.update(given)
    base_calib.update(calib_given)
    if base_calib["source"] is not None:
        path = Path(base_calib["source"]).expanduser()
        if not path.is_file():
            raise HieruiError(f"calibration file not found: {base_calib['source']}")
        base_calib["source"] = str(path.resolve())
    calibration = CalibSettings(**base_calib).validate()

    model = model or DEFAULT_MODEL
    resolve(model)  # an unknown model fails here, before anything slow
    check_placement(device, dtype)
    parsed = _unique([parse_spec(s) for s in (specs or [DEFAULT_SPEC])])
    from engine.models import check_device, read_config
    from engine.perturb.spec import check_fits

    check_device(device)
    config = read_config(model)  # None: not known before loading (a hub model not in the cache)
    for spec in parsed:
        if spec.method == "checkpoint" and not Path(spec.path).expanduser().exists():
            raise HieruiError(f"checkpoint not found: {spec.path}")
        check_fits(spec, config)
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
    for mode in modes:
        sweep.step_settings(mode).validate()  # the mode and every bound (engine.settings)
    _check_context(sweep, config)
    ids = [r.run_id for r in sweep.runs()]
    if len(set(ids)) != len(ids):
        raise HieruiError("two specs give the same run name (e.g. checkpoints in folders of the same name)")
    return sweep


def check_placement(device: str, dtype: str) -> None:
    """An unknown or absent device and an unknown dtype fail before anything is loaded or written."""
    from engine.models import DTYPES, pick_device

    if (dtype or "auto").lower() != "auto" and dtype.lower() not in DTYPES:
        raise HieruiError(f"unknown dtype '{dtype}': use auto, float32, bfloat16 or float16")
    pick_device(device)


def _from_header(from_session, model: str | None, calib_given: dict) -> dict:
    """The header of `batch --from`'s session, checked (engine.validate: every field's type and range) and
    refused where it would steer a read: a model named by path or hub id needs --model, a calibration file
    --calib (engine.replay's rule for what a file may name on its own)."""
    from engine.replay import header_calibration_file, trusted_model
    from engine.validate import escape, require

    header = load_session(from_session).header
    where = escape(str(from_session))
    require(header, from_session, ("prompt",), "nothing to rerun")
    if not header["prompt"].strip():
        raise HieruiError(f"{where}: the header's prompt is empty; nothing to rerun")
    if header.get("prefix_ids") or header.get("start_step"):
        raise HieruiError(
            f"{where} is a branch of another run (it continues it from a step): --from reruns a prompt from its "
            "start; use the parent session, or replay --rerun this one"
        )
    named = header.get("model")
    if model is None and named is not None and not trusted_model(named) and any(c in named for c in "/\\.~"):
        raise HieruiError(
            f"{where} names the model '{escape(named)}', a local path or hub id: it is loaded only when you "
            f"confirm it with --model {escape(named)}"
        )
    source = header_calibration_file(header)
    if source is not None and calib_given.get("source") is None:
        raise HieruiError(
            f"{where} names the calibration file '{escape(source)}': it is read only when you confirm it with "
            f"--calib {escape(source)}"
        )
    return header


def _check_context(sweep: Sweep, config: dict | None) -> None:
    """Every prompt and --max-new-tokens within the model's context, before loading: only where the config and
    the tokenizer are known without a download (else the stepper checks it, before its first step)."""
    from engine.models import config_int, load_tokenizer, resolve
    from engine.settings import fit_context
    from engine.tokens import prompt_ids

    context = config_int(config, "max_position_embeddings")
    s = sweep.settings
    fit_context(1, s.max_new_tokens, context, truncate=True)  # --max-new-tokens alone must fit
    if context is None or s.truncate or not any(not p.is_choice for p in sweep.prompts):
        return
    if resolve(sweep.model).kind == "hub":
        return
    tokenizer = load_tokenizer(sweep.model)
    for item in sweep.prompts:
        if not item.is_choice:
            try:
                fit_context(len(prompt_ids(tokenizer, item.prompt, raw=s.raw)), s.max_new_tokens, context)
            except HieruiError as e:
                raise HieruiError(f"prompt {item.id}: {e}") from None


def _unique(items: list) -> list:
    return list(dict.fromkeys(items))


def default_out_dir(root: str | Path = "runs") -> Path:
    return Path(root) / time.strftime("%Y%m%d-%H%M%S")


# ------------------------------------------------------------------ the output folder


def session_path(out: str | Path, run: Run) -> Path:
    return Path(out) / "sessions" / f"{run.run_id}.jsonl"


def choices_path(out: str | Path, spec: Spec) -> Path:
    return Path(out) / "mc" / f"{spec.slug}.jsonl"


def load_complete(path: Path) -> Session | None:
    """The session at `path` if it is there and complete (has its closing summary), else None."""
    try:
        session = load_session(path)
    except HieruiError:
        return None
    return session if session.complete else None


def complete_runs(sweep: Sweep, out: str | Path) -> list[str]:
    """The ids of the runs of `sweep` whose session in `out` is complete."""
    return [r.run_id for r in sweep.runs() if load_complete(session_path(out, r)) is not None]


def choices_complete(sweep: Sweep, out: str | Path, spec: Spec) -> bool:
    """Whether OUT/mc/<spec>.jsonl holds a row for every multiple-choice item of `sweep`, in order."""
    path = choices_path(out, spec)
    if not path.is_file():
        return False
    try:
        done = [json.loads(line)["item_id"] for line in path.read_text(encoding="utf-8").splitlines() if line]
    except (OSError, ValueError, KeyError):
        return False
    return done == [p.id for p in sweep.choice_items]


def check_out(sweep: Sweep, out: str | Path) -> bool:
    """Check that OUT can take `sweep` without writing anything: True when OUT/batch.json is there and
    describes this same sweep (a resume), False when there is none yet. Another sweep is refused."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise HieruiError(f"--out {out} is a file, not a folder")
    manifest = json.loads(json.dumps(sweep.manifest()))
    target = out / MANIFEST
    if target.exists():
        try:
            old = json.loads(target.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise HieruiError(f"{target} is unreadable; use another --out") from None
        ignore = {"source", "created", "architecture", "attribute", "noise_floor", "plan"}
        differ = [k for k in sorted(set(old) | set(manifest)) if k not in ignore and old.get(k) != manifest.get(k)]
        if not differ and old.get("attribute", "none") != sweep.attribute and sweep.attribute == "none":
            # turning attribution on over a sweep recorded without it adds it to every run; turning it off would
            # leave attribution.parquet describing some runs only
            raise HieruiError(
                f"{out} was recorded with --attribute {old.get('attribute')}: rerun it with the same option to "
                f"resume it, or use another --out"
            )
        if differ:
            raise HieruiError(
                f"{out} holds another sweep ({', '.join(differ)} differ): rerun it with the same "
                f"settings to resume it, or use another --out"
            )
        return True
    if (out / "sessions").is_dir() and any((out / "sessions").iterdir()):
        raise HieruiError(f"{out} holds sessions but no {MANIFEST}; use another --out")
    return False


def noise_floor(model_name: str, model) -> dict | None:
    """What `hierui noise` measured for the dense model on its device in its dtype (engine.noise.floor_summary,
    and the cast to another dtype as a reference: `cast`), or None where it was not run."""
    from engine.noise import dtype_name, floor_summary, load_floor

    weight = model.get_input_embeddings().weight
    dtype = dtype_name(weight.dtype)
    try:
        floor = load_floor(model_name, weight.device.type)
    except HieruiError:
        return None
    if floor is None:
        return None
    out = floor_summary(floor, dtype)
    cast = [c for c in floor.get("comparisons", []) if c.get("kind") == "dtype"]
    if cast:
        out["cast"] = {k: cast[0].get(k) for k in ("name", "kl_mean", "flip_rate")}
    out["dtype"] = dtype
    return out


def write_manifest(sweep: Sweep, out: str | Path, architecture: dict | None = None, floor: dict | None = None) -> None:
    """Write OUT/batch.json and the sweep's `files` (once the sweep has really started: model loaded, choices
    checked)."""
    out = Path(out)
    if (out / MANIFEST).exists():
        return
    manifest = json.loads(json.dumps(sweep.manifest()))
    out.mkdir(parents=True, exist_ok=True)
    for name, text in sweep.files.items():
        if not (out / name).is_file():
            atomic_write(out / name, text)
    manifest["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    if architecture:  # engine.architecture.describe of the loaded model (not compared on resume)
        manifest["architecture"] = architecture
    if floor:  # the dense model's noise floor (`hierui noise`) when measured: the report shows it (not compared)
        manifest["noise_floor"] = floor
    if getattr(sweep, "plan", None):  # engine.plan's estimate, made before loading (not compared)
        manifest["plan"] = sweep.plan
    atomic_write(out / MANIFEST, json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")


def _record_attribute_option(sweep: Sweep, out: Path) -> None:
    """Attribution turned on over a sweep recorded without it: batch.json says so from now on."""
    target = out / MANIFEST
    if sweep.attribute == "none" or not target.is_file():
        return
    manifest = json.loads(target.read_text(encoding="utf-8"))
    if manifest.get("attribute") != sweep.attribute:
        manifest["attribute"] = sweep.attribute
        atomic_write(target, json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")


# ------------------------------------------------------------------ running


def run_sweep(
    sweep: Sweep,
    out: str | Path,
    use_cache: bool = True,
    hooks: SweepHooks | None = None,
    batch_size: int | None = None,
) -> SweepResult:
    """Record every run of `sweep` not yet complete in `out`, then write the tables (engine.tables).

    Ctrl-C propagates as KeyboardInterrupt; the run in progress keeps its written steps (and is rerun
    from scratch next time), the finished ones stay complete.
    """
    from engine.lock import lock_folder

    hooks = hooks or SweepHooks()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise HieruiError(f"--out {out} is a file, not a folder")
    size = batch_size or default_batch_size(sweep.device)
    if size < 1:
        raise HieruiError(f"--batch-size must be at least 1, got {size}")
    with lock_folder(out, warn=hooks.message):  # one writer per OUT (engine.lock); re-entrant for the CLI
        check_out(sweep, out)  # nothing is written before the sweep really starts (see _record)
        result, todo, mc_todo, att_todo = pending(sweep, out)
        hooks.sweep_started(len(result.runs), len(result.skipped))
        if todo or mc_todo or att_todo:
            _record(sweep, out, todo, use_cache, hooks, result, size, mc_todo, att_todo)
        finish(sweep, out, result)
    return result


def pending(sweep: Sweep, out: Path) -> tuple[SweepResult, list[Run], list, list[Run]]:
    """What is left of `sweep` in `out` (the resume, for the local and the Ray sweep): the result with the complete
    runs as skipped, the runs to record, the specs whose choices are to score, and the runs complete but not
    attributed (attribution turned on, or interrupted while attributing)."""
    from engine.attribution import attribution_complete

    runs = sweep.runs()
    done = set(complete_runs(sweep, out))
    result = SweepResult(out, runs, skipped=[r.run_id for r in runs if r.run_id in done])
    todo = [r for r in runs if r.run_id not in done]
    mc_todo = [spec for spec in sweep.specs if sweep.choice_items and not choices_complete(sweep, out, spec)]
    att_todo = [r for r in runs if sweep.attribute == "flips" and not (r in todo or attribution_complete(out, r))]
    return result, todo, mc_todo, att_todo


def finish(sweep: Sweep, out: Path, result: SweepResult) -> None:
    """The end of a sweep, local or on Ray: batch.json and every table, from the sessions in `out`."""
    from engine.tables import write_attribution_table, write_choice_tables, write_tables

    write_manifest(sweep, out)
    result.summary = write_tables(sweep, out)
    result.choice_summary = write_choice_tables(sweep, out)
    _record_attribute_option(sweep, out)
    write_attribution_table(sweep, out)


def _record(
    sweep: Sweep,
    out: Path,
    todo: list[Run],
    use_cache: bool,
    hooks: SweepHooks,
    result: SweepResult,
    batch_size: int,
    mc_todo: list[Spec],
    att_todo: list[Run] = (),
) -> None:
    from engine.calibration import build_calibration
    from engine.models import load
    from engine.perturb import perturb
    from engine.plan import planned_device_map, plans_streaming
    from engine.session import SessionRecorder
    from engine.stepper import BatchStepper

    plan = getattr(sweep, "plan", None)  # engine.plan's summary: streamed layers, or a device_map for several GPUs
    streamed, device_map = plans_streaming(plan), planned_device_map(plan)
    loaded = load(
        sweep.model,
        device=sweep.device,
        dtype=sweep.dtype,
        progress=hooks.message,
        streamed=streamed,
        device_map=device_map,
    )
    for note in check_choices(sweep, loaded.tokenizer):  # bad choices fail now, not in the middle of the sweep
        hooks.message(note)
    from engine.architecture import describe

    # the sweep really starts: a failed start above leaves no batch.json
    write_manifest(sweep, out, describe(loaded.model.config), noise_floor(sweep.model, loaded.model))
    calibration = None
    for spec in sweep.specs:
        spec_runs = [r for r in todo if r.spec == spec]
        spec_att = [r for r in att_todo if r.spec == spec]
        if not spec_runs and spec not in mc_todo and not spec_att:
            continue
        if spec.needs_calibration and calibration is None:
            started = time.perf_counter()
            c = sweep.calib
            calibration = build_calibration(
                loaded,
                source=c.source,
                samples=c.samples,
                length=c.length,
                seed=c.seed,
                use_cache=use_cache,
                progress=lambda d, t: hooks.stage("calibrating", d, t),
            )
            calibration.seconds = time.perf_counter() - started
        hooks.message(f"perturbing: {spec}")
        pair = perturb(loaded, spec, calibration=calibration, use_cache=use_cache, progress=hooks.stage)
        pair.plan = getattr(sweep, "plan", None)  # engine.plan's estimate: each session header records it
        if spec in mc_todo:
            _score_choices(sweep, out, spec, pair, hooks)
        for chunk in batches(spec_runs, batch_size):
            settings = sweep.step_settings(chunk[0].mode)
            hooks.batch_started(chunk, settings.max_new_tokens * len(chunk))
            stepper = BatchStepper(
                pair, [r.prompt.prompt for r in chunk], settings, choices=[r.prompt.choices for r in chunk]
            )

            def on_record(b, record, chunk=chunk, stepper=stepper):
                hooks.step(chunk[b], record)
                if stepper.rows[b].finished:
                    result.computed.append(chunk[b].run_id)
                    hooks.run_finished(chunk[b])

            SessionRecorder(stepper, [session_path(out, r) for r in chunk]).run(callback=on_record)
            if sweep.attribute == "flips":
                _attribute(sweep, out, chunk, pair, hooks)
        if spec_att:
            _attribute(sweep, out, spec_att, pair, hooks)
        # the last stepper (and its callback) hold the pair: drop them too, or the next spec is pruned with this
        # perturbed copy still in memory (engine.plan counts one pair at a time)
        pair = stepper = on_record = None


def check_choices(sweep: Sweep, tokenizer) -> list[str]:
    """Check every prompt's choices against the tokenizer (a HieruiError naming the prompt); returns the notes
    to show (a multi-token choice of a generation prompt is read through its first token)."""
    from engine.choice import item_token_ids
    from engine.tokens import choice_token_ids

    notes = []
    for item in sweep.prompts:
        if item.choices and not item.is_choice:  # generation: the subspace reads each choice's first token
            try:
                _ids, said = choice_token_ids(tokenizer, item.choices)
            except HieruiError as e:
                raise HieruiError(f"prompt {item.id}: {e}") from None
            notes += [f"prompt {item.id}: {note}" for note in said]
        elif item.is_choice:  # multiple choice: every choice is scored whole, none may be empty
            item_token_ids(tokenizer, item.id, item.prompt, item.choices)
    return notes


def _attribute(sweep: Sweep, out: Path, runs: list[Run], pair, hooks: SweepHooks) -> None:
    """Attribute the flip steps of each complete run: OUT/attribution/<run_id>.jsonl (engine.attribution)."""
    from engine.attribution import attribute_run

    for run in runs:
        session = load_complete(session_path(out, run))
        if session is not None:
            hooks.message(f"attributing run {run.run_id}")
            attribute_run(pair, session, run, out, sweep.settings.temperature, hooks)


def _score_choices(sweep: Sweep, out: Path, spec: Spec, pair, hooks: SweepHooks) -> None:
    """Score every multiple-choice item under `spec`: OUT/mc/<spec>.jsonl, written whole at the end."""
    from engine.choice import ChoiceItem, score_item

    items = sweep.choice_items
    rows = []
    for n, item in enumerate(items, start=1):
        rows.append(
            score_item(
                pair,
                ChoiceItem(item.id, item.prompt, item.choices, item.answer, item.topic),
                temperature=sweep.settings.temperature,
            )
        )
        hooks.stage(f"choices {spec}", n, len(items))
    text = "".join(
        json.dumps({"spec": str(spec), **row}, ensure_ascii=False, separators=(",", ":")) + "\n" for row in rows
    )
    atomic_write(choices_path(out, spec), text)


def batches(runs: list[Run], size: int) -> list[list[Run]]:
    """Runs stepped together: same mode (the step settings differ only in choices), at most `size` each."""
    chunks = []
    for mode in dict.fromkeys(r.mode for r in runs):
        same = [r for r in runs if r.mode == mode]
        chunks += [same[i : i + size] for i in range(0, len(same), size)]
    order = {id(r): i for i, r in enumerate(runs)}
    return sorted(chunks, key=lambda chunk: order[id(chunk[0])])  # size 1: the sweep's own order


def default_batch_size(device: str) -> int:
    """Prompts stepped at once: 8 on a CPU (about 3× the tokens per second of one), 16 on a GPU."""
    import torch

    on_gpu = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    return 16 if on_gpu else 8
