"""The stored noise floor of a dense model (`hierui noise`, engine.run.noise measures it): where it is kept, how
it is read, and the near-tie margin per dtype that step records' `near_tie` uses (DEFAULT_TIE_MARGIN where none was
measured). The format is described in engine.run.noise."""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

from engine.errors import HieruiError
from engine.record.paths import atomic_write, hierui_home

FORMAT = "hierui-noise"
VERSION = 1
SAME_DTYPE = ("batch", "cache")  # the comparisons the threshold is taken from
DEFAULT_SOURCE = "default (hierui noise not run for this model)"

# The defaults: tie_margin measured on the embedded model (SmolLM2-135M-Instruct, CPU; the machine was shared, so
# with OMP_NUM_THREADS=1), the shipped open prompts, 36 × 8 steps, rounded up to two significant digits:
#   OMP_NUM_THREADS=1 HIERUI_HOME=/tmp/noise-home hierui noise --model smollm2-135m --device cpu \
#       --dtypes float32,bfloat16,float16
#   comparison           KL mean  KL p99   KL max   flips  max flip margin  |Δmargin| p99.9  |Δmargin| max
#   float32 vs bfloat16  0.0010   0.0075   0.016    5      0.040            0.13             0.13
#   float32 vs float16   1.5e-05  9.5e-05  0.00023  1      0.0013           0.011            0.011
#   batch (float32)      6.8e-12  4.2e-11  1.0e-10  0      —                9.1e-06          9.9e-06
#   batch (bfloat16)     0.0010   0.0054   0.0080   6      0.033            0.091            0.091
#   batch (float16)      2.0e-05  0.00011  0.00037  1      0.00032          0.015            0.015
#   cache (float32)      8.2e-12  5.6e-11  1.3e-10  0      —                9.3e-06          9.9e-06
#   cache (bfloat16)     0.0011   0.0068   0.014    7      0.033            0.11             0.11
#   cache (float16)      1.8e-05  0.00011  0.00017  1      0.00032          0.014            0.014
#   tie margins: float32 9.9e-06, bfloat16 0.11, float16 0.015 (288 steps per comparison)
DEFAULT_TIE_MARGIN = {"float32": 1.0e-5, "bfloat16": 0.11, "float16": 0.015}


# ------------------------------------------------------------------ names and files


def dtype_name(dtype) -> str:
    """A dtype (torch's or a name: bf16, fp32, half, …) as its canonical name: float32, bfloat16, float16; other
    names (float64) as they are."""
    from engine.models.devices import DTYPES

    text = str(dtype).removeprefix("torch.").strip().lower()
    return DTYPES.get(text, text)


def parse_dtypes(dtypes) -> list[str]:
    """`float32,bfloat16` (or a list) as canonical dtype names, each once; an unknown name raises (exit 2)."""
    from engine.models.devices import DTYPES

    items = dtypes.split(",") if isinstance(dtypes, str) else list(dtypes)
    out: list[str] = []
    for item in items:
        text = str(item).removeprefix("torch.").strip().lower()
        if text not in DTYPES:
            raise HieruiError(f"unknown dtype '{str(item).strip()}' in --dtypes: use float32, bfloat16 or float16")
        if DTYPES[text] not in out:
            out.append(DTYPES[text])
    if not out:
        raise HieruiError("--dtypes is empty: give e.g. float32,bfloat16")
    return out


def device_key(device) -> str:
    """The device type a floor is kept for: cpu, cuda, mps (cuda:1 → cuda; auto → what auto picks)."""
    text = str(device).strip().lower() or "auto"
    if text == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return text.split(":", 1)[0]


def noise_dir() -> Path:
    return hierui_home() / "noise"


def floor_path(model_name: str, device) -> Path:
    """$HIERUI_HOME/noise/<model key>-<device type>.json; the key identifies the weights (ModelRef.cache_key).
    An unknown model name raises."""
    from engine.models.names import resolve
    from engine.record.prompts import short_id

    key = resolve(model_name).cache_key()
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", key).strip("._-") or "model"
    return noise_dir() / f"{short_id(safe, key)}-{device_key(device)}.json"


def prompts_hash(prompts: list[str]) -> str:
    return hashlib.sha256(json.dumps(prompts, ensure_ascii=False).encode("utf-8")).hexdigest()[:16]


# ------------------------------------------------------------------ stored floors


