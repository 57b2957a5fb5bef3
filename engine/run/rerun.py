"""Recompute a recorded session with its models and measure how far the recomputation is from the recording.

`plan_rerun(session)` decides what a rerun loads: a session file is untrusted input, so what its header names
goes through engine.models.trust (a known model name or a path under $HIERUI_HOME as it stands; any other local
path, hub id, checkpoint:PATH spec or calibration file only when the user passes it again: --model, --prune,
--calib); anything else is refused before anything is read. `rerun(session)` loads that model, rebuilds
the perturbation (same spec, same calibration samples/length/seed/source) and the step settings, and
records exactly as many steps as were recorded, through the same SessionRecorder as every other run (into
`save`, or a temporary file).
`deviations(recorded, new)` is the largest absolute difference of every metric: scalars, per-layer and
per-choice lists elementwise, and the probabilities of the top-k lists. `compare` adds whether every token
matched; `compare_branch` does the same for a counterfactual branch (engine.run.branch). A branch of another run
(header `prefix_ids`, `start_step`) is rerun from its prefix and start step. Nothing here prints; `hierui replay
--rerun` renders the result.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from engine.errors import HieruiError
from engine.record.header import SessionHeader, header_of
from engine.record.session import Session, load_session
from engine.record.settings import StepSettings
from engine.run.recorder import SessionRecorder

# fields of a step record that are tokens (compared for equality, not as metrics)
TOKEN_FIELDS = ("token_d", "token_p", "fed")
# fields that are neither metrics nor tokens, or that follow from the tokens
SKIP_FIELDS = frozenset({"step", "text_d", "text_p", "same_token", "first_divergence", "end_d", "end_p", *TOKEN_FIELDS})
TOPK_FIELDS = ("topk_d", "topk_p")


def settings_from_header(header: SessionHeader, steps: int) -> StepSettings:
    """The StepSettings of a recorded run (`header`: a SessionHeader or its dict), with max_new_tokens forced to the
    recorded number of steps."""
    h = header_of(header)
    return StepSettings(
        mode=h.mode,
        temperature=h.temperature,
        max_new_tokens=steps,
        sample=h.sample,
        seed=h.seed,
        choices=h.choices,
        raw=h.raw,
        topk=h.topk,
        truncate=bool(h.truncated_from),
        lens=h.lens or "off",  # the recorded mode; a session from before the lens has none
        tie_margin=h.tie_margin,
        counterfactual=h.counterfactual,
    ).validate()


def calib_options_from_header(header: SessionHeader) -> dict | None:
    """perturb()'s calib_options that rebuild the recorded calibration (None: the spec had none). The source is
    the file the header names: plan_rerun uses it only where engine.models.trust allows."""
    calib = header_of(header).calibration
    if calib is None:
        return None
    opts = {k: getattr(calib, k) for k in ("samples", "length", "seed") if getattr(calib, k) is not None}
    if calib.file is not None:
        opts["source"] = calib.file
    return opts


@dataclass
class RerunPlan:
    """What a rerun loads: every value either an allowed header value or one the user passed."""

    model: str | None  # None: the caller passes an already loaded model
    spec: str
    calib_options: dict | None

    def describe(self) -> str:
        """'model X, perturbation S, calibration C' (escape it before printing: it comes from a file)."""
        calib = self.calib_options
        if calib is None:
            what = "none"
        else:
            origin = calib.get("source") or "self-generated"
            sizes = "×".join(str(calib[k]) for k in ("samples", "length") if calib.get(k) is not None)
            what = f"{origin}" + (f" ({sizes} tokens)" if sizes else "")
        return f"model {self.model or '(loaded)'}, perturbation {self.spec}, calibration {what}"


def plan_rerun(
    session: Session, model: str | None = None, calib: str | Path | None = None, spec: str | None = None, loaded=None
) -> RerunPlan:
    """The values a rerun of `session` uses. `model`, `calib`, `spec`: the user's --model, --calib, --prune,
    which confirm a path or hub id the header names: they must name what the header names (a rerun reproduces
    the recording; another model, spec or calibration file is refused), and fill in a model or spec the header
    lacks. A header value a file may not name on its own (engine.models.trust: a local model or a hub id, a
    checkpoint:PATH spec, a calibration file, outside $HIERUI_HOME) is one HieruiError naming the flag to pass;
    nothing it names is read."""
    from engine.models.trust import trusted
    from engine.perturb.spec import parse_spec
    from engine.record.validate import escape
    from engine.run.open import blamed

    header = session.header
    where = escape(str(session.path))
    if not session.steps:
        raise HieruiError(f"{where} has no recorded steps to rerun")
    header.require(session.path, ("prompt",), "cannot rerun")
    if model is None and loaded is None:
        header.require(session.path, ("model",), "cannot rerun (or pass --model)")
    if model is not None or loaded is None:
        model = trusted(header.model, model, "model", session.path, confirm_only=True)
    if spec is None and not header.perturbation.spec:
        raise HieruiError(f"{where}: the header names no perturbation spec; cannot rerun (or pass --prune)")
    spec = trusted(header.perturbation.spec, spec, "spec", session.path, confirm_only=True)
    with blamed(header_source(session), "spec"):
        parse_spec(spec)
    options = calib_options_from_header(header)
    if calib is not None and header.calibration_file is None:
        what = "no calibration" if options is None else "a calibration the model sampled itself"
        raise HieruiError(
            f"--calib {escape(str(calib))}: {where} was recorded with {what}, and --calib only confirms a "
            "calibration file the session names: leave --calib out"
        )
    source = trusted(
        header.calibration_file, None if calib is None else str(calib), "calib", session.path, confirm_only=True
    )
    if source is not None:
        options = {**(options or {}), "source": source}
    return RerunPlan(model=model, spec=spec, calib_options=options)


def header_source(session: Session) -> dict[str, str]:
    """engine.run.open.pair_request's `source`: the model, spec and dtype a rerun takes from the session's header,
    so that an error about one names the file's field, not an option the user never typed."""
    from engine.record.validate import escape

    where = escape(str(session.path))
    fields = {"model": "model", "spec": "perturbation", "dtype": "dtype"}
    return {key: f"{where}: the session's {name}" for key, name in fields.items()}


