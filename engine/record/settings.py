"""The one definition of how a run is stepped and calibrated: modes, defaults, bounds. Torch-free.

`StepSettings` and `CalibSettings` are frozen: a run holds the settings it started with for its whole
life, and a change (the explorer's `m`, `+`/`-`, a new prompt) makes a new value with
`dataclasses.replace`, never mutates one that a stepping thread may be reading.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

from engine.errors import HieruiError

MODES = ("shared", "free")
DEFAULT_PROMPT = "What is the capital of France?"
DEFAULT_MAX_NEW_TOKENS = 64  # the explorer
BATCH_MAX_NEW_TOKENS = 32  # a sweep: many runs
TEMPERATURE_STEP = 0.1  # the explorer's +/- keys
MIN_TEMPERATURE = 0.05  # below it softmax(z / T) overflows the metrics of a 32-bit float (1e-30 did, after a sweep)
MAX_TEMPERATURE = 100.0  # above it every distribution is near uniform and the divergences vanish (inf gave KL 0)
# The logit lens per layer (engine.run.lens), how often: "all" every step; "sampled" the steps a reader needs (every
# LENS_SAMPLE_EVERY-th step, every step whose top-1 flips, a row's first divergence), null elsewhere; "off" none.
LENS_MODES = ("all", "sampled", "off")
LENS_SAMPLE_EVERY = 4
# vocabulary entries the lens reads through the head at a time (engine.run.lens; the plan counts it): few chunks, as
# each pass over a chunk is an operation whose threads wait for each other (smaller chunks were slower on 2 cores)
LENS_CHUNK = 16384
LENS_HELP = {  # what each word computes and costs (bench/step_overhead.py, the embedded model on a CPU)
    "all": "every step (each layer of both models read out through the head: about 0.6× a step's two forwards on "
    "a CPU)",
    "sampled": f"every {LENS_SAMPLE_EVERY}th step, every top-1 flip and the first divergence, the rest null (about "
    "a quarter of all's cost where few tokens flip)",
    "off": "no lens fields (no cost)",
}


def lens_mode(value) -> str:
    """The lens mode of `value`: one of LENS_MODES; a bool as older callers and version-1 files gave it (True:
    "all", False: "off"). Another value raises one line."""
    if isinstance(value, bool):
        return "all" if value else "off"
    if isinstance(value, str) and value.strip().lower() in LENS_MODES:
        return value.strip().lower()
    raise HieruiError(f"unknown lens mode {value!r}: use {', '.join(LENS_MODES)}")


@dataclass(frozen=True)
class StepSettings:
    """How a pair is stepped: mode, the temperature of the probability space, decoding, choices, top-k."""

    mode: str = "shared"
    temperature: float = 1.0
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    sample: bool = False
    seed: int = 0
    choices: tuple[str, ...] | None = None
    raw: bool = False
    topk: int = 5
    truncate: bool = False  # a prompt that does not fit the context with max_new_tokens: keep its last tokens
    # the logit lens per layer (engine.run.lens: lens_kl, lens_top1_agree, lens_dense_final_kl): a LENS_MODES word
    # (a bool: True "all", False "off")
    lens: str = "all"
    # a flip whose dense top-1/top-2 probability margin is below this is a near tie (`near_tie`); None: the
    # model's measured noise floor (`hierui noise`, engine.run.floor.tie_margin) or the default for its dtype
    tie_margin: float | None = None
    # free mode: at the first divergence, branch, feeding the perturbed model the dense token, and record whether
    # the texts agree again (engine.run.branch); shared mode has no divergence to branch from: it does nothing there
    counterfactual: bool = False

    def __post_init__(self) -> None:
        if self.choices is not None and not isinstance(self.choices, tuple):
            object.__setattr__(self, "choices", tuple(self.choices) or None)
        if isinstance(self.lens, bool):
            object.__setattr__(self, "lens", lens_mode(self.lens))

    def validate(self) -> StepSettings:
        if self.mode not in MODES:
            raise HieruiError(f"unknown mode '{self.mode}': use shared or free")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t):
            raise HieruiError(f"temperature must be a finite number, got {t}")
        if not MIN_TEMPERATURE <= t <= MAX_TEMPERATURE:
            raise HieruiError(
                f"temperature must be between {MIN_TEMPERATURE:g} and {MAX_TEMPERATURE:g} "
                f"(where the metrics are computable), got {t:g}"
            )
        if self.max_new_tokens < 1:
            raise HieruiError(f"max new tokens must be at least 1, got {self.max_new_tokens}")
        if self.topk < 1:
            raise HieruiError(f"top-k must be at least 1, got {self.topk}")
        object.__setattr__(self, "lens", lens_mode(self.lens))
        m = self.tie_margin
        if m is not None and (isinstance(m, bool) or not isinstance(m, (int, float)) or not 0 <= m <= 1):
            raise HieruiError(f"the tie margin is a probability difference between 0 and 1, got {m}")
        return self

    def with_mode(self, mode: str) -> StepSettings:
        return replace(self, mode=mode).validate()

    def other_mode(self) -> StepSettings:
        return self.with_mode("free" if self.mode == "shared" else "shared")

    def nudged_temperature(self, direction: int) -> StepSettings:
        """T moved by one TEMPERATURE_STEP up or down (never outside MIN_TEMPERATURE … MAX_TEMPERATURE)."""
        t = round(self.temperature + TEMPERATURE_STEP * direction, 2)
        return self if not MIN_TEMPERATURE <= t <= MAX_TEMPERATURE else replace(self, temperature=t)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["choices"] = list(self.choices) if self.choices else None
        return out


def fit_context(
    prompt_tokens: int,
    max_new_tokens: int,
    context: int | None,
    truncate: bool = False,
    option: str = "--max-new-tokens",
    can_truncate: bool = True,
) -> int:
    """How many of the prompt's tokens are stepped: all of them when the prompt and `max_new_tokens` fit the
    model's context (its max_position_embeddings; None: unknown, no bound), else with `truncate` the last ones
    that fit (left truncation). A prompt that does not fit without `truncate` raises one line."""
    if not context or prompt_tokens + max_new_tokens <= context:
        return prompt_tokens
    if max_new_tokens >= context:
        raise HieruiError(
            f"{option} {max_new_tokens} does not fit the model's context of {context} tokens "
            f"with a prompt: use at most {context - 1}"
        )
    if truncate:
        return context - max_new_tokens
    hint = f", or --truncate to keep its last {context - max_new_tokens:,} tokens" if can_truncate else ""
    raise HieruiError(
        f"the prompt ({prompt_tokens:,} tokens) and {option} {max_new_tokens} exceed the model's context "
        f"of {context:,} tokens: shorten the prompt or lower {option}{hint}"
    )


# the fields a sweep takes for all its runs (mode and choices vary per run)
SWEEP_FIELDS = (
    "temperature",
    "max_new_tokens",
    "sample",
    "seed",
    "raw",
    "topk",
    "truncate",
    "lens",
    "tie_margin",
    "counterfactual",
)
BATCH_LENS = "sampled"  # a sweep's lens: the steps its report reads (the explorer computes "all", behind the stepping)
SWEEP_DEFAULTS = {
    **{k: v for k, v in StepSettings().to_dict().items() if k in SWEEP_FIELDS},
    "max_new_tokens": BATCH_MAX_NEW_TOKENS,
    "lens": BATCH_LENS,
}


def recorded_lens(value, present: bool = True) -> str:
    """The lens mode a batch.json's settings record: its word; from before the modes, true (or no `lens` key,
    `present` False: the lens was on) "all", false "off"."""
    return lens_mode(value) if present else "all"


# Calibration defaults, the one rule (default_calibration): a spec with the default calibration is the same model in
# every command (explore, prune, batch, kld, plan; a session's rerun takes what it recorded), so their caches and
# their tables agree. Each method takes CALIB_SAMPLES × CALIB_LENGTH tokens sampled from the dense model with
# CALIB_SEED, except the methods that declare quick_calibration (Wanda: its published ablation is flat from about
# 16-32 sequences), which take QUICK_CALIB_SAMPLES, so that the explorer's first start is quick on a CPU; SparseGPT's
# Hessians need more. `hierui check` takes its own, smaller calibration and says so (engine.check.selfcheck).
CALIB_SAMPLES = 64
CALIB_LENGTH = 128
CALIB_SEED = 0
QUICK_CALIB_SAMPLES = 32


@dataclass(frozen=True)
class CalibSettings:
    """Calibration: `source` None for text sampled from the dense model itself, else a text file's path."""

    source: str | None = None
    samples: int = CALIB_SAMPLES
    length: int = CALIB_LENGTH
    seed: int = CALIB_SEED

    def validate(self) -> CalibSettings:
        if self.samples < 1 or self.length < 2:
            raise HieruiError(
                f"calibration needs at least 1 sample of at least 2 tokens (got {self.samples} × {self.length})"
            )
        return self

    def to_dict(self) -> dict:
        return asdict(self)


