"""The numerical noise floor of a dense model: what numerical noise alone does to its next-token distributions.

The dense model is compared with itself on the same tokens: every prompt is stepped `max_new_tokens` steps
(no stop at end-of-sequence), teacher-forced on the reference dtype's greedy text (float32 where asked for,
else the first dtype measured), by engine.stepper.BatchStepper, the code every command steps with:

  dtype   the model in the reference dtype against a second copy loaded in another dtype (engine.models.load),
          both fed the same tokens: what casting to bfloat16 does. A reference figure, never the threshold;
  batch   a prompt stepped alone against the same prompt inside a left-padded batch with the other prompts
          (as many as a sweep batches: engine.sweep.default_batch_size), in each dtype;
  cache   the KV-cached incremental logits of a prompt stepped alone against one full forward pass over the
          whole sequence without a cache, in each dtype.

Per step, a the reference side of a comparison (the reference dtype, alone, cached) and b the other, at T = 1:

  kl        KL(P_a ‖ P_b) in nats (engine.metrics, evaluated in float64, clamped at 0);
  flip      the top-1 tokens of a and b differ;
  margin    P_a(t1) − P_a(t2), t1 and t2 a's top two tokens (engine.metrics.margin: the records' `margin_d`);
  Δmargin   (P_b(t1) − P_b(t2)) − margin: how far noise moved that gap. A flip between t1 and t2 is the gap
            changing sign, so there |Δmargin| ≥ margin.

Per comparison: steps, kl mean / p99 / max, flips and flip rate, the largest margin at which a flip happened
(`flip_margin_max`, None without flips), p99.9 and max of |Δmargin|.

The near-tie threshold, per dtype:

    tie_margin[dtype] = max(max |Δmargin|, flip_margin_max) over that dtype's batch and cache comparisons

the widest top-1/top-2 gap that noise alone moved by as much or flipped. A flip of a perturbed model whose dense
margin is below it could be produced by numerical noise alone (the step records' `near_tie`). The dtype
comparison is stored beside it, as what casting does.

A floor is stored as JSON in $HIERUI_HOME/noise/<model key>-<device type>.json (`floor_path`): the model, its
key, the device type, the dtypes measured and the reference one, the prompts' count and hash, the steps, the batch
size, the hierui version, the date, `tie_margin` per dtype and one entry per comparison (`kind`, `dtype`: for a
dtype comparison the other side's, and the figures above). `tie_margin()` reads it, and falls back to
DEFAULT_TIE_MARGIN for a model, device type or dtype not measured.
"""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import json
import math
import re
import time
from collections.abc import Callable
from pathlib import Path

from engine.errors import HieruiError, one_line
from engine.paths import atomic_write, hierui_home
from engine.summary import mean, percentile

FORMAT = "hierui-noise"
VERSION = 1
DEFAULT_STEPS = 8  # steps per prompt: the embedded model's default run takes about a minute on 2 CPU cores
DEFAULT_DTYPES = ("float32", "bfloat16")
KINDS = ("dtype", "batch", "cache")
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

Progress = Callable[[str, int, int], None]


# ------------------------------------------------------------------ names and files


def dtype_name(dtype) -> str:
    """A dtype (torch's or a name: bf16, fp32, half, …) as its canonical name: float32, bfloat16, float16; other
    names (float64) as they are."""
    from engine.models import DTYPES

    text = str(dtype).removeprefix("torch.").strip().lower()
    return DTYPES.get(text, text)


def parse_dtypes(dtypes) -> list[str]:
    """`float32,bfloat16` (or a list) as canonical dtype names, each once; an unknown name raises (exit 2)."""
    from engine.models import DTYPES

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
    from engine.models import resolve
    from engine.prompts import short_id

    key = resolve(model_name).cache_key()
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", key).strip("._-") or "model"
    return noise_dir() / f"{short_id(safe, key)}-{device_key(device)}.json"


def prompts_hash(prompts: list[str]) -> str:
    return hashlib.sha256(json.dumps(prompts, ensure_ascii=False).encode("utf-8")).hexdigest()[:16]


# ------------------------------------------------------------------ one comparison


def compare(z_a, z_b) -> dict:
    """Per step of two (n, V) logit tensors, a the reference: `kl` (n,), `flip` (n,) bool, `margin` (n,) and
    `dmargin` (n,) signed (module docstring). Evaluated in float64."""
    import torch

    from engine import metrics as M

    z_a, z_b = z_a.to(torch.float64), z_b.to(torch.float64).to(z_a.device)
    prob = M.probability_metrics(z_a, z_b, temperature=1.0, k=1)
    margin = M.margin(z_a, 1.0)
    if z_a.shape[-1] < 2:
        dmargin = torch.zeros_like(margin)
    else:
        top = torch.topk(z_a, 2, dim=-1).indices  # the reference's top two tokens
        gap_b = torch.softmax(z_b, dim=-1).gather(-1, top)
        dmargin = (gap_b[:, 0] - gap_b[:, 1]) - margin
    return {"kl": prob["kl"].clamp_min(0.0), "flip": prob["top1_agree"] == 0, "margin": margin, "dmargin": dmargin}