def save_floor(floor: dict, path: str | Path | None = None) -> Path:
    """Write a floor (measure_floor's dict) whole; default place: floor_path(its model, its device). What a floor
    already stored there measured in dtypes this one did not is kept (merge_floor): `hierui noise --dtypes
    float32` replaces float32's figures only."""
    target = Path(path) if path is not None else floor_path(floor["model"], floor["device"])
    try:
        old = json.loads(target.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        old = None
    return atomic_write(target, json.dumps(merge_floor(old, floor), indent=2, ensure_ascii=False) + "\n")


def merge_floor(old: dict | None, new: dict) -> dict:
    """`new` with what `old` (a floor stored earlier for the same weights) measured in dtypes `new` did not: their
    tie margins and comparisons (a comparison is replaced by `new`'s of the same kind and dtype), with a note
    naming when they were measured (`kept`: dtype → the older floor's date). An unreadable, foreign or
    other-version `old` is replaced whole."""
    if (
        not isinstance(old, dict)
        or old.get("format") != FORMAT
        or old.get("version") != VERSION
        or old.get("model_key") != new.get("model_key")
        or not isinstance(old.get("tie_margin"), dict)
        or not isinstance(old.get("comparisons"), list)
    ):
        return new
    kept = [d for d in old.get("dtypes") or old["tie_margin"] if d in old["tie_margin"] and d not in new["tie_margin"]]
    if not kept:
        return new
    merged = dict(new)
    measured = {(c.get("kind"), c.get("dtype")) for c in new["comparisons"]}
    older = [c for c in old["comparisons"] if isinstance(c, dict) and c.get("dtype") in kept]
    merged["comparisons"] = [
        *new["comparisons"],
        *(c for c in older if (c.get("kind"), c.get("dtype")) not in measured),
    ]
    merged["tie_margin"] = {**new["tie_margin"], **{d: old["tie_margin"][d] for d in kept}}
    merged["dtypes"] = [*new["dtypes"], *kept]
    when = str(old.get("created", ""))[:10] or "earlier"
    previous = old.get("kept") if isinstance(old.get("kept"), dict) else {}
    merged["kept"] = {d: previous.get(d, when) for d in kept}
    notes = [f"{d}: kept from the measurement of {merged['kept'][d]} (not measured this time)" for d in kept]
    merged["notes"] = [*new.get("notes", []), *notes]
    return merged


def load_floor(model_name: str, device) -> dict | None:
    """The stored floor of a model on a device type, or None where there is none (or it is unreadable, of
    another format or version). An unknown model name raises (engine.models.names.resolve)."""
    path = floor_path(model_name, device)
    try:
        floor = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(floor, dict) or floor.get("format") != FORMAT or floor.get("version") != VERSION:
        return None
    if not isinstance(floor.get("tie_margin"), dict) or not isinstance(floor.get("comparisons"), list):
        return None
    return floor


def _default(dtype: str) -> float:
    return DEFAULT_TIE_MARGIN.get(dtype, DEFAULT_TIE_MARGIN["float32"])


def _source(floor: dict, dtype: str) -> str:
    kept = floor.get("kept") if isinstance(floor.get("kept"), dict) else {}
    when = kept.get(dtype) or floor.get("created", "")
    return f"hierui noise, {str(when)[:10]}".rstrip(", ")


def tie_margin(model_name: str, device: str, dtype: str) -> tuple[float, str]:
    """(the near-tie threshold, where it comes from) for a model on a device type in a dtype: the stored
    floor's value, else DEFAULT_TIE_MARGIN's for the dtype (float32's for a dtype it does not list)."""
    dtype = dtype_name(dtype)
    try:
        floor = load_floor(model_name, device)
    except HieruiError:  # a name that is not a --model name (a model built in memory): no floor
        floor = None
    if floor is None:
        return _default(dtype), DEFAULT_SOURCE
    value = floor["tie_margin"].get(dtype)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value), _source(floor, dtype)
    return _default(dtype), f"default (hierui noise did not measure {dtype} for this model)"


def floor_summary(floor: dict | None, dtype: str) -> dict:
    """What a report shows beside a spec for a dtype: {"tie_margin", "flip_rate", "kl_mean", "kl_p99",
    "source"}, each figure the largest over that dtype's same-dtype comparisons (batch, cache); without a
    measurement the default tie margin and None figures."""
    dtype = dtype_name(dtype)
    same = [c for c in (floor or {}).get("comparisons", []) if c.get("kind") in SAME_DTYPE and c.get("dtype") == dtype]
    value = (floor or {}).get("tie_margin", {}).get(dtype)
    if not same or not isinstance(value, (int, float)):
        source = DEFAULT_SOURCE if floor is None else f"default (hierui noise did not measure {dtype} for this model)"
        return {"tie_margin": _default(dtype), "flip_rate": None, "kl_mean": None, "kl_p99": None, "source": source}

    def worst(key: str):
        return max((c[key] for c in same if c.get(key) is not None), default=None)

    return {
        "tie_margin": float(value),
        "flip_rate": worst("flip_rate"),
        "kl_mean": worst("kl_mean"),
        "kl_p99": worst("kl_p99"),
        "source": _source(floor, dtype),
    }