def rerun_request(
    session: Session, plan: RerunPlan, device="auto", dtype=None, gpu_mem=None, gpus=None, use_cache=True
):
    """The engine.run.open.PairRequest a rerun opens its models by: the plan's model, spec and calibration, on
    `device` in `dtype` (None: the recorded one), with the memory budget of --gpu-mem/--gpus; checked before
    anything loads, the session's token ids included (check_ids_before_loading). An error about a value the
    header gave (the model, the spec, the recorded dtype) names the session's field (header_source)."""
    from engine.run.open import pair_request

    header = session.header
    steps = header.max_new_tokens if header.max_new_tokens is not None else len(session.steps)
    source = header_source(session)
    if dtype is not None:
        source.pop("dtype")  # the user's --dtype
    request = pair_request(
        plan.model,
        [plan.spec],
        device,
        dtype or header.dtype or "auto",
        gpu_mem,
        gpus,
        calib=plan.calib_options or {},
        use_cache=use_cache,
        source=source,
        max_new_tokens=max(1, steps),
        lens=header.lens or "off",
    )
    check_ids_before_loading(session, plan.model)
    return request


def check_session_ids(session: Session, vocab_size: int, model: str | None = None) -> None:
    """Every token id `session` holds (engine.record.validate.token_id_fields: the prompt's, each step's, the
    branch's) is one that `model` embeds (engine.models.tokens.check_token_ids, `vocab_size` its embedding rows):
    else one line, exit 2, naming the file, the field, the step and the id, before the model reads any."""
    from engine.models.tokens import check_token_ids
    from engine.record.validate import escape, token_id_fields

    where = escape(str(session.path))
    for name, ids in token_id_fields(session):
        check_token_ids(ids, vocab_size, f"{where}: {name}", model)


def check_ids_before_loading(session: Session, model: str) -> bool:
    """check_session_ids against `model`'s vocab_size from its config, read without its weights (a hub model's
    config fetched alone where it is not in the local cache). False where the config cannot be had before loading
    (a GGUF file not converted yet): open_session_pair checks them once the model is loaded, before it runs."""
    from engine.models.hub import fetch_light
    from engine.models.tokens import embedding_rows

    vocab = embedding_rows(model)
    if vocab is None and fetch_light(model) is not None:
        vocab = embedding_rows(model)
    if vocab is None:
        return False
    check_session_ids(session, vocab, model)
    return True