CALIB_DEFAULTS = CalibSettings().to_dict()
CALIBRATION_FIELDS = tuple(CALIB_DEFAULTS)  # source, samples, length, seed: what a user may give


def quick_calibration_methods() -> tuple[str, ...]:
    """The methods that take QUICK_CALIB_SAMPLES by default, as they declare it (Method.quick_calibration,
    engine.record.methods)."""
    from engine.record.methods import methods

    return tuple(m.name for m in methods() if m.quick_calibration)


def default_calibration(method: str | None) -> CalibSettings:
    """The calibration a pruning `method` takes when none is asked for: the same in every command."""
    if method in quick_calibration_methods():
        return CalibSettings(samples=QUICK_CALIB_SAMPLES)
    return CalibSettings()


def calibration_for(method: str | None, **given) -> CalibSettings:
    """default_calibration with the values the user gave (source, samples, length, seed; None: the default),
    checked."""
    unknown = set(given) - set(CALIBRATION_FIELDS)
    if unknown:
        raise TypeError(f"unknown calibration settings {sorted(unknown)}")
    chosen = {k: v for k, v in given.items() if v is not None}
    return replace(default_calibration(method), **chosen).validate()


def calibrations(specs, **given) -> dict[str, dict]:
    """What a run records of its calibration, the same in batch.json and kld.json: per spec that calibrates
    (`specs`: engine.perturb.spec.Spec), its calibration_for(method, **given) as a dict."""
    return {str(s): calibration_for(s.method, **given).to_dict() for s in specs if s.needs_calibration}


def calibrations_differ(old: dict | None, new: dict | None) -> list[str]:
    """The specs both records (calibrations()) calibrate, with other settings: where they differ, one spec is two
    models. A record of another form (a batch.json of an earlier version: one flat dict) differs in every spec."""
    old, new = old or {}, new or {}
    if not all(isinstance(v, dict) for v in (*old.values(), *new.values())):
        return sorted(set(old) | set(new)) if old and new else []
    return [spec for spec in new if spec in old and old[spec] != new[spec]]


def calib_samples_help() -> str:
    """The --calib-samples help of every command that perturbs: the default per method."""
    methods = "/".join(quick_calibration_methods())
    return f"calibration sequences (default {QUICK_CALIB_SAMPLES} for {methods}, {CALIB_SAMPLES} otherwise)"


def default_batch_size(device: str) -> int:
    """Prompts stepped at once: 8 on a CPU (about 3× the tokens per second of one), 16 on a GPU."""
    import torch

    on_gpu = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    return 16 if on_gpu else 8