def summarize(steps: dict) -> dict:
    """One comparison's figures from its per-step values (lists of `kl`, `flip`, `margin`, `dmargin`)."""
    kl = [float(v) for v in steps["kl"]]
    flips = [float(m) for f, m in zip(steps["flip"], steps["margin"]) if f]
    dm = [abs(float(v)) for v in steps["dmargin"]]
    n = len(kl)
    return {
        "steps": n,
        "kl_mean": mean(kl),
        "kl_p99": percentile(kl, 99),
        "kl_max": max(kl, default=None),
        "flips": len(flips),
        "flip_rate": len(flips) / n if n else None,
        "flip_margin_max": max(flips, default=None),
        "dmargin_p99_9": percentile(dm, 99.9),
        "dmargin_max": max(dm, default=None),
    }


def threshold(comparisons: list[dict], dtype: str) -> float | None:
    """tie_margin of `dtype`: max(max |Δmargin|, flip_margin_max) over its same-dtype comparisons (None: none)."""
    values = [
        v
        for c in comparisons
        if c["kind"] in SAME_DTYPE and c["dtype"] == dtype
        for v in (c["dmargin_max"], c["flip_margin_max"])
        if v is not None
    ]
    return max(values, default=None)


# ------------------------------------------------------------------ stepping


@functools.cache
def _recorder_class():
    """The Recorder class, made on first use (engine.stepper imports torch: this module does not)."""
    from engine.stepper import BatchStepper

    class Recorder(BatchStepper):
        """A BatchStepper that keeps each step's logits of both models (on the host) and the dense model's
        greedy tokens, or with `texts` feeds those tokens (teacher forcing) instead of choosing."""

        def __init__(self, pair, prompts, settings, texts=None):
            super().__init__(pair, prompts, settings)
            self.eos = set()  # to the step limit (engine.stepper: an empty set never ends a run)
            self.texts = texts
            self.logits: tuple[list, list] = ([], [])
            self.tokens: list[list[int]] = [[] for _ in prompts]

        def _choose(self, z_d, z_p):
            import torch

            i = len(self.logits[0])
            self.logits[0].append(z_d.float().cpu())
            self.logits[1].append(z_p.float().cpu())
            if self.texts is None:
                tok = z_d.argmax(-1)
            else:
                tok = torch.tensor([t[i] for t in self.texts], dtype=torch.long, device=z_d.device)
            for row, t in zip(self.tokens, tok.tolist()):
                row.append(int(t))
            return tok, tok

        def side(self, index: int, row: int):
            """(steps, V) logits of one model (0 dense, 1 perturbed) in one row."""
            import torch

            return torch.stack([z[row] for z in self.logits[index]])

    return Recorder


def _step(pair, prompts: list[str], steps: int, texts=None):
    from engine.settings import StepSettings

    settings = StepSettings(mode="shared", max_new_tokens=steps, lens=False, tie_margin=0.0, topk=1)
    recorder = _recorder_class()(pair, prompts, settings, texts)
    recorder.run()
    return recorder


def _full_logits(model, ids: list[int], n: int):
    """The logits (n, V) at the last n positions of one forward pass over `ids` without a cache."""
    import torch

    device = model.get_input_embeddings().weight.device
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids], device=device), use_cache=False, logits_to_keep=n)
    return out.logits[0, -n:].float().cpu()


def _chunks(items: list, size: int) -> list[list]:
    """Contiguous chunks of at most `size`, as even as can be (no lone prompt at the end)."""
    count = max(1, math.ceil(len(items) / size))
    base, extra = divmod(len(items), count)
    out, start = [], 0
    for i in range(count):
        end = start + base + (i < extra)
        out.append(items[start:end])
        start = end
    return out


