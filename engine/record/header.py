"""The session header (line 1 of a session file, format `hierui-session` version 2) as one typed, frozen value.

`SessionHeader` has every field the format has, with the default a reader gets where a file lacks one (an
older or hand-written file); `SessionHeader.from_dict(obj, path)` checks a header read from a file
(engine.record.validate: one error line naming the file, the line, the field and the value) and
`to_dict()` is exactly what the writer puts on line 1: the same keys in the same order, the optional ones
(a branch's fields, `truncated_from`, `tie_margin`, `counterfactual`, `plan`, …) only when set. Readers use
the attributes; a header also reads as a mapping of its written fields (`header["mode"]`), for code that
treats it as the JSON it is.

Defaults for a field a file lacks (or holds as null): `mode` shared, `temperature` 1.0, `seed` 0, `sample`,
`raw` and `counterfactual` false, `topk` 5 (engine.record.settings.StepSettings' defaults), `prefix_ids` empty
and `start_step` 0 (not a branch), `perturbation` an empty one (its `spec` None); `lens` None (recorded
before the logit lens existed: no lens data, as opposed to "off", --lens off); every other field None (not
recorded).

Versions. Version 2 records `lens` as the mode's word (engine.record.settings.LENS_MODES: "all", "sampled",
"off"); version 1 recorded it as true/false, read here as "all"/"off" (and written back as it was, for a header
of version 1). Everything else is as in version 1.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import ClassVar

from engine.errors import HieruiError
from engine.record.settings import StepSettings, lens_mode
from engine.record.validate import (
    ARCHITECTURE,
    CALIBRATION,
    HEADER,
    PARENT,
    PERTURBATION,
    STRS,
    check_header,
    escape,
)

FORMAT = "hierui-session"
VERSION = 2  # 2: `lens` is a word (all, sampled, off), not true/false
_STEP = StepSettings()  # the defaults of how a run is stepped


def _coerced(kind: str, value):
    """A value that passed validation, in its field's Python type: integral floats as int, 0/1 as bool, lists as
    tuples (a frozen header holds no list to change)."""
    if value is None:
        return None
    if kind == "int64":
        return int(value)
    if kind == "float64":
        return float(value)
    if kind == "bool":
        return bool(value)
    if kind == STRS:
        return tuple(str(v) for v in value)
    if kind.startswith("list<"):
        return tuple(int(v) for v in value)
    if kind == "object":
        return dict(value)
    return value


def _plain(value):
    """A field's value as JSON writes it: tuples as lists, a nested part as its dict."""
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, _Part):
        return value.to_dict()
    return value


class _Part:
    """A nested object of the header (perturbation, calibration, architecture, parent), each field coerced to the
    kind its validation table (TABLE) gives it."""

    TABLE: ClassVar[dict]

    def __post_init__(self) -> None:
        for f in fields(self):
            object.__setattr__(self, f.name, _coerced(self.TABLE[f.name][0], getattr(self, f.name)))

    @classmethod
    def of(cls, value):
        """`value` as this part: itself, or the known fields of a dict (None stays None)."""
        if value is None or isinstance(value, cls):
            return value
        return cls(**{k: value[k] for k in cls.TABLE if value.get(k) is not None})

    def to_dict(self) -> dict:
        """The fields that are set, in the written order."""
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self) if getattr(self, f.name) is not None}


@dataclass(frozen=True)
class Perturbation(_Part):
    """What was done to the perturbed model: the spec and, once applied, what it measured."""

    TABLE: ClassVar[dict] = PERTURBATION
    spec: str | None = None  # None: the file names none (a rerun then needs --prune)
    measured_sparsity: float | None = None
    dense_sparsity: float | None = None
    details: dict | None = None  # method-specific (dropped layers, scores, a checkpoint's structure, …)

    def to_dict(self) -> dict:
        """{spec}, and the measurement whole (all three keys, null where unknown) when any of it is known: the
        writer records a perturbation before it is applied with its spec alone."""
        out = {} if self.spec is None else {"spec": self.spec}
        measured = (self.measured_sparsity, self.dense_sparsity, self.details)
        if any(v is not None for v in measured):
            out.update(zip(("measured_sparsity", "dense_sparsity", "details"), measured, strict=True))
        return out


@dataclass(frozen=True)
class Calibration(_Part):
    """The calibration a run used (engine.perturb.calibration.Calibration.describe())."""

    TABLE: ClassVar[dict] = CALIBRATION
    source: str | None = None  # "self" (sampled from the dense model) or a text file's path
    samples: int | None = None
    length: int | None = None
    seed: int | None = None
    from_cache: bool | None = None
    seconds: float | None = None

    @property
    def file(self) -> str | None:
        """The calibration text file it names; None when self-generated."""
        return None if self.source in (None, "self") else self.source


@dataclass(frozen=True)
class Architecture(_Part):
    """What kind of decoder the model is (engine.record.architecture.describe)."""

    TABLE: ClassVar[dict] = ARCHITECTURE
    model_type: str | None = None
    layers: int | None = None
    hidden_size: int | None = None
    heads: int | None = None
    kv_heads: int | None = None
    attention_types: tuple[str, ...] | None = None  # each layer's "full" or "sliding"; None: all full
    experts: int | None = None
    experts_per_token: int | None = None

    def to_dict(self) -> dict:
        """Every key, null where unknown, as describe() writes them."""
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}

    def summary(self) -> str:
        from engine.record.architecture import summary

        return summary(self.to_dict())