def open_session_pair(session: Session, plan: RerunPlan, request=None, memory=None, loaded=None, progress=None):
    """The pair a rerun or an attribution of `session` runs: the dense model (`loaded`, or opened by `request`
    placed as `memory` says: engine.run.open), the session's token ids checked against its embedding rows (the
    first check where its config was not known before loading; nothing has run yet), then the perturbed copy
    through the cache. Returns (pair, the dense LoadedModel, the request)."""
    from engine.models.tokens import model_rows
    from engine.run.open import PairRequest, open_dense, open_pair, plan_pair

    say = progress or (lambda *_: None)
    if loaded is None:
        memory = memory if memory is not None else plan_pair(request)
        loaded = open_dense(request, memory, progress=lambda message, done=0, total=0: say(message, done, total))
    check_session_ids(session, model_rows(loaded.model), loaded.ref.name)
    request = request or PairRequest(loaded.ref.name)
    pair = open_pair(request, plan.spec, dense=loaded, calib=plan.calib_options or {}, progress=progress)
    return pair, loaded, request


RERUN_FEEDS = "rerunning with the recorded ids, as the recording fed them"


def prompt_ids_note(header: SessionHeader, tokenizer, feeds: str = RERUN_FEEDS) -> str | None:
    """What a rerun says when the prompt ids the header records and the recorded prompt tokenized again now (a
    newer tokenizer, a chat template changed, an edited file) differ: how the two differ (lengths, the first
    differing position), then `feeds`, which of the two the reader feeds: a rerun the recorded ids, since it must
    reproduce what the models were fed (RERUN_FEEDS); `batch --from` the prompt tokenized again, as every prompt
    of a sweep (engine.sweep.runner.tokenizer_notes). None when they agree, or when the header records no ids
    (the prompt is then tokenized)."""
    from engine.models.tokens import prompt_ids

    recorded = [int(t) for t in header.prompt_ids or ()]
    if not recorded or header.prompt is None:
        return None
    again = prompt_ids(tokenizer, header.prompt, raw=bool(header.raw)) + [int(t) for t in header.prefix_ids]
    if not again and tokenizer.bos_token_id is not None:
        again = [tokenizer.bos_token_id]  # an empty prompt starts from the beginning of a text (engine.run.stepper)
    if header.truncated_from and len(again) > len(recorded):
        again = again[len(again) - len(recorded) :]  # --truncate kept the prompt's last tokens
    if again == recorded:
        return None
    first = next((i for i, (a, b) in enumerate(zip(recorded, again)) if a != b), min(len(recorded), len(again)))
    return (
        f"the recorded prompt_ids ({len(recorded)} tokens) and the prompt tokenized again ({len(again)} tokens) "
        f"first differ at position {first} (counted from 0): {feeds}"
    )


def rerun(
    session: Session,
    device: str = "auto",
    dtype: str | None = None,
    *,
    loaded=None,
    use_cache: bool = True,
    progress: Callable[[str, int, int], None] | None = None,
    save: str | Path | None = None,
    plan: RerunPlan | None = None,
) -> list[dict]:
    """Recompute `session` with its models; the new step records as its session file holds them
    (rerun_session: the whole new session, its counterfactual branch included)."""
    return rerun_session(
        session, device, dtype, loaded=loaded, use_cache=use_cache, progress=progress, save=save, plan=plan
    ).steps