def measure_floor(loaded, prompts, max_new_tokens: int = DEFAULT_STEPS, dtypes=DEFAULT_DTYPES, progress=None) -> dict:
    """The noise floor of `loaded` (engine.models.LoadedModel) on `prompts` (strings or PromptItems), in each
    of `dtypes`: a dict ready for save_floor (module docstring). A dtype the model cannot be loaded or run in on
    its device is left out, with a note."""
    import torch

    from engine.models import load
    from engine.pair import ModelPair
    from engine.perturb.spec import parse_spec
    from engine.sweep import default_batch_size

    say: Progress = progress or (lambda *_: None)
    dtypes = parse_dtypes(dtypes)
    texts = [p.prompt if hasattr(p, "prompt") else str(p) for p in prompts]
    if not texts:
        raise HieruiError("no prompts to measure the noise floor on")
    if max_new_tokens < 1:
        raise HieruiError(f"max new tokens must be at least 1, got {max_new_tokens}")
    started = time.perf_counter()
    device = loaded.device
    display = loaded.ref.display
    own = dtype_name(loaded.dtype)
    models: dict[str, object] = {}
    notes: list[str] = []
    for d in dtypes:
        if d == own:
            models[d] = loaded.model
            continue
        say(f"loading {display} in {d}", 0, 0)
        try:
            models[d] = load(loaded.ref.name, device=str(device), dtype=d, progress=lambda m: say(m, 0, 0)).model
        except KeyboardInterrupt:
            raise
        except Exception as e:
            notes.append(f"{d}: {display} cannot be loaded in {d} on {device.type} ({one_line(e)}); not measured")
    if not models:
        raise HieruiError(f"{display} could not be loaded in any of {', '.join(dtypes)} on {device.type}", 1)
    ref = "float32" if "float32" in models else next(iter(models))
    others = [d for d in models if d != ref]
    size = default_batch_size(device.type)
    chunks = _chunks(texts, size)
    if len(texts) == 1:
        notes.append("one prompt: no batch to step it in, so no batch comparison")
    steps: dict[tuple[str, str], dict] = {}  # (kind, dtype) → per-step values

    def add(kind: str, dtype: str, values: dict) -> None:
        into = steps.setdefault((kind, dtype), {k: [] for k in values})
        for k, v in values.items():
            into[k].extend(v.tolist())

    measured = [ref]
    ref_done = False
    for other in [*others, None]:  # each other dtype paired with the reference; None: the reference alone
        if other is None and ref_done:
            break
        label = f"measuring {ref}" + (f" vs {other}" if other else "")
        pair = ModelPair(models[ref], models[other or ref], loaded.tokenizer, parse_spec("none"), loaded=loaded)
        sides = ([] if ref_done else [(ref, 0)]) + ([(other, 1)] if other else [])
        found: list[tuple[str, str, dict]] = []
        done = 0
        try:
            say(label, 0, len(texts))
            for chunk in chunks:
                alone = [_step(pair, [p], max_new_tokens) for p in chunk]
                fed = [a.tokens[0] for a in alone]  # the reference dtype's greedy text, fed to every run
                batch = _step(pair, chunk, max_new_tokens, texts=fed) if len(chunk) > 1 else None
                for b, one in enumerate(alone):
                    if other:
                        found.append(("dtype", other, compare(one.side(0, 0), one.side(1, 0))))
                    for dtype, index in sides:
                        z = one.side(index, 0)
                        if batch is not None:
                            found.append(("batch", dtype, compare(z, batch.side(index, b))))
                        full = _full_logits(models[dtype], one.rows[0].ids + fed[b][:-1], max_new_tokens)
                        found.append(("cache", dtype, compare(z, full)))
                    done += 1
                    say(label, done, len(texts))
        except KeyboardInterrupt:
            raise
        except Exception as e:
            if other is None:
                raise
            notes.append(f"{other}: {display} cannot run in {other} on {device.type} ({one_line(e)}); not measured")
            continue
        for kind, dtype, values in found:
            add(kind, dtype, values)
        ref_done = True
        if other:
            measured.append(other)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    comparisons = []
    for (kind, dtype), values in steps.items():
        name = f"{ref} vs {dtype}" if kind == "dtype" else f"{kind} ({dtype})"
        comparisons.append({"name": name, "kind": kind, "dtype": dtype, **summarize(values)})
    comparisons.sort(key=lambda c: (KINDS.index(c["kind"]), measured.index(c["dtype"])))
    return {
        "format": FORMAT,
        "version": VERSION,
        "model": loaded.ref.name,
        "display": display,
        "model_key": loaded.ref.cache_key(),
        "device": device.type,
        "dtypes": measured,
        "reference_dtype": ref,
        "prompts": len(texts),
        "prompts_hash": prompts_hash(texts),
        "max_new_tokens": max_new_tokens,
        "batch_size": size,
        "hierui": _version(),
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - started, 3),
        "tie_margin": {d: threshold(comparisons, d) for d in measured},
        "comparisons": comparisons,
        "notes": notes,
    }


def _version() -> str:
    import engine

    return engine.__version__


# ------------------------------------------------------------------ stored floors


def save_floor(floor: dict, path: str | Path | None = None) -> Path:
    """Write a floor (measure_floor's dict) whole; default place: floor_path(its model, its device)."""
    target = Path(path) if path is not None else floor_path(floor["model"], floor["device"])
    return atomic_write(target, json.dumps(floor, indent=2, ensure_ascii=False) + "\n")


def load_floor(model_name: str, device) -> dict | None:
    """The stored floor of a model on a device type, or None where there is none (or it is unreadable, of
    another format or version). An unknown model name raises (engine.models.resolve)."""
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


def _source(floor: dict) -> str:
    return f"hierui noise, {str(floor.get('created', ''))[:10]}".rstrip(", ")


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
        return float(value), _source(floor)
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
        "source": _source(floor),
    }
