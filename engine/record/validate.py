"""The one schema of a session file's contents, and its checks: files are untrusted input.

A session comes from anyone. Every header field and every step field a reader uses is checked here, once,
when the file is loaded (engine.record.session.load_session), so no reader (`hierui show`, `replay`, `replay
--rerun`, `batch --from`, the explorer) meets a value of the wrong type or out of its range. Each problem is
one HieruiError line naming the file, the line, the field and the value as it was written (control
characters escaped, long values cut).

The table below is the schema: field → (kind, nullable, extra check). A field that is absent is not checked
(older and hand-written sessions omit some); one that is present must have its kind. The step fields and
the summary fields are not restated: they come from engine.record.schema (STEP_FIELDS, SUMMARY_FIELDS), the
declared columns of the batch tables. Fields not declared anywhere are ignored (a newer writer may add some).
"""

from __future__ import annotations

import json
import math
import unicodedata

from engine.errors import HieruiError
from engine.record.schema import (
    BOOL,
    BOOLS,
    FLOAT,
    FLOATS,
    INT,
    INTS,
    JSON,
    LENS_FIELDS,
    STEP_FIELDS,
    STRING,
    SUMMARY_FIELDS,
)
from engine.record.settings import LENS_MODES

# kinds beyond engine.record.schema's
DICT, STRS, TOPK = "object", "list<string>", "topk"
LENS = "lens"  # the header's lens: a LENS_MODES word (version 2), or true/false (version 1: all/off)
NINTS = "list<int64|null>"  # a step's `fed`: a model's entry is null once it has ended (free mode)
MODES = ("shared", "free")
INT64 = 2**63