def rerun_session(
    session: Session,
    device: str = "auto",
    dtype: str | None = None,
    *,
    loaded=None,
    use_cache: bool = True,
    progress: Callable[[str, int, int], None] | None = None,
    save: str | Path | None = None,
    plan: RerunPlan | None = None,
    request=None,
    memory=None,
    note: Callable[[str], None] | None = None,
) -> Session:
    """Recompute `session` with its models; the new session as its file holds it.

    A branch (header `prefix_ids`, `start_step`, `parent`) is rerun from the same prefix and start step. A
    session recorded with the counterfactual on is rerun with it when its closing line has the branch fields
    (the branch, stepped to the recorded max_new_tokens, is compared by compare_branch), else without it.

    `dtype` None takes the recorded one (header "dtype"), else auto. `loaded`: an already loaded dense
    model (engine.models.loading.LoadedModel) to use instead of loading one. `plan`: what to load (plan_rerun;
    default: plan_rerun(session), which refuses a header naming a path). `save`: where the recomputed
    session is written (default: a temporary file, removed afterwards). `request`: the engine.run.open.PairRequest
    to open the models by (rerun_request: with --gpu-mem/--gpus), `memory` its plan (engine.run.open.plan_pair);
    by default both are made here.

    The prompt is fed as the header's prompt_ids record it (a session without them: tokenized again); `note`
    gets one line when a tokenization now would differ (prompt_ids_note). Every token id of the session is
    checked against the model before it runs (rerun_request before loading, open_session_pair after).
    """
    from engine.run.stepper import Stepper

    header = session.header
    plan = plan or plan_rerun(session, loaded=loaded)
    settings = settings_from_header(header, len(session.steps))
    if settings.counterfactual:  # the branch's length follows the run's max_new_tokens: take the recorded one
        # only a run that ended and was closed with its branch fields (not one ended early in the explorer)
        complete = "recovered" in (session.summary or {}) and header.max_new_tokens is not None
        settings = replace(
            settings,
            counterfactual=complete,
            max_new_tokens=header.max_new_tokens if complete else settings.max_new_tokens,
        )
    stop = None
    if header.truncated_from and header.max_new_tokens is not None:
        # the prompt was cut to fit the recorded max_new_tokens: step with that limit, as many steps as recorded
        settings = replace(settings, max_new_tokens=header.max_new_tokens)
        stop = lambda: len(stepper.records) >= len(session.steps)  # noqa: E731
    say = progress or (lambda *_: None)
    if loaded is None:
        request = request or rerun_request(session, plan, device, dtype, use_cache=use_cache)
    elif request is None:
        from engine.run.open import PairRequest

        request = PairRequest(loaded.ref.name, use_cache=use_cache)
    pair, loaded, request = open_session_pair(session, plan, request, memory, loaded, progress)
    told = prompt_ids_note(header, loaded.tokenizer)
    if told is not None and note is not None:
        note(told)
    stepper = Stepper(
        pair,
        header.prompt,
        settings,
        prefix=list(header.prefix_ids),
        start_step=header.start_step,
        parent=header.parent.to_dict() if header.parent is not None else None,
        recorded_ids=list(header.prompt_ids) if header.prompt_ids else None,
    )
    total, done = len(session.steps), 0

    def stepped(_row, _record) -> None:
        nonlocal done
        done += 1
        say("recomputing steps", done, total)

    say("recomputing steps", 0, total)
    if save is not None:
        SessionRecorder(stepper, [save]).run(callback=stepped, stop=stop)
        return load_session(save)
    with tempfile.TemporaryDirectory(prefix="hierui-rerun-") as tmp:
        path = Path(tmp) / "rerun.jsonl"
        SessionRecorder(stepper, [path]).run(callback=stepped, stop=stop)
        return load_session(path)


# ------------------------------------------------------------------ comparing


def _numbers(value) -> list[float | None] | None:
    """A metric value as a flat list of numbers (None for null); None when it is not numeric."""
    if value is None:
        return [None]
    if isinstance(value, bool):
        return [float(value)]
    if isinstance(value, (int, float)):
        return [float(value)]
    if isinstance(value, list) and all(v is None or isinstance(v, (int, float)) for v in value):
        return [None if v is None else float(v) for v in value]
    return None


def _topk_probs(value) -> list[float | None] | None:
    if value is None:  # no list: that model had ended (free mode); equal to another null, not to a list
        return []
    if not isinstance(value, list):
        return None
    try:
        return [None if row[2] is None else float(row[2]) for row in value]
    except (TypeError, IndexError, ValueError):
        return None


