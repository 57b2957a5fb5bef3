"""Sweeps: prompts × perturbation specs × modes, planned, recorded headless into an output folder, and resumed.

    plan     plan_sweep() reads the prompts (a prompts file, engine.record.prompts; or the prompt and settings of a
             saved session) and checks every spec, mode and setting, before any model is loaded.
    run      run_sweep() loads the model once, builds each spec's calibration (Sweep.calib_for: the same default
             per method as every command; specs with the same settings share one), perturbs each spec once and
             records each run (spec → prompt → mode) as OUT/sessions/<run_id>.jsonl, with
             run_id = <prompt id>-<spec slug>-<mode>, e.g. p003-wanda-0.5-shared; runs of one mode are
             stepped together, `batch_size` at a time, in the same chunks for every spec (chunks_of), and each
             chunk's dense side is computed once: recorded by the first spec that steps it and replayed for the
             others (engine.run.trajectory: OUT/.hierui-dense/ holds what spills beyond the host memory budget,
             removed when the sweep ends or is interrupted). Multiple-choice items are scored once per spec
             (OUT/mc/<spec slug>.jsonl). With attribute="flips" (batch --attribute flips) each recorded run's
             flip steps are attributed (engine.run.attribution) into OUT/attribution/<run_id>.jsonl, written whole;
             a complete run without that file gets it on resume. Then it writes the tables (engine.sweep.tables).
    resume   a run whose session file has its closing summary is complete and is skipped; an incomplete
             one is rerun from scratch (with the other runs of its chunk still to record: a chunk of another
             composition than the other specs' has its own dense side). OUT/batch.json records the sweep;
             rerunning into the same OUT with other settings is refused (use another --out).
    lock     one writer per OUT: run_sweep holds OUT/.hierui.lock (engine.record.lock) while it runs; a second
             sweep into the same OUT is refused, naming the first. batch.json is written only once the
             sweep really starts (model and tokenizer loaded, choices checked, every calibration built), so a
             failed start leaves nothing that refuses the corrected command.

The step settings come from engine.record.settings: the sweep's `settings` (a frozen StepSettings, of which
batch.json records the SWEEP_FIELDS), with each run's mode put in by `dataclasses.replace`; each prompt's
choices go to the stepper per row.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

from engine.errors import HieruiError
from engine.perturb.spec import Spec
from engine.record.paths import atomic_write
from engine.record.settings import default_batch_size
from engine.sweep.folder import (
    MANIFEST,
    check_out,
    choices_complete,
    choices_path,
    complete_runs,
    load_complete,
    noise_floor,
    session_path,
    write_manifest,
)
from engine.sweep.sweeps import Run, Sweep, SweepHooks, SweepResult

DENSE_FOLDER = ".hierui-dense"  # OUT's folder of the dense trajectories spilled to files (engine.run.trajectory)

# ------------------------------------------------------------------ planning


# ------------------------------------------------------------------ the output folder


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
    """Record every run of `sweep` not yet complete in `out`, then write the tables (engine.sweep.tables).

    Ctrl-C propagates as KeyboardInterrupt; the run in progress keeps its written steps (and is rerun
    from scratch next time), the finished ones stay complete.
    """
    from engine.record.lock import lock_folder

    hooks = hooks or SweepHooks()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise HieruiError(f"--out {out} is a file, not a folder")
    size = batch_size or default_batch_size(sweep.device)
    if size < 1:
        raise HieruiError(f"--batch-size must be at least 1, got {size}")
    with lock_folder(out, warn=hooks.message):  # one writer per OUT (engine.record.lock); re-entrant for the CLI
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
    from engine.run.attribution import attribution_complete

    runs = sweep.runs()
    done = set(complete_runs(sweep, out))
    result = SweepResult(out, runs, skipped=[r.run_id for r in runs if r.run_id in done])
    todo = [r for r in runs if r.run_id not in done]
    mc_todo = [spec for spec in sweep.specs if sweep.choice_items and not choices_complete(sweep, out, spec)]
    att_todo = [r for r in runs if sweep.attribute == "flips" and not (r in todo or attribution_complete(out, r))]
    return result, todo, mc_todo, att_todo


def finish(sweep: Sweep, out: Path, result: SweepResult) -> None:
    """The end of a sweep, local or on Ray: batch.json and every table, from the sessions in `out`."""
    from engine.sweep.tables import write_attribution_table, write_choice_tables, write_tables

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
    from engine.run.open import open_dense, open_pair
    from engine.run.recorder import SessionRecorder
    from engine.run.stepper import BatchStepper
    from engine.run.trajectory import DenseStore

    request = sweep_request(sweep, use_cache)
    # the dense model once, placed by the driver's plan (streamed layers, or a device_map for several GPUs)
    loaded = open_dense(request, getattr(sweep, "plan", None), progress=hooks.message)
    for note in tokenizer_notes(sweep, loaded.tokenizer):  # bad choices fail now, not in the middle of the sweep
        hooks.message(note)
    from engine.record.architecture import describe

    work = [s for s in sweep.specs if s in mc_todo or any(r.spec == s for r in [*todo, *att_todo])]
    built: dict = {}
    for spec in work:  # a calibration that fails (a file too short for this tokenizer) fails before batch.json
        calibration_of(sweep, spec, loaded, built, use_cache, hooks)
    # the sweep really starts: a failed start above leaves no batch.json
    write_manifest(sweep, out, describe(loaded.model.config), noise_floor(sweep.model, loaded.model))
    chunks = {spec: chunks_of(sweep, spec, todo, batch_size) for spec in work}
    # each chunk's dense side once: kept from the first spec that steps it until the last (engine.run.trajectory)
    uses = Counter(dense_key(chunk) for spec_chunks in chunks.values() for chunk in spec_chunks)
    store = DenseStore(out / DENSE_FOLDER, uses, say=hooks.message)
    try:
        for spec in work:
            spec_att = [r for r in att_todo if r.spec == spec]
            calibration = calibration_of(sweep, spec, loaded, built, use_cache, hooks)
            hooks.message(f"perturbing: {spec}")
            pair = open_pair(request, spec, dense=loaded, calibration=calibration, progress=hooks.stage)
            if spec in mc_todo:
                _score_choices(sweep, out, spec, pair, hooks)
            for chunk in chunks[spec]:
                settings = sweep.step_settings(chunk[0].mode)
                hooks.batch_started(chunk, settings.max_new_tokens * len(chunk))
                key = dense_key(chunk)
                trajectory = store.take(key)
                stepper = BatchStepper(
                    pair,
                    [r.prompt.prompt for r in chunk],
                    settings,
                    choices=[r.prompt.choices for r in chunk],
                    dense_trajectory=trajectory,
                )

                def on_record(b, record, chunk=chunk, stepper=stepper):
                    hooks.step(chunk[b], record)
                    if stepper.rows[b].finished:
                        result.computed.append(chunk[b].run_id)
                        hooks.run_finished(chunk[b])

                SessionRecorder(stepper, [session_path(out, r) for r in chunk]).run(callback=on_record)
                store.give_back(key, trajectory, stepper.finished)
                if sweep.attribute == "flips":
                    _attribute(sweep, out, chunk, pair, hooks)
            if spec_att:
                _attribute(sweep, out, spec_att, pair, hooks)
            # the last stepper (and its callback) hold the pair: drop them too, or the next spec is pruned with this
            # perturbed copy still in memory (engine.run.plan counts one pair at a time)
            pair = stepper = on_record = None
    finally:
        store.close()  # ended or interrupted: no trajectory file is left in OUT


def calibration_of(sweep: Sweep, spec: Spec, loaded, built: dict, use_cache: bool = True, hooks=None):
    """The engine.perturb.calibration.Calibration `spec` is perturbed with (None: its method does not calibrate),
    built once per distinct settings (Sweep.calib_for) and kept in `built`, for the local sweep and a Ray worker."""
    from engine.perturb.calibration import build_calibration

    if not spec.needs_calibration:
        return None
    settings = sweep.calib_for(spec)
    if settings not in built:
        started = time.perf_counter()
        progress = (lambda d, t: hooks.stage("calibrating", d, t)) if hooks is not None else None
        c = settings
        calibration = build_calibration(
            loaded, c.source, c.samples, c.length, c.seed, use_cache=use_cache, progress=progress
        )
        calibration.seconds = time.perf_counter() - started
        built[settings] = calibration
    return built[settings]


# batch --from sweeps its session's prompt as text: what it says when the recorded ids differ (engine.run.rerun)
FROM_FEEDS = "sweeping the prompt tokenized again, as batch does every prompt (replay --rerun feeds the recorded ids)"


def tokenizer_notes(sweep: Sweep, tokenizer) -> list[str]:
    """What a sweep checks and says once its tokenizer is loaded, before batch.json (local and Ray sweeps): every
    prompt's choices (check_choices), and for `batch --from` of the session's own model, whether its prompt
    tokenized again gives the ids the session recorded (engine.run.rerun.prompt_ids_note): the sweep feeds the
    text, and says so where they differ."""
    from engine.models.trust import same
    from engine.run.rerun import prompt_ids_note

    notes = check_choices(sweep, tokenizer)
    header = sweep.from_header
    if header is not None and header.model is not None and same(header.model, sweep.model, "model"):
        told = prompt_ids_note(header, tokenizer, FROM_FEEDS)
        notes += [told] if told is not None else []
    return notes


def check_choices(sweep: Sweep, tokenizer) -> list[str]:
    """Check every prompt's choices against the tokenizer (a HieruiError naming the prompt); returns the notes
    to show (a multi-token choice of a generation prompt is read through its first token)."""
    from engine.models.tokens import choice_token_ids
    from engine.run.choice import item_token_ids

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
    """Attribute the flip steps of each complete run: OUT/attribution/<run_id>.jsonl (engine.run.attribution)."""
    from engine.run.attribution import attribute_run

    for run in runs:
        session = load_complete(session_path(out, run))
        if session is not None:
            hooks.message(f"attributing run {run.run_id}")
            attribute_run(pair, session, run, out, sweep.settings.temperature, hooks)


def _score_choices(sweep: Sweep, out: Path, spec: Spec, pair, hooks: SweepHooks) -> None:
    """Score every multiple-choice item under `spec`: OUT/mc/<spec>.jsonl, written whole at the end."""
    from engine.run.choice import ChoiceItem, score_item

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


def chunks_of(sweep: Sweep, spec: Spec, todo: list[Run], size: int) -> list[list[Run]]:
    """The runs of `spec` in `todo`, in the chunks they are stepped in (local sweep and Ray items): the sweep's
    chunks of all of `spec`'s runs (batches), the same prompts and mode for every spec, less the runs complete.
    So every spec steps a chunk with the same batch composition (the same numbers), and its dense side is
    computed once (engine.run.trajectory); a chunk a resume left part-complete is stepped with what is left."""
    waiting = {r.run_id for r in todo if r.spec == spec}
    every = [r for r in sweep.runs() if r.spec == spec]
    return [left for chunk in batches(every, size) if (left := [r for r in chunk if r.run_id in waiting])]


def dense_key(chunk: list[Run]) -> str:
    """What a chunk's dense side depends on in a sweep: its mode and its prompts, in order (a text: Ray sends it)."""
    return json.dumps([chunk[0].mode, [r.prompt.id for r in chunk]])


def batches(runs: list[Run], size: int) -> list[list[Run]]:
    """Runs stepped together: same mode (the step settings differ only in choices), at most `size` each."""
    chunks = []
    for mode in dict.fromkeys(r.mode for r in runs):
        same = [r for r in runs if r.mode == mode]
        chunks += [same[i : i + size] for i in range(0, len(same), size)]
    order = {id(r): i for i, r in enumerate(runs)}
    return sorted(chunks, key=lambda chunk: order[id(chunk[0])])  # size 1: the sweep's own order


def sweep_request(sweep: Sweep, use_cache: bool = True, batch_size: int = 1):
    """The engine.run.open.PairRequest of a planned sweep (its inputs were checked by plan_sweep)."""
    from engine.run.open import PairRequest, Workload

    s = sweep.settings
    workload = Workload(batch_size=batch_size, max_new_tokens=s.max_new_tokens, lens=s.lens)
    # the plan sizes the largest calibration of any spec (each spec is perturbed with its own, calibration_of)
    calib = max(sweep.calibrations().values(), key=lambda c: c["samples"] * c["length"], default={})
    return PairRequest(
        sweep.model, tuple(sweep.specs), sweep.device, sweep.dtype, calib=calib, use_cache=use_cache, workload=workload
    )