# the header: field → (kind, nullable, check or None); a check returns an error text, or None when fine
HEADER = {
    "format": (STRING, False, None),
    "version": (INT, False, None),
    "model": (STRING, False, lambda v: None if v.strip() else "expected a model name"),
    "model_display": (STRING, True, None),
    "perturbation": (DICT, False, None),
    "calibration": (DICT, True, None),
    "prompt": (STRING, False, None),
    "prompt_tokens": (INT, True, lambda v: None if v >= 0 else "expected a count ≥ 0"),
    "prompt_ids": (INTS, True, None),
    "truncated_from": (INT, True, lambda v: None if v >= 1 else "expected a count ≥ 1"),  # --truncate cut the prompt
    "mode": (STRING, False, lambda v: None if v in MODES else "expected shared or free"),
    "temperature": (FLOAT, False, lambda v: None if math.isfinite(v) and v > 0 else "expected a number > 0"),
    "max_new_tokens": (INT, False, lambda v: None if v >= 1 else "expected an integer ≥ 1"),
    "choices": (STRS, True, lambda v: None if v else "expected a non-empty list of strings or null"),
    "choice_ids": (INTS, True, None),
    "choice_notes": (STRS, True, None),
    "seed": (INT, True, None),
    "sample": (BOOL, True, None),
    "raw": (BOOL, True, None),
    "topk": (INT, True, lambda v: None if v >= 1 else "expected an integer ≥ 1"),
    "lens": (LENS, True, None),
    "tie_margin": (FLOAT, True, lambda v: None if 0 <= v <= 1 else "expected a number between 0 and 1"),
    "tie_margin_source": (STRING, True, None),
    "prefix_ids": (INTS, True, None),  # a branch: tokens fed after the prompt before step 0 (in prompt_ids)
    "start_step": (INT, True, lambda v: None if v >= 0 else "expected a step ≥ 0"),  # a branch: its parent's step
    "parent": (DICT, True, None),  # a branch: the run it branches from
    "counterfactual": (BOOL, True, None),  # free mode: the closing line holds the branch at the first divergence
    "layers": (INT, True, lambda v: None if v >= 0 else "expected a count ≥ 0"),
    "architecture": (DICT, True, None),
    "device": (STRING, True, None),
    "dtype": (STRING, True, None),
    "plan": (DICT, True, None),  # engine.run.plan's estimate, kept as written (Plan.summary())
    "created": (STRING, True, None),
    "hierui": (STRING, True, None),
}
PERTURBATION = {
    "spec": (STRING, False, lambda v: None if v.strip() else "expected a perturbation spec"),
    "measured_sparsity": (FLOAT, True, None),
    "dense_sparsity": (FLOAT, True, None),
    "details": (DICT, True, None),
}
CALIBRATION = {
    "source": (STRING, True, None),
    "samples": (INT, True, lambda v: None if v >= 1 else "expected an integer ≥ 1"),
    "length": (INT, True, lambda v: None if v >= 2 else "expected an integer ≥ 2"),
    "seed": (INT, True, None),
    "from_cache": (BOOL, True, None),
    "seconds": (FLOAT, True, None),
}
_COUNT = (INT, True, lambda v: None if v >= 0 else "expected a count ≥ 0")
ARCHITECTURE = {  # engine.record.architecture.describe
    "model_type": (STRING, True, None),
    "layers": _COUNT,
    "hidden_size": _COUNT,
    "heads": _COUNT,
    "kv_heads": _COUNT,
    "attention_types": (STRS, True, None),
    "experts": _COUNT,
    "experts_per_token": _COUNT,
}
PARENT = {  # a branch's link to the run it continues (the explorer's branch, engine.run.stepper.Stepper's parent)
    "session": (STRING, True, None),
    "step": (INT, True, lambda v: None if v >= 0 else "expected a step ≥ 0"),
    "token": (INT, True, None),
    "text": (STRING, True, None),
}
NESTED = {"perturbation": PERTURBATION, "calibration": CALIBRATION, "architecture": ARCHITECTURE, "parent": PARENT}
# every step field is nullable except `step`; top-k lists are [[token id, text, probability], …]
STEPS = {name: ({JSON: TOPK, INTS: NINTS}.get(kind, kind), name != "step", None) for name, kind in STEP_FIELDS.items()}
SUMMARY = {name: (kind, True, None) for name, kind in SUMMARY_FIELDS.items()}
_STEP = (INT, False, lambda v: None if v >= 0 else "expected a step ≥ 0")
# the closing line's counterfactual branch (engine.record.branches.Branch.to_dict); its `steps` are step records (STEPS)
BRANCH = {
    "at": _STEP,
    "token": (INT, False, None),
    "text": (STRING, True, None),
    "start_step": _STEP,
    "recovered": (BOOL, True, None),
    "recovery_steps": (INT, True, lambda v: None if v >= 0 else "expected a count ≥ 0"),
}

EXPECTED = {
    STRING: "a string",
    INT: "an integer",
    FLOAT: "a finite number",
    BOOL: "true or false",
    DICT: "an object",
    INTS: "a list of integers",
    NINTS: "a list of integers or nulls",
    FLOATS: "a list of finite numbers or nulls",
    BOOLS: "a list of true/false or nulls",
    STRS: "a list of strings",
    TOPK: "a list of [token id, text, probability]",
    LENS: " or ".join(LENS_MODES) + " (version 1: true or false)",
}


# ------------------------------------------------------------------ reading a line


class Written(float):
    """A float that JSON spelled as something no float holds (NaN, Infinity, 1e999): keeps the spelling."""

    written: str

    def __new__(cls, text: str):
        value = super().__new__(cls, float(text))
        value.written = text
        return value


def _parse_float(text: str) -> float:
    value = float(text)
    return value if math.isfinite(value) else Written(text)


def loads(text: str):
    """json.loads keeping the spelling of non-finite numbers (so an error can show them as written).

    Raises ValueError (json.JSONDecodeError, an integer of too many digits) or RecursionError."""
    return json.loads(text, parse_float=_parse_float, parse_constant=Written)