def max_abs(a: list | None, b: list | None, relative: bool = False) -> float:
    """Largest |a_i − b_i| (with `relative`, |a_i − b_i| / max(1, |a_i|): absolute below 1, relative above);
    null against null is 0, null against a number (or a length change) is inf."""
    if a is None or b is None or len(a) != len(b):
        return math.inf
    worst = 0.0
    for x, y in zip(a, b):
        if x is None and y is None:
            continue
        if x is None or y is None or not (math.isfinite(x) and math.isfinite(y)):
            if x != y:
                return math.inf
            continue
        worst = max(worst, abs(x - y) / (max(1.0, abs(x)) if relative else 1.0))
    return worst


def deviations(recorded_steps: list[dict], new_steps: list[dict]) -> dict[str, float]:
    """Per metric name, the largest deviation over the steps both runs have: |new − recorded|, divided by
    |recorded| where that is above 1 (KL of several nats, a cum_kl summed over a long run: float noise there
    scales with the value, so an absolute bound would fail on rounding alone).

    A recorded metric the new run lacks, or null in one and a number in the other, deviates by inf; a metric
    the recording lacks (written by an older hierui, before that metric existed) is not compared.
    """
    names: list[str] = []
    for step in recorded_steps:
        for name in step:
            if name not in SKIP_FIELDS and name not in names:
                names.append(name)
    out: dict[str, float] = {}
    for name in names:
        worst = 0.0
        convert = _topk_probs if name in TOPK_FIELDS else _numbers
        for old, new in zip(recorded_steps, new_steps):
            if name not in old:
                continue
            if name not in old or name not in new:
                worst = math.inf
                break
            worst = max(worst, max_abs(convert(old[name]), convert(new[name]), relative=True))
        out[name] = worst
    return out


def _token_row(step: dict) -> tuple:
    return tuple(json.dumps(step.get(name)) for name in TOKEN_FIELDS)


def _topk_ids(step: dict) -> tuple:
    return tuple(tuple(row[0] for row in step.get(name) or []) for name in TOPK_FIELDS)


@dataclass
class Comparison:
    """How a recomputation compares with its recording."""

    recorded: int  # recorded steps
    rerun: int  # recomputed steps
    deviations: dict[str, float]
    first_token_mismatch: int | None  # first step whose tokens (token_d, token_p, fed) differ
    topk_id_mismatches: int = 0  # steps whose top-k token lists differ (reported, not a failure)
    notes: list[str] = field(default_factory=list)

    @property
    def tokens_match(self) -> bool:
        return self.first_token_mismatch is None and self.recorded == self.rerun

    @property
    def max_deviation(self) -> float:
        return max(self.deviations.values(), default=0.0)

    def ok(self, tol: float) -> bool:
        return self.tokens_match and self.max_deviation < tol


def compare(recorded_steps: list[dict], new_steps: list[dict]) -> Comparison:
    mismatch = next(
        (i for i, (a, b) in enumerate(zip(recorded_steps, new_steps)) if _token_row(a) != _token_row(b)), None
    )
    if mismatch is None and len(recorded_steps) != len(new_steps):
        mismatch = min(len(recorded_steps), len(new_steps))
    topk = sum(_topk_ids(a) != _topk_ids(b) for a, b in zip(recorded_steps, new_steps))
    result = Comparison(
        recorded=len(recorded_steps),
        rerun=len(new_steps),
        deviations=deviations(recorded_steps, new_steps),
        first_token_mismatch=mismatch,
        topk_id_mismatches=topk,
    )
    if len(recorded_steps) != len(new_steps):
        result.notes.append(f"the rerun took {len(new_steps)} steps, the recording {len(recorded_steps)}")
    return result


def compare_branch(recorded, new) -> Comparison | None:
    """How a rerun's counterfactual branch (engine.record.branches.Branch, or None) compares with the recorded one; None
    when the recording has none. A branch at another step or token, or none, is a token mismatch at step 0."""
    if recorded is None:
        return None
    result = compare(recorded.steps, new.steps if new is not None else [])
    if new is None:
        result.notes.append("the rerun has no counterfactual branch")
        result.first_token_mismatch = 0
    elif (new.at, new.token) != (recorded.at, recorded.token):
        result.notes.append(
            f"the rerun branches at step {new.at} with token {new.token}, the recording at {recorded.at} "
            f"with {recorded.token}"
        )
        result.first_token_mismatch = 0
    return result