@dataclass(frozen=True)
class Parent(_Part):
    """A branch's link to the run it continues: that run's session file, the step, and the token chosen there."""

    TABLE: ClassVar[dict] = PARENT
    session: str | None = None
    step: int | None = None  # the parent's step (from 0) the chosen token replaces the perturbed model's pick at
    token: int | None = None
    text: str | None = None


PARTS = {"perturbation": Perturbation, "calibration": Calibration, "architecture": Architecture, "parent": Parent}
# keys the writer puts on every header, null or not
ALWAYS = frozenset(
    {"format", "version", "calibration", "mode", "temperature", "choices", "choice_ids", "choice_notes"}
    | {"seed", "sample", "raw", "topk"}
)
# keys written only when set (true, non-zero, non-empty); every other key is written unless it is None
WHEN_SET = frozenset({"truncated_from", "prefix_ids", "start_step", "parent", "counterfactual", "plan"})


@dataclass(frozen=True)
class SessionHeader(Mapping):
    """Line 1 of a session file; the fields in the order they are written."""

    format: str = FORMAT
    version: int = VERSION
    model: str | None = None  # the --model name (an alias, tiny-random, a path or a hub id)
    model_display: str | None = None  # how to show it (ModelRef.display)
    perturbation: Perturbation = field(default_factory=Perturbation)
    calibration: Calibration | None = None  # None: the spec took none
    prompt: str | None = None
    prompt_tokens: int | None = None
    prompt_ids: tuple[int, ...] | None = None  # what the models were fed as the prompt (a branch: its prefix too)
    truncated_from: int | None = None  # the prompt's length before --truncate cut it
    mode: str = _STEP.mode
    temperature: float = _STEP.temperature
    choices: tuple[str, ...] | None = None
    choice_ids: tuple[int, ...] | None = None
    choice_notes: tuple[str, ...] | None = None
    seed: int = _STEP.seed
    sample: bool = _STEP.sample
    max_new_tokens: int | None = None  # None: not recorded (a rerun steps as many steps as the file holds)
    raw: bool = _STEP.raw
    topk: int = _STEP.topk
    lens: str | None = None  # all, sampled or off (version 1's true/false: all/off); None: before the lens existed
    tie_margin: float | None = None  # the near-tie threshold the run used, and where it came from
    tie_margin_source: str | None = None
    prefix_ids: tuple[int, ...] = ()  # a branch: the tokens fed after the prompt before its step 0
    start_step: int = 0  # a branch: the parent's step its step 0 is
    parent: Parent | None = None  # a branch: the run it continues
    counterfactual: bool = False  # free mode: the closing line holds the branch at the first divergence
    layers: int | None = None
    architecture: Architecture | None = None
    device: str | None = None
    dtype: str | None = None
    plan: dict | None = None  # engine.run.plan's estimate made before loading (Plan.summary())
    created: str | None = None
    hierui: str | None = None  # the version that wrote it

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None and f.default is not MISSING:
                value = f.default  # null in a file, or passed as None: the field's default
            if f.name in PARTS:
                value = PARTS[f.name].of(value)
                if value is None and f.name == "perturbation":
                    value = Perturbation()
            elif f.name == "lens":
                value = None if value is None else lens_mode(value)
            else:
                value = _coerced(HEADER[f.name][0], value)
            object.__setattr__(self, f.name, value)

    @classmethod
    def from_dict(cls, obj: dict, path, line: int = 1) -> SessionHeader:
        """A header read from `path` (line `line`): every field checked (a HieruiError of one line on the first
        wrong one), the fields not declared ignored, null and absent ones at their defaults."""
        check_header(obj, path, line)
        return cls(**{f.name: obj[f.name] for f in fields(cls) if obj.get(f.name) is not None})

    def to_dict(self) -> dict:
        """The header as the writer puts it on line 1 (before JSON's NaN → null)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "perturbation":
                value = value.to_dict() or None
            if f.name == "lens" and value is not None and self.version < 2:  # version 1 wrote true/false
                value = value != "off"
            if f.name in ALWAYS or (value if f.name in WHEN_SET else value is not None):
                out[f.name] = _plain(value)
        return out

    # the written fields as a read-only mapping
    def __getitem__(self, key: str):
        return self.to_dict()[key]

    def __iter__(self):
        return iter(self.to_dict())

    def __len__(self) -> int:
        return len(self.to_dict())

    @property
    def display(self) -> str | None:
        """The model as shown: its display name, else its name."""
        return self.model_display or self.model

    @property
    def calibration_file(self) -> str | None:
        """The calibration text file the header names (None: self-generated, or no calibration)."""
        return self.calibration.file if self.calibration is not None else None

    @property
    def is_branch(self) -> bool:
        """Whether the run continues another run from one of its steps (the explorer's branch)."""
        return bool(self.prefix_ids or self.start_step)

    def require(self, path, names: tuple[str, ...], why: str) -> None:
        """HieruiError unless every one of `names` is recorded (not None): what `why` needs."""
        for name in names:
            if getattr(self, name) is None:
                raise HieruiError(f"{escape(str(path))}: the header has no {name}; {why}")


def header_of(value) -> SessionHeader:
    """`value` as a SessionHeader: itself, or a header dict (made by hand, or read elsewhere) checked by from_dict."""
    if isinstance(value, SessionHeader):
        return value
    return SessionHeader.from_dict(dict(value), "a session header")