def escape(text: str) -> str:
    """`text` with control, format, surrogate, private-use and unassigned characters escaped (one line)."""
    out = []
    for ch in text:
        if ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn"):
            out.append(f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return "".join(out)


def shown(value, limit: int = 60) -> str:
    """A JSON value as it was written (near enough): JSON text, escaped, cut with … at `limit` characters."""
    if isinstance(value, Written):
        text = value.written
    else:
        try:
            text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=repr)
        except (ValueError, RecursionError):
            text = repr(value)
    text = escape(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ------------------------------------------------------------------ checking


class _Bad(Exception):
    def __init__(self, field: str, value, expected: str):
        self.field, self.value, self.expected = field, value, expected


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _scalar_ok(kind: str, v) -> bool:
    if kind == STRING:
        return isinstance(v, str)
    if kind == INT:  # an integral float is an integer (engine.run.metrics moves counts as float64)
        if _is_int(v):
            return -INT64 <= v < INT64
        return isinstance(v, float) and math.isfinite(v) and v.is_integer() and abs(v) < INT64
    if kind == FLOAT:
        return _is_number(v) and math.isfinite(v) and abs(v) < 1e300
    if kind == BOOL:
        return isinstance(v, bool) or (_is_number(v) and v in (0, 1))
    if kind == DICT:
        return isinstance(v, dict)
    if kind == LENS:
        return isinstance(v, bool) or v in LENS_MODES
    raise ValueError(kind)


ITEM = {INTS: INT, NINTS: INT, FLOATS: FLOAT, BOOLS: BOOL, STRS: STRING}


def _check(name: str, kind: str, v) -> None:
    """Raise _Bad unless `v` (not None) is of `kind`."""
    if kind in ITEM:
        if not isinstance(v, list):
            raise _Bad(name, v, EXPECTED[kind])
        item = ITEM[kind]
        nullable = kind in (FLOATS, BOOLS, NINTS)  # a per-layer value can be null (not computed, out of range)
        for i, x in enumerate(v):
            if x is None and nullable:
                continue
            if x is None or not _scalar_ok(item, x):
                raise _Bad(f"{name}[{i}]", x, EXPECTED[kind])
        return
    if kind == TOPK:
        if not isinstance(v, list):
            raise _Bad(name, v, EXPECTED[kind])
        for i, row in enumerate(v):
            ok = (
                isinstance(row, list)
                and len(row) == 3
                and _scalar_ok(INT, row[0])
                and isinstance(row[1], str)
                and (row[2] is None or _scalar_ok(FLOAT, row[2]))
            )
            if not ok:
                raise _Bad(f"{name}[{i}]", row, EXPECTED[kind])
        return
    if not _scalar_ok(kind, v):
        raise _Bad(name, v, EXPECTED[kind])


def _check_fields(obj: dict, table: dict, prefix: str = "") -> None:
    for name, (kind, nullable, extra) in table.items():
        if name not in obj:
            continue
        v, full = obj[name], prefix + name
        if v is None:
            if not nullable:
                raise _Bad(full, v, EXPECTED[kind])
            continue
        _check(full, kind, v)
        if extra is not None:
            problem = extra(v)
            if problem:
                raise _Bad(full, v, problem.removeprefix("expected "))
        if kind == DICT and name in NESTED and not prefix:
            _check_fields(v, NESTED[name], prefix=f"{name}.")


def _error(path, number: int, bad: _Bad) -> HieruiError:
    return HieruiError(
        f"{escape(str(path))}: line {number}: {bad.field} is {shown(bad.value)}, expected {bad.expected}"
    )


def check_header(header: dict, path, number: int = 1) -> None:
    """HieruiError (one line) on the first header field of the wrong type or out of range."""
    try:
        _check_fields(header, HEADER)
    except _Bad as bad:
        raise _error(path, number, bad) from None


def check_step(step: dict, path, number: int) -> None:
    """HieruiError (one line) on the first step field of the wrong type or out of range."""
    try:
        _check_fields(step, STEPS)
    except _Bad as bad:
        raise _error(path, number, bad) from None


def check_summary(summary: dict, path, number: int) -> None:
    """HieruiError (one line) on the first closing-summary field of the wrong type."""
    try:
        _check_fields(summary, SUMMARY, prefix="summary.")
    except _Bad as bad:
        raise _error(path, number, bad) from None


def check_branch(branch, path, number: int) -> None:
    """HieruiError (one line) unless the closing line's `branch` is an object of BRANCH's fields whose `steps` are
    step records numbered from 0, each checked as a step line is."""
    try:
        if not isinstance(branch, dict):
            raise _Bad("branch", branch, EXPECTED[DICT])
        for name in ("at", "token", "start_step", "steps"):
            if name not in branch:
                raise _Bad(f"branch.{name}", None, "a value (it is missing)")
        _check_fields(branch, BRANCH, prefix="branch.")
        steps = branch["steps"]
        if not isinstance(steps, list):
            raise _Bad("branch.steps", steps, "a list of step records")
        for i, step in enumerate(steps):
            if not isinstance(step, dict):
                raise _Bad(f"branch.steps[{i}]", step, "a step record (an object)")
            if not _is_int(step.get("step")) or step["step"] != i:
                raise _Bad(f"branch.steps[{i}].step", step.get("step"), f"step {i}")
            _check_fields(step, STEPS, prefix=f"branch.steps[{i}].")
    except _Bad as bad:
        raise _error(path, number, bad) from None


def check_lens(line: dict, path, number: int, steps: int, layers: int | None) -> None:
    """HieruiError (one line) unless a lens line (engine.record.session: `lens_of` and the three LENS_FIELDS) is the
    lens of one of the `steps` steps read before it, each field a list of one value per layer (`layers`, the
    header's; where it has none, as many as the others), finite or null."""
    try:
        _check_fields(line, {"lens_of": _STEP})
        step = line["lens_of"]
        if step >= steps:
            raise _Bad("lens_of", step, f"a step of an earlier line (steps 0 to {steps - 1})" if steps else "a step")
        for name in LENS_FIELDS:
            if line.get(name) is None:
                raise _Bad(name, line.get(name), "a list of one value per layer (it is missing)")
            _check(name, STEP_FIELDS[name], line[name])
        count = layers if layers is not None else len(line[LENS_FIELDS[0]])
        for name in LENS_FIELDS:
            if len(line[name]) != count:
                raise _Bad(name, line[name], f"one value per layer ({count})")
    except _Bad as bad:
        raise _error(path, number, bad) from None


# ------------------------------------------------------------------ token ids

TOKEN_FIELDS = ("token_d", "token_p", "fed")  # a step's fields that hold token ids (and its top-k lists' first items)


def token_id_fields(session):
    """Every token id a loaded session (engine.record.session.Session) holds, as (field, ids) pairs, for
    engine.models.tokens.check_token_ids before a model reads them: the header's prompt_ids, prefix_ids,
    choice_ids and parent.token; each step's token_d, token_p, fed and the ids of topk_d and topk_p, named
    "step N: token_d" with N counted from 1 as on screen; the counterfactual branch's token and its steps'
    ("branch step N: fed"). `ids` is one id or a list (None where a model had ended)."""
    header = session.header
    for name in ("prompt_ids", "prefix_ids", "choice_ids"):
        ids = getattr(header, name, None)
        if ids:
            yield name, list(ids)
    parent = getattr(header, "parent", None)
    if parent is not None and parent.token is not None:
        yield "parent.token", parent.token
    yield from _step_ids(session.steps, "step")
    branch = getattr(session, "branch", None)
    if branch is not None:
        yield "branch.token", branch.token
        yield from _step_ids(branch.steps, "branch step")


def _step_ids(steps: list[dict], label: str):
    for i, step in enumerate(steps):
        where = f"{label} {i + 1}"
        for name in TOKEN_FIELDS:
            if step.get(name) is not None:
                yield f"{where}: {name}", step[name]
        for name in ("topk_d", "topk_p"):
            for k, row in enumerate(step.get(name) or []):
                yield f"{where}: {name}[{k}][0]", row[0]
