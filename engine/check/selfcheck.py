"""`hierui check`: a self-test of hierui's own numbers on the user's model, before they are trusted. UI-free.

For each perturbation spec the pair is built as every command builds it (engine.perturb.perturb, with a small
calibration) and these checks run, each giving pass, fail or n/a with the deviation it measured:

  zero      `none` only. The dense model against itself gives exactly zero divergence: stepped in free mode
            (each model fed its own token, so the texts could split), every metric of every step sits at its
            identity value (kl, js, tv, dp, emb_rel, … = 0; every cosine, top1_agree, topk_overlap = 1; nll_d =
            nll_p, top-k and subspace probabilities equal; amp null; no first divergence; same tokens).
            Tolerance 0: the value is the largest distance of any field from its identity value.
  cache     KV-cached stepping equals a full forward pass. The pair is stepped (engine.run.stepper.Stepper, shared
            mode, greedy, with choices); then each model runs once over the prompt and the tokens it was fed,
            without a cache. At every step's position: the logits (max |Δz| / the logit scale max |z|), the
            hidden states (max ‖Δh‖/‖h‖ over layers) and every recorded metric, recomputed from the full pass
            with engine.run.metrics.step_metrics (max |Δ| per metric).
  batch     batched stepping equals one-at-a-time: engine.run.stepper.BatchStepper over three prompts of different
            lengths (and different numbers of choices) against a Stepper on each: the same tokens, the logits
            (relative, as above) and every recorded field (max |Δ| per metric, engine.run.rerun.deviations). A
            dense token that differs where its two candidates are a near tie (within 2ε·max|z|: float noise can
            pick either) ends the comparison of that prompt at that step (said in the reason); a differing
            token anywhere else fails.
  sharing   the perturbed model shares every tensor the perturbation need not change with the dense model,
            and the dense model is not changed by perturbing and stepping. The tensors a spec must replace:
            the prunable matrices for pruning (engine.anatomy.linears.model_weight_views, else the decoder
            linears' weights), the quantized linears' weights for int8/nf4, nothing for none and the drops (a
            dropped module is left out, not copied). The value is the fraction of the perturbed model's
            parameter bytes that are wrongly copied or wrongly still shared (tolerance 0); the table shows the
            fraction actually shared (engine.perturb.pair.shared_fraction).
  sparsity  pruning only. Every prunable matrix has exactly the zeros the spec asks for, in the method's own
            comparison group: int(numel·s) per matrix (magnitude, sparsegpt), int(cols·s) per output row
            (wanda), M−N in every group of M consecutive inputs of a row (N:M). A weight the dense model already
            had at zero may stay zero beyond that (a de-quantized model has some): the zeros of a group must lie
            in [k, max(k, dense zeros)]. The value is the largest |sparsity − requested| of a matrix.

Every run steps exactly `steps` tokens (no stop at end-of-sequence: the checks compare numbers, and a run
that ended at its first token would compare none).

Tolerances (the rule). A relative tolerance ε is chosen from the dtype the model runs in, ε = 1e-4 for
float32, 1e-2 for float16, 5e-2 for bfloat16 (1e-9 for float64): cached, batched and full passes reorder the
same float sums, which moves a logit by a few units in the last place of every layer it passes through, far
below ε, while a wrong cache, position or mask moves it by a sizeable part of the logit scale. Logits must
agree to ε·max|z|, hidden states to ε·‖h‖. A logit error of ε·max|z| moves every log-probability by at most
2ε·max|z|/T, so a metric must agree to ε · max(1, 4·max|z|/T) · (1 + |v|), |v| its largest magnitude (which
makes the bound relative for large values: NLL, rank_shift, amp). The perturbed model of int8 gets
ε ≥ 4/127: bitsandbytes quantizes its activations per token in float16, so a last-bit difference upstream can
flip an activation by one int8 step (1/127 of its row's largest value), in several layers. A check made of
several quantities reports the one furthest beyond (or closest to) its own tolerance, and names it.

A spec whose perturbation raises fails every check that applies to it, with the one-line reason; the other
specs still run. int8/nf4 are n/a where bitsandbytes is missing or cannot run on the device; a default spec
that does not fit the model (a drop of every layer, an N:M wider than a linear) is n/a with the reason.
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from engine.errors import HieruiError, one_line
from engine.perturb.pair import mapped_hidden
from engine.perturb.spec import Spec, parse_spec
from engine.record.methods import identity, self_check_specs
from engine.record.settings import StepSettings
from engine.run import metrics as M

# none first, then each family's (Method.self_check, engine.record.methods.self_check_specs)
DEFAULT_SPECS = self_check_specs()
CHECKS = ("zero", "cache", "batch", "sharing", "sparsity")
DEFAULT_STEPS = 8
CALIB_SAMPLES = 8  # the small default calibration of a self-check: it tests the code paths, not the quality
CALIB_LENGTH = 64
TEMPERATURE = 1.0
TOPK = 5
# raw prompts (no chat template) of clearly different lengths in any tokenizer, and per prompt its choices:
# two, three, and none, so the batched subspace metrics see rows of different widths
PROMPTS = (
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "The capital of France is",
    "Hi",
)
CHOICES = (("A", "B"), ("yes", "no", "maybe"), None)
REL_TOLERANCE = {"float32": 1e-4, "float64": 1e-9, "float16": 1e-2, "bfloat16": 5e-2}

# the identity value of every field of a step record of `none` (engine.run.stepper, engine.run.metrics)
_ZERO = frozenset(
    {"kl", "kl_est", "js", "tv", "dp", "rank_shift", "emb_rel", "emb_perp", "logit_rel", "sub_kl", "cum_kl"}
    | {"cum_nll_gap"}
)
_ONE = frozenset(
    {"emb_cos", "emb_cos_est", "logit_cos", "prob_cos", "prob_cos_est", "top1_agree", "topk_overlap", "sub_cos"}
    | {"sub_agree"}
)
_FALSE = frozenset({"emb_cos_est_oor", "prob_cos_est_oor"})
_NULL = frozenset({"amp", "first_divergence"})
_TRUE = frozenset({"same_token"})
_EQUAL = (("nll_d", "nll_p"), ("sub_p_d", "sub_p_p"), ("token_d", "token_p"), ("text_d", "text_p"))
_EQUAL += (("topk_d", "topk_p"), ("end_d", "end_p"))
_NOT_COMPARED = frozenset({"step", "fed"})

Progress = Callable[[str, int, int], None]


# ------------------------------------------------------------------ results


@dataclass
class CheckResult:
    """One check of one spec. `value` is the measured deviation (None where nothing was measured),
    `tolerance` the most it may be, `measure` what the value is (a metric's name, "logits", "62.1% shared"),
    `reason` why it failed or does not apply (or what it compared)."""

    spec: str
    check: str
    status: str  # "pass" | "fail" | "n/a"
    value: float | None = None
    tolerance: float | None = None
    reason: str = ""
    measure: str = ""

    def to_dict(self) -> dict:
        out = asdict(self)
        for key in ("value", "tolerance"):  # JSON has no inf or nan: null, and the reason says why
            if out[key] is not None and not math.isfinite(out[key]):
                out[key] = None
        return out


@dataclass
class SelfCheckReport:
    """Every check of every spec, and what they ran on."""

    model: str
    display: str
    device: str
    dtype: str
    architecture: dict
    steps: int
    calibration: dict
    results: list[CheckResult] = field(default_factory=list)
    seconds: float = 0.0
    spec_seconds: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not any(r.status == "fail" for r in self.results)

    @property
    def specs(self) -> list[str]:
        return list(dict.fromkeys(r.spec for r in self.results))

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "display": self.display,
            "device": self.device,
            "dtype": self.dtype,
            "architecture": self.architecture,
            "steps": self.steps,
            "calibration": self.calibration,
            "tolerance_rule": tolerance_rule(self.dtype),
            "ok": self.ok,
            "seconds": round(self.seconds, 3),
            "results": [r.to_dict() for r in self.results],
        }


def dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def rel_tolerance(dtype) -> float:
    """ε of the tolerance rule for a model running in `dtype` (module docstring)."""
    return REL_TOLERANCE.get(dtype_name(dtype), REL_TOLERANCE["bfloat16"])


FLOOR_FACTOR = 4.0  # a quantized model's batch tolerance: this many times its kernels' own noise (batch_floor)


def _incremental_pass(
    model, prompt: list[int], fed: list[int], device, rows: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' own incremental decoding, no hierui code: the prompt in one call through a fresh
    DynamicCache, then each fed token alone. The hidden states (n, L+1, H) and logits (n, V) at the last
    position of each call, n = len(fed) + 1 (of the first row, with `rows` identical rows in the batch)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    hidden, logits = [], []
    with torch.no_grad():
        for ids in [prompt] + [[t] for t in fed]:
            out = model(
                input_ids=torch.tensor([ids] * rows, device=device),
                cache=cache,
                use_cache=True,
                output_hidden_states=True,
            )
            logits.append(out.logits[0, -1])
            hidden.append(torch.stack([h[0, -1].to(out.logits.device) for h in out.hidden_states]))
    return torch.stack(hidden), torch.stack(logits)


def batch_floor(pair, steps: int, runs: dict | None = None) -> float:
    """int8/nf4 only (0 otherwise): how far the quantized kernels alone move the perturbed model's outputs
    when the same tokens are computed in calls with another number of rows, with no hierui code: transformers'
    own incremental decoding of a prompt in a batch of as many identical rows as the check steps against alone,
    and a full pass over the prompt against passes over its first k tokens (the same numbers in exact
    arithmetic). bitsandbytes' CPU nf4 kernel, for one, computes a call of a few rows otherwise than one of
    many, so batched rows (padded to the longest prompt) and single ones differ by that much before hierui does
    anything; the batch check's tolerance for the perturbed model is FLOOR_FACTOR times it."""
    if pair.spec.family != "quant":
        return 0.0
    runs = {} if runs is None else runs
    if "batch floor" not in runs:
        stepper, records, _calls = _alone(pair, 0, steps, runs)
        prompt, fed = list(stepper.prompt_ids), [r["fed"][1] for r in records[:-1]]
        device = stepper.batch.device
        _h, one = _incremental_pass(pair.perturbed, prompt, fed, device)
        _h, two = _incremental_pass(pair.perturbed, prompt, fed, device, rows=len(PROMPTS))
        scale = float(one.float().abs().max())
        floor = _rel(two, one, scale)
        _h, whole = _full_pass(pair.perturbed, prompt, device)
        for k in sorted({1, 2, 3, 5, 8} & set(range(1, len(prompt)))):
            _h, part = _full_pass(pair.perturbed, prompt[:k], device)
            floor = max(floor, _rel(part, whole[:k], scale))
        runs["batch floor"] = floor
    return runs["batch floor"]


def kernel_dtype(pair) -> str:
    """The precision the perturbed model's quantized kernels really return, measured: a quantized linear's
    outputs for random inputs that are all exactly bfloat16 (or float16) values mean the kernel rounds to that
    precision whatever the model's dtype (bitsandbytes' CPU nf4 kernel does, for a float32 model); else the
    model's own dtype."""
    own = dtype_name(pair.dense.get_input_embeddings().weight.dtype)
    if pair.spec.family != "quant":
        return own
    module = next((m for m in pair.perturbed.modules() if type(m).__module__.startswith("bitsandbytes")), None)
    if module is None or not hasattr(module, "in_features"):
        return own
    weight = pair.dense.get_input_embeddings().weight
    x = torch.randn(4, module.in_features, generator=torch.Generator().manual_seed(0)).to(weight.device, weight.dtype)
    with torch.no_grad():
        out = module(x)
    if out.dtype == torch.float32:
        for name, narrow in (("bfloat16", torch.bfloat16), ("float16", torch.float16)):
            if bool((out == out.to(narrow).float()).all()):
                return name
    return own


def side_tolerance(pair, side: str, floor: float = 0.0) -> float:
    """ε of one model of a pair: the dtype's (for the perturbed model, the precision its quantized kernels
    really return: kernel_dtype), and for the perturbed model at least its method's Method.min_tolerance (int8's
    4/127: it quantizes its activations per token, so a last-bit difference can move an activation by one int8
    step)."""
    eps = rel_tolerance(pair.dense.get_input_embeddings().weight.dtype)
    if side == "perturbed" and pair.spec.family == "quant":
        eps = max(eps, rel_tolerance(kernel_dtype(pair)))
    if side == "perturbed":
        eps = max(eps, pair.spec.declared.min_tolerance)
    if side == "perturbed" and floor:
        eps = max(eps, FLOOR_FACTOR * floor)
    return eps


def _floor_note(floor: float) -> str:
    if not floor:
        return ""
    return (
        f"; the quantized kernels alone move the same tokens' outputs by {floor:.2g} in calls of another number of "
        f"rows (no hierui code): the perturbed model's tolerance is {FLOOR_FACTOR:g}× that"
    )


def metric_tolerance(eps: float, scale: float, magnitude: float, temperature: float = TEMPERATURE) -> float:
    """How far a metric of magnitude `magnitude` may move when the logits (scale max|z|) move by ε·scale."""
    return eps * max(1.0, 4.0 * scale / temperature) * (1.0 + magnitude)


def tolerance_rule(dtype) -> str:
    eps = rel_tolerance(dtype)
    return (
        f"{dtype_name(dtype)}: ε = {eps:g}; logits within ε·max|z|, hidden states within ε·‖h‖, each metric within "
        f"ε·max(1, 4·max|z|/T)·(1 + |value|) (int8's perturbed model: ε ≥ 4/127); zero and sharing exact; "
        f"sparsity exact per comparison group; int8/nf4: the perturbed model's cache reference is transformers' own "
        f"incremental decoding, its ε that of the precision its kernels return (bitsandbytes' CPU nf4: bfloat16) and "
        f"at least {FLOOR_FACTOR:g}× the kernels' own noise (batch_floor)"
    )


def architecture(model) -> dict:
    """engine.record.architecture.describe of the model's config, with its class and parameter count."""
    from engine.record.architecture import describe

    return {
        **describe(model.config),
        "class": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
    }


# ------------------------------------------------------------------ running


def run_selfcheck(
    loaded,
    specs: list[str] | None = None,
    steps: int = DEFAULT_STEPS,
    calib_options: dict | None = None,
    use_cache: bool = False,
    progress: Progress | None = None,
) -> SelfCheckReport:
    """Every check (CHECKS) of every spec (default DEFAULT_SPECS) on `loaded` (engine.models.loading.LoadedModel)."""
    say = progress or (lambda *_: None)
    started = time.perf_counter()
    calib = {"samples": CALIB_SAMPLES, "length": CALIB_LENGTH, **(calib_options or {})}
    report = SelfCheckReport(
        model=loaded.ref.name,
        display=loaded.ref.display,
        device=str(loaded.device),
        dtype=dtype_name(loaded.dtype),
        architecture=architecture(loaded.model),
        steps=steps,
        calibration=calib,
    )
    calibration: list = []  # built once, on the first spec that needs it: [Calibration] or [exception]
    # gc.collect() after each spec frees that spec's pair (cycles included) before the next is built. Everything
    # that existed before the first spec (the dense model, the libraries: hundreds of thousands of objects) is
    # frozen meanwhile (gc.freeze), so each collection scans only what the specs made: milliseconds instead of a
    # pass over the whole heap per spec, and the same garbage freed. Unfrozen afterwards; left alone where the
    # caller has frozen objects of its own.
    freeze = gc.get_freeze_count() == 0
    if freeze:
        gc.freeze()
    try:
        for text in specs or DEFAULT_SPECS:
            spec = parse_spec(text) if isinstance(text, str) else text
            t0 = time.perf_counter()
            report.results.extend(_check_spec(loaded, spec, steps, calib, calibration, use_cache, say))
            report.spec_seconds[str(spec)] = round(time.perf_counter() - t0, 3)
            gc.collect()
            if loaded.device.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        if freeze:
            gc.unfreeze()
    report.seconds = time.perf_counter() - started
    return report


def applies(spec: Spec, check: str) -> str | None:
    """None when `check` applies to `spec`, else why not."""
    if check == "zero" and not spec.declared.identity:
        return f"only for {identity().name}"
    if check == "sparsity" and spec.family != "prune":
        return "pruning specs only"
    if check == "sharing" and not spec.declared.shares:
        return "a checkpoint is loaded from elsewhere: it shares nothing by design"
    return None


def _check_spec(loaded, spec: Spec, steps: int, calib: dict, calibration: list, use_cache: bool, say) -> list:
    name = str(spec)

    def every(status: str, reason: str) -> list[CheckResult]:
        return [
            CheckResult(name, c, "n/a" if applies(spec, c) else status, reason=applies(spec, c) or reason)
            for c in CHECKS
        ]

    unfit = _does_not_fit(spec, loaded.model)
    if unfit:
        return every("n/a", f"does not apply to this model: {unfit}")
    unstreamable = _does_not_stream(spec, loaded.model)
    if unstreamable:
        return every("n/a", unstreamable)
    if spec.family == "quant":
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None:
            return every("n/a", "bitsandbytes is not installed")
    say(f"perturbing: {name}", 0, 0)
    before = _fingerprint(loaded.model)
    try:
        given = None
        if spec.needs_calibration:
            given = _calibration(loaded, calib, calibration, use_cache, say)
        pair = _perturb(loaded, spec, given, use_cache, say)
    except KeyboardInterrupt:
        raise
    except Exception as e:  # the perturbation itself failed: a fail of every check, the other specs go on
        if spec.family == "quant" and isinstance(e, HieruiError) and "bitsandbytes" in str(e):
            return every("n/a", one_line(e))  # the backend cannot run here (engine.perturb.quant says so)
        return every("fail", f"the perturbation failed: {one_line(e)}")
    return _run_checks(pair, spec, steps, before, say)


def _run_checks(pair, spec: Spec, steps: int, before: dict, say) -> list[CheckResult]:
    """Every check of CHECKS on `pair`: n/a where it does not apply, fail with the reason where it raises."""
    name = str(spec)
    alone: dict = {}  # the prompts stepped one at a time, shared by the cache and the batch checks
    runs = {
        "zero": lambda: check_zero(pair, steps),
        "cache": lambda: check_cache(pair, steps, alone),
        "batch": lambda: check_batch(pair, steps, alone),
        "sharing": lambda: check_sharing(pair, before),
        "sparsity": lambda: check_sparsity(pair),
    }
    out = []
    todo = [c for c in CHECKS if not applies(spec, c)]
    for check in CHECKS:
        why = applies(spec, check)
        if why:
            out.append(CheckResult(name, check, "n/a", reason=why))
            continue
        say(f"checking {name}", todo.index(check), len(todo))
        try:
            result = runs[check]()
        except KeyboardInterrupt:
            raise
        except Exception as e:
            result = CheckResult(name, check, "fail", reason=f"the check raised {one_line(e)}")
        result.spec, result.check = name, check
        if result.status == "fail" and check in ("cache", "batch"):
            result.reason += spec.declared.tolerance_note
        out.append(result)
    say(f"checking {name}", len(todo), len(todo))
    return out


def _does_not_stream(spec: Spec, model) -> str | None:
    """Why `spec` cannot run on `model` when its layers are streamed (--gpu-mem below the pair), else None."""
    from engine.perturb.spec import check_streamable
    from engine.place.streaming import is_streamed

    if not is_streamed(model):
        return None
    try:
        check_streamable([spec])
    except HieruiError as e:
        return str(e)
    return None


def _does_not_fit(spec: Spec, model) -> str | None:
    from engine.perturb.spec import check_fits

    try:
        check_fits(spec, model.config.to_dict())
    except HieruiError as e:
        return str(e)
    return None


def _calibration(loaded, calib: dict, calibration: list, use_cache: bool, say):
    if not calibration:
        from engine.perturb.calibration import build_calibration

        try:
            calibration.append(
                build_calibration(loaded, use_cache=use_cache, progress=lambda d, t: say("calibrating", d, t), **calib)
            )
        except KeyboardInterrupt:
            raise
        except Exception as e:
            calibration.append(e)
    if isinstance(calibration[0], Exception):
        raise HieruiError(f"calibration failed: {one_line(calibration[0])}", 1)
    return calibration[0]


def _perturb(loaded, spec: Spec, calibration, use_cache: bool, say):
    from engine.run.open import PairRequest, open_pair

    request = PairRequest(loaded.ref.name, use_cache=use_cache)
    return open_pair(request, spec, dense=loaded, calibration=calibration, progress=say)


# ------------------------------------------------------------------ helpers


def _worst(spec: str, check: str, parts: list[tuple[str, float, float]], note: str = "") -> CheckResult:
    """A check made of (measure, deviation, tolerance) parts: the one furthest beyond its tolerance decides."""

    def ratio(part):
        _, dev, tol = part
        if math.isnan(dev):
            return math.inf
        if tol <= 0:
            return math.inf if dev > 0 else 0.0
        return dev / tol

    if not parts:
        return CheckResult(spec, check, "fail", reason="nothing was compared")
    measure, dev, tol = max(parts, key=ratio)
    ok = all(ratio(p) <= 1.0 for p in parts)
    reason = note or (f"worst: {measure}" if ok else f"{measure} deviates by {dev:.3g} (tolerance {tol:.3g})")
    return CheckResult(spec, check, "pass" if ok else "fail", dev, tol, reason, measure)


def _numbers(value) -> list[float | None] | None:
    """A field as a flat list of numbers (None for null), or None when it is not numeric."""
    if value is None:
        return [None]
    if isinstance(value, (bool, int, float)):
        return [float(value)]
    if isinstance(value, list) and all(v is None or isinstance(v, (bool, int, float)) for v in value):
        return [None if v is None else float(v) for v in value]
    return None


def _dev(a, b) -> float:
    """Largest |a_i − b_i| of two fields; null against null is 0, null against a number or a shape change inf."""
    from engine.run.rerun import max_abs

    return max_abs(_numbers(a), _numbers(b))


def _magnitude(*values) -> float:
    """The largest finite |v| in some fields (0 if none)."""
    found = [abs(x) for v in values for x in (_numbers(v) or []) if x is not None and math.isfinite(x)]
    return max(found, default=0.0)


def _settings(mode: str, steps: int, choices) -> StepSettings:
    return StepSettings(
        mode=mode,
        temperature=TEMPERATURE,
        max_new_tokens=steps,
        choices=list(choices) if choices else None,
        raw=True,
        topk=TOPK,
    ).validate()


def _spy(batch, pair) -> dict[int, list]:
    """Record what each model's forward passes return inside a (Batch)Stepper: {id(model): [(hidden, logits)]}."""
    calls: dict[int, list] = {id(pair.dense): [], id(pair.perturbed): []}
    original = batch._forward

    def spy(model, ids, cache, **kwargs):
        hidden, logits = original(model, ids, cache, **kwargs)
        calls.setdefault(id(model), []).append((hidden.detach(), logits.detach()))
        return hidden, logits

    batch._forward = spy
    return calls


def _chunks(prompt_len: int) -> int:
    from engine.run.stepper import PREFILL_CHUNK

    return max(1, math.ceil(prompt_len / PREFILL_CHUNK))


def _step_outputs(calls: list, prompt_len: int, n_steps: int, row: int = 0) -> list[tuple]:
    """The (hidden (L+1, H), logits (V,)) each step was computed from: the last prefill pass, then one pass per
    step (none after the last step)."""
    first = _chunks(prompt_len) - 1
    if len(calls) < first + n_steps:
        raise HieruiError(f"the stepper made {len(calls)} forward passes for {n_steps} steps", 1)
    return [(calls[first + i][0][row], calls[first + i][1][row]) for i in range(n_steps)]


def _rel(a: torch.Tensor, b: torch.Tensor, scale: float) -> float:
    return float((a.float() - b.float()).abs().max()) / max(scale, 1e-30)


# ------------------------------------------------------------------ 1. zero


def check_zero(pair, steps: int) -> CheckResult:
    """`none`: every field of every step at its identity value, identical tokens (free mode)."""
    from engine.run.stepper import Stepper

    spec = str(pair.spec)
    stepper = Stepper(pair, PROMPTS[0], _settings("free", steps, CHOICES[0]))
    stepper.batch.eos = set()  # every step compared (engine.run.stepper: an empty set never ends a run)
    records = stepper.run()
    worst, where, unchecked = 0.0, "", set()

    def seen(dev: float, field_name: str, step: int) -> None:
        nonlocal worst, where
        if dev > worst or (math.isnan(dev) and not math.isnan(worst)):
            worst, where = dev, f"{field_name} at step {step + 1}"

    paired = {a for pair_ in _EQUAL for a in pair_}
    for r in records:
        i = r["step"]
        for key, value in r.items():
            if key in _ZERO:
                seen(_dev(value, [0.0] * len(_numbers(value) or [0]) if isinstance(value, list) else 0.0), key, i)
            elif key in _ONE:
                seen(_dev(value, [1.0] * len(_numbers(value) or [0]) if isinstance(value, list) else 1.0), key, i)
            elif key in _FALSE:
                flags = value if isinstance(value, list) else [value]
                seen(0.0 if all(v is False for v in flags) else math.inf, key, i)
            elif key in _NULL:
                seen(0.0 if value is None else math.inf, key, i)
            elif key in _TRUE:
                seen(0.0 if value is True else math.inf, key, i)
            elif key in paired or key in _NOT_COMPARED:
                continue
            else:
                unchecked.add(key)
        for a, b in _EQUAL:
            if a in r or b in r:
                same = r.get(a) == r.get(b)
                numeric = _dev(r.get(a), r.get(b)) if a.startswith(("nll", "sub_p")) else None
                seen(numeric if numeric is not None else (0.0 if same else math.inf), f"{a} vs {b}", i)
        fed = r.get("fed") or [None, None]
        seen(0.0 if fed[0] == fed[1] else math.inf, "fed", i)
    note = f"{len(records)} steps, free mode"
    if unchecked:
        note += f"; fields with no identity value, not checked: {', '.join(sorted(unchecked))}"
    if worst == 0.0:
        return CheckResult(spec, "zero", "pass", 0.0, 0.0, note, "every field")
    return CheckResult(spec, "zero", "fail", worst, 0.0, f"{where} is {worst:.3g} from its identity value", where)


# ------------------------------------------------------------------ 2. cache


@torch.no_grad()
def _full_pass(model, ids: list[int], device) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass over `ids` without a cache: hidden states (T, L+1, H) and logits (T, V)."""
    out = model(input_ids=torch.tensor([ids], device=device), use_cache=False, output_hidden_states=True)
    logits = out.logits[0]
    hidden = torch.stack([h[0].to(logits.device) for h in out.hidden_states], dim=1)
    return hidden, logits


def _alone(pair, index: int, steps: int, runs: dict | None) -> tuple:
    """(stepper, records, forward-pass outputs) of PROMPTS[index] stepped alone in shared mode; kept in `runs`
    (one dict per pair), so the cache and the batch checks step it once."""
    from engine.run.stepper import Stepper

    runs = {} if runs is None else runs
    if (index, steps) not in runs:
        stepper = Stepper(pair, PROMPTS[index], _settings("shared", steps, CHOICES[index]))
        stepper.batch.eos = set()  # to the step limit (engine.run.stepper: an empty set never ends a run)
        calls = _spy(stepper.batch, pair)
        runs[index, steps] = (stepper, stepper.run(), calls)
    return runs[index, steps]


def check_cache(pair, steps: int, runs: dict | None = None) -> CheckResult:
    """KV-cached stepping against one full forward pass of each model over the same tokens."""
    spec = str(pair.spec)
    stepper, records, calls = _alone(pair, 0, steps, runs)
    n = len(records)
    prompt = list(stepper.prompt_ids)
    device = stepper.batch.device
    eps = {side: side_tolerance(pair, side) for side in ("dense", "perturbed")}
    positions = torch.arange(len(prompt) - 1, len(prompt) - 1 + n)
    quantized = pair.spec.family == "quant"
    floor = 0.0
    parts: list[tuple[str, float, float]] = []
    full = {}
    scale = 0.0
    for side, model, index in (("dense", pair.dense, 0), ("perturbed", pair.perturbed, 1)):
        fed = [r["fed"][index] for r in records[:-1]]
        hidden, logits = _full_pass(model, prompt + fed, device)
        hidden, logits = hidden[positions.to(hidden.device)], logits[positions.to(logits.device)]
        if quantized and side == "perturbed":
            # bitsandbytes computes one token per call (a cached step) otherwise than many (a full pass), so
            # the reference is transformers' own incremental decoding through the same kernels; how far that
            # is from the full pass is the kernels' floor, reported
            h_full, z_full = hidden, logits
            hidden, logits = _incremental_pass(model, prompt, fed, device)
            delta = (hidden.float() - h_full.float()).norm(dim=-1) / h_full.float().norm(dim=-1).clamp_min(1e-30)
            floor = max(float(delta.max()), _rel(logits, z_full, float(z_full.float().abs().max())))
        full[side] = (hidden, logits)
        cached = _step_outputs(calls[id(model)], len(prompt), n)
        z_cached = torch.stack([z for _, z in cached]).to(logits.device)
        h_cached = torch.stack([h for h, _ in cached]).to(hidden.device)
        side_scale = float(logits.float().abs().max())
        scale = max(scale, side_scale)
        parts.append((f"{side} logits (relative)", _rel(z_cached, logits, side_scale), eps[side]))
        if h_cached.shape != hidden.shape:
            shapes = f"{tuple(h_cached.shape)} vs {tuple(hidden.shape)}"
            parts.append((f"{side} hidden states: shape {shapes}", math.inf, eps[side]))
        else:
            delta = (h_cached.float() - hidden.float()).norm(dim=-1) / hidden.float().norm(dim=-1).clamp_min(1e-30)
            parts.append((f"{side} hidden states (relative)", float(delta.max()), eps[side]))
    (hd, zd), (hp, zp) = full["dense"], full["perturbed"]
    mapping = torch.tensor(pair.hidden_map, dtype=torch.long, device=hp.device)
    cids = torch.tensor(stepper.choice_ids, dtype=torch.long, device=zd.device) if stepper.choice_ids else None
    recomputed = M.to_host(
        M.step_metrics(
            hd,
            mapped_hidden(hd, hp.to(hd.device), mapping.to(hd.device)),
            zd,
            zp.to(zd.device),
            torch.tensor([r["fed"][0] for r in records], device=zd.device),
            torch.tensor([r["fed"][1] for r in records], device=zd.device),
            temperature=TEMPERATURE,
            k=TOPK,
            choice_ids=cids,
        )
    )
    parts.extend(_metric_parts(records, recomputed, max(eps.values()), scale))
    result = _worst(spec, "cache", parts)
    result.reason = f"{n} steps, shared mode; " + result.reason
    if quantized:
        result.reason += (
            f"; the perturbed model against transformers' own incremental decoding (the quantized kernels compute "
            f"one token per call otherwise than many: that decoding is {floor:.2g} from a full pass)"
        )
    return result


def _metric_parts(records: list[dict], recomputed: list[dict], eps: float, scale: float) -> list[tuple]:
    """(metric, max |Δ| over the steps, its tolerance) of every metric recomputed from the full pass."""
    devs: dict[str, float] = {}
    mags: dict[str, float] = {}
    for record, host in zip(records, recomputed):
        for key, value in host.items():
            if key.endswith("_ids"):
                continue
            if key in ("topk_d_probs", "topk_p_probs"):
                name = key.removesuffix("_probs")
                stored = [row[2] for row in record.get(name) or []]
            else:
                name, stored = key, record.get(key, "missing")
            dev = math.inf if stored == "missing" else _dev(stored, value)
            devs[name] = max(devs.get(name, 0.0), dev)
            mags[name] = max(mags.get(name, 0.0), _magnitude(stored if stored != "missing" else None, value))
    return [(f"metric {k}", devs[k], metric_tolerance(eps, scale, mags[k])) for k in devs]


# ------------------------------------------------------------------ 3. batch


def check_batch(pair, steps: int, runs: dict | None = None) -> CheckResult:
    """BatchStepper over PROMPTS against a Stepper on each."""
    from engine.run.rerun import deviations
    from engine.run.stepper import BatchStepper

    spec = str(pair.spec)
    floor = batch_floor(pair, steps, runs)
    eps = {side: side_tolerance(pair, side, floor) for side in ("dense", "perturbed")}
    settings = _settings("shared", steps, None)
    batch = BatchStepper(pair, list(PROMPTS), settings, choices=[list(c) if c else None for c in CHOICES])
    batch.eos = set()  # to the step limit (engine.run.stepper: an empty set never ends a run)
    batch_calls = _spy(batch, pair)
    batched = batch.run()
    width = max(len(r.ids) for r in batch.rows)
    parts: list[tuple[str, float, float]] = []
    notes: list[str] = []
    for b in range(len(PROMPTS)):
        single, records, calls = _alone(pair, b, steps, runs)
        row = batched[b]
        if single.prompt_ids != batch.rows[b].ids:
            parts.append((f"prompt {b + 1} tokenized differently", math.inf, 0.0))
            continue
        if len(records) != len(row):
            parts.append((f"prompt {b + 1}: {len(row)} steps batched, {len(records)} alone", math.inf, 0.0))
        n = min(len(records), len(row))
        logits, scale = {}, 0.0
        for side, model in (("dense", pair.dense), ("perturbed", pair.perturbed)):
            alone = _step_outputs(calls[id(model)], len(single.prompt_ids), n)
            together = _step_outputs(batch_calls[id(model)], width, n, row=b)
            z1 = torch.stack([z for _, z in alone]).float()
            z2 = torch.stack([z for _, z in together]).float().to(z1.device)
            logits[side] = (z1, z2, float(z1.abs().max()))
            scale = max(scale, logits[side][2])
        split, problem = _token_split(records[:n], row[:n], logits, eps)
        if problem:
            parts.append((f"prompt {b + 1}: {problem}", math.inf, 0.0))
        elif split < n:
            notes.append(f"prompt {b + 1} split at step {split + 1} on a near tie")
        for side, (z1, z2, side_scale) in logits.items():  # up to the split: the same inputs until then
            rel = _rel(z2[: split + 1], z1[: split + 1], side_scale)
            parts.append((f"prompt {b + 1} {side} logits (relative)", rel, eps[side]))
        for name, dev in deviations(records[:split], row[:split]).items():
            mag = _magnitude(*(r.get(name) for r in records[:split] if name not in ("topk_d", "topk_p")))
            parts.append((f"prompt {b + 1} metric {name}", dev, metric_tolerance(max(eps.values()), scale, mag)))
    result = _worst(spec, "batch", parts)
    lengths = "/".join(str(len(r.ids)) for r in batch.rows)
    said = "; ".join([f"{len(PROMPTS)} prompts of {lengths} tokens, {steps} steps", *notes, result.reason])
    result.reason = said + _floor_note(floor)
    return result


def _near_tie(z: torch.Tensor, a: int, b: int, tol: float) -> bool:
    """Whether tokens `a` and `b` are within `tol` of each other in the logits `z` (V,)."""
    return abs(float(z[a]) - float(z[b])) <= tol


def _token_split(alone: list[dict], together: list[dict], logits: dict, eps: dict) -> tuple[int, str]:
    """(the first step whose dense token differs, or the step count; a problem, or "").

    A token that differs where its two candidates are a near tie (within 2ε·max|z| in either run's logits: each
    may move by ε·max|z|) is float noise: the runs are compared up to that step. Elsewhere it is a problem. A
    perturbed token that differs on a near tie changes nothing fed (shared mode) and is ignored."""
    for i, (a, b) in enumerate(zip(alone, together)):
        for key, side in (("token_p", "perturbed"), ("token_d", "dense")):
            if a[key] == b[key]:
                continue
            z1, z2, scale = logits[side]
            tol = 2.0 * eps[side] * scale
            if not (_near_tie(z1[i], a[key], b[key], tol) or _near_tie(z2[i], a[key], b[key], tol)):
                gap = abs(float(z1[i][a[key]]) - float(z1[i][b[key]]))
                return i, f"{side} tokens differ at step {i + 1} (logit gap {gap:.3g}, a near tie is ≤ {tol:.3g})"
            if key == "token_d":
                return i, ""
        if a.get("fed") != b.get("fed") and a["token_d"] == b["token_d"]:
            return i, f"fed tokens differ at step {i + 1}"
    return len(alone), ""


# ------------------------------------------------------------------ 4. sharing


def _storage(t) -> int:
    return t.untyped_storage().data_ptr()


_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}  # an integer type per element size


def _fingerprint(model) -> dict[str, tuple[int, int]]:
    """Per parameter, the sums (in int64, exact: no rounding, the same whatever the summation order) of its
    elements' bit patterns read as integers, and of the same with the sign bit cleared (the bits of |w|): any
    in-place change of one weight changes the first (by its bit pattern's difference, never 0), a sign flip
    changes the first, and zeroing nonzero weights (pruning in place) lowers the second (float64 parameters: both
    sums wrap modulo 2⁶⁴). Several times faster than float64 sums of w and |w|, which a change below their
    rounding could pass unseen."""
    out = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.is_floating_point() and p.device.type != "meta":
                kind = _BITS[p.element_size()]
                bits = p.detach().view(kind)
                magnitude = bits.bitwise_and(torch.iinfo(kind).max)
                out[name] = (int(bits.sum(dtype=torch.int64)), int(magnitude.sum(dtype=torch.int64)))
    return out


def _must_replace(pair) -> set[int]:
    """Storages of the dense model the perturbation must replace (empty for none and drops)."""
    family = pair.spec.family
    if family not in ("prune", "quant"):
        return set()
    dense_ptrs = {_storage(p) for p in pair.dense.parameters()}
    found = set()
    for label, matrix, owner in weight_views(pair.dense):
        ptr = _storage(owner if owner is not None else matrix)
        if ptr not in dense_ptrs:
            raise HieruiError(f"cannot tell which parameter holds {label} (its matrix is a copy)", 1)
        found.add(ptr)
    if not found:
        raise HieruiError("no prunable matrix found in the dense model", 1)
    return found


def check_sharing(pair, before: dict) -> CheckResult:
    """Every tensor the spec need not change is the dense model's own; those it must change are not; the dense
    model itself is unchanged."""
    from engine.perturb.pair import shared_fraction

    spec = str(pair.spec)
    must = _must_replace(pair)
    dense_by_name = {n: _storage(p) for n, p in pair.dense.named_parameters()}
    dense_ptrs = set(dense_by_name.values())
    total = wrong = 0
    copied, kept = [], []
    seen: set[int] = set()
    for name, p in pair.perturbed.named_parameters():
        ptr = _storage(p)
        if ptr in seen:
            continue
        seen.add(ptr)
        nbytes = p.untyped_storage().nbytes()
        total += nbytes
        if ptr in dense_ptrs:
            if ptr in must:
                kept.append(name)
                wrong += nbytes
        elif dense_by_name.get(name) not in must:  # a new tensor that does not stand for a replaced one
            copied.append(name)
            wrong += nbytes
    after = _fingerprint(pair.dense)
    changed = [n for n, v in before.items() if after.get(n) != v]
    fraction = shared_fraction(pair.dense, pair.perturbed)
    measure = f"{fraction:.2%} shared"
    problems = []
    if copied:
        problems.append(f"{len(copied)} tensors copied that the spec does not change ({_names(copied)})")
    if kept:
        problems.append(f"{len(kept)} tensors it must replace still the dense ones ({_names(kept)})")
    if changed:
        problems.append(f"the dense model changed in place: {_names(changed)}")
    value = wrong / total if total else 0.0
    if changed and not value:
        value = math.inf
    if problems:
        return CheckResult(spec, "sharing", "fail", value, 0.0, "; ".join(problems), measure)
    replaced = "no tensor replaced" if not must else f"{len(must)} tensors replaced"
    return CheckResult(spec, "sharing", "pass", 0.0, 0.0, f"{measure} of the parameter bytes, {replaced}", measure)


def _names(names: list[str], shown: int = 3) -> str:
    more = f", … {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


# ------------------------------------------------------------------ 5. sparsity


def weight_views(model) -> list[tuple[str, torch.Tensor, torch.Tensor | None]]:
    """(label, matrix [out, in], the parameter holding it or None) of every prunable matrix:
    engine.anatomy.linears.model_weight_views where it exists, else the decoder linears' 2-D weights."""
    from engine.anatomy import linears

    views = getattr(linears, "model_weight_views", None)
    if views is not None:
        out = []
        for v in views(model):
            expert = getattr(v, "expert", None)
            label = f"layer {v.layer} {v.name}"
            if expert is not None and f"[{expert}]" not in v.name:
                label += f" expert {expert}"
            owner = next(
                (
                    getattr(v, a)
                    for a in ("parameter", "param", "weight", "tensor")
                    if isinstance(getattr(v, a, None), torch.Tensor)
                ),
                None,
            )
            out.append((label, v.matrix(), owner))
        return out
    out = []
    for i, layer in enumerate(linears.decoder_layers(model)):
        for name, lin in linears.layer_linears(layer).items():
            w = lin.weight
            if torch.is_floating_point(w) and w.dim() == 2:
                out.append((f"layer {i} {name}", w, w))
    return out


def _zeros_per_group(w: torch.Tensor, spec: Spec) -> tuple[torch.Tensor, int, str]:
    """Zeros of every comparison group of `w` [out, in], the zeros the spec asks for in each, and the group."""
    zeros = w == 0
    rows, cols = w.shape
    if spec.n is not None:
        if cols % spec.m:
            raise HieruiError(f"{cols} inputs are not a multiple of M = {spec.m}", 1)
        return zeros.reshape(rows, cols // spec.m, spec.m).sum(-1).flatten(), spec.m - spec.n, f"group of {spec.m}"
    if spec.declared.per_row:
        return zeros.sum(1), int(cols * spec.sparsity), f"row of {cols}"
    return zeros.sum().reshape(1), int(w.numel() * spec.sparsity), "matrix"


def check_sparsity(pair) -> CheckResult:
    """Exactly the zeros the spec asks for, per comparison group of every prunable matrix."""
    spec_ = pair.spec
    spec = str(spec_)
    target = spec_.target_sparsity
    dense = {label: m for label, m, _ in weight_views(pair.dense)}
    views = weight_views(pair.perturbed)
    if not views:
        return CheckResult(spec, "sparsity", "fail", reason="no prunable matrix found in the perturbed model")
    worst = allowance = 0.0
    failures = []
    measure = ""
    for label, matrix, _ in views:
        w = matrix.detach()
        if label not in dense:
            failures.append(f"{label} has no dense counterpart")
            continue
        d = dense[label].detach()
        if d.shape != w.shape:
            failures.append(f"{label}: shape {tuple(w.shape)}, dense {tuple(d.shape)}")
            continue
        got, k, group = _zeros_per_group(w, spec_)
        had, _, _ = _zeros_per_group(d, spec_)
        high = torch.clamp(had, min=k)
        bad = (got < k) | (got > high)
        numel = w.numel()
        sparsity = float(got.sum()) / numel
        if abs(sparsity - target) > worst or not measure:
            worst, measure = max(worst, abs(sparsity - target)), label
        lo, hi = k * got.numel() / numel, float(high.sum()) / numel
        allowance = max(allowance, target - lo, hi - target)
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            failures.append(
                f"{label}: {int(bad.sum())} of {got.numel()} groups off, e.g. a {group} with {int(got[i])} zeros, "
                f"wanted {k}"
            )
    if failures:
        extra = f" (+{len(failures) - 1} more matrices)" if len(failures) > 1 else ""
        return CheckResult(spec, "sparsity", "fail", worst, allowance, failures[0] + extra, measure)
    return CheckResult(
        spec, "sparsity", "pass", worst, allowance, f"{len(views)} matrices at {target:.2%}, worst {measure}", measure
    )
