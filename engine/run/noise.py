"""The numerical noise floor of a dense model: what numerical noise alone does to its next-token distributions.

The dense model is compared with itself on the same tokens: every prompt is stepped `max_new_tokens` steps
(no stop at end-of-sequence), teacher-forced on the reference dtype's greedy text (float32 where asked for,
else the first dtype measured), by engine.run.stepper.BatchStepper, the code every command steps with:

  dtype   the model in the reference dtype against a second copy loaded in another dtype (engine.models.loading.load),
          both fed the same tokens: what casting to bfloat16 does. A reference figure, never the threshold;
  batch   a prompt stepped alone against the same prompt inside a left-padded batch with the other prompts
          (as many as a sweep batches: engine.record.settings.default_batch_size), in each dtype;
  cache   the KV-cached incremental logits of a prompt stepped alone against one full forward pass over the
          whole sequence without a cache, in each dtype.

Per step, a the reference side of a comparison (the reference dtype, alone, cached) and b the other, at T = 1:

  kl        KL(P_a ‖ P_b) in nats (engine.run.metrics, evaluated in float64, clamped at 0);
  flip      the top-1 tokens of a and b differ;
  margin    P_a(t1) − P_a(t2), t1 and t2 a's top two tokens (engine.run.metrics.margin: the records' `margin_d`);
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
import math
import time
from collections.abc import Callable

from engine.errors import HieruiError, one_line
from engine.record.summary import mean, percentile
from engine.run.floor import FORMAT, SAME_DTYPE, VERSION, dtype_name, parse_dtypes, prompts_hash

DEFAULT_STEPS = 8  # steps per prompt: the embedded model's default run takes about a minute on 2 CPU cores
DEFAULT_DTYPES = ("float32", "bfloat16")
KINDS = ("dtype", "batch", "cache")

Progress = Callable[[str, int, int], None]


# ------------------------------------------------------------------ one comparison


def compare(z_a, z_b) -> dict:
    """Per step of two (n, V) logit tensors, a the reference: `kl` (n,), `flip` (n,) bool, `margin` (n,) and
    `dmargin` (n,) signed (module docstring). Evaluated in float64."""
    import torch

    from engine.run import metrics as M

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
    """The Recorder class, made on first use (engine.run.stepper imports torch: this module does not)."""
    from engine.run.stepper import BatchStepper

    class Recorder(BatchStepper):
        """A BatchStepper that keeps each step's logits of both models (on the host) and the dense model's
        greedy tokens, or with `texts` feeds those tokens (teacher forcing) instead of choosing."""

        def __init__(self, pair, prompts, settings, texts=None):
            super().__init__(pair, prompts, settings)
            self.eos = set()  # to the step limit (engine.run.stepper: an empty set never ends a run)
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
    from engine.record.settings import StepSettings

    settings = StepSettings(mode="shared", max_new_tokens=steps, lens="off", tie_margin=0.0, topk=1)
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


def measure_floor(
    loaded, prompts, max_new_tokens: int = DEFAULT_STEPS, dtypes=DEFAULT_DTYPES, progress=None, request=None
) -> dict:
    """The noise floor of `loaded` (engine.models.loading.LoadedModel) on `prompts` (strings or PromptItems), in each
    of `dtypes`: a dict ready for save_floor (module docstring). A dtype the model cannot be loaded or run in on
    its device is left out, with a note. `request`: the engine.run.open.PairRequest `loaded` was opened by (its
    memory budget places the other dtypes' copies; default: the model on its device)."""
    import torch

    from engine.perturb.pair import ModelPair
    from engine.perturb.spec import unperturbed
    from engine.record.settings import default_batch_size

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
    notes: list[str] = []
    models = _open_dtypes(loaded, dtypes, request, say, notes)
    ref = "float32" if "float32" in models else next(iter(models))
    others = [d for d in models if d != ref]
    size = default_batch_size(device.type)
    chunks = _chunks(texts, size)
    if len(texts) == 1:
        notes.append("one prompt: no batch to step it in, so no batch comparison")
    steps: dict[tuple[str, str], dict] = {}  # (kind, dtype) → per-step values
    measured = [ref]
    ref_done = False
    for other in [*others, None]:  # each other dtype paired with the reference; None: the reference alone
        if other is None and ref_done:
            break
        label = f"measuring {ref}" + (f" vs {other}" if other else "")
        pair = ModelPair(models[ref], models[other or ref], loaded.tokenizer, unperturbed(), loaded=loaded)
        sides = ([] if ref_done else [(ref, 0)]) + ([(other, 1)] if other else [])
        try:
            found = _compare_pair(pair, models, chunks, max_new_tokens, other, sides, say, label)
        except KeyboardInterrupt:
            raise
        except Exception as e:
            if other is None:
                raise
            notes.append(f"{other}: {display} cannot run in {other} on {device.type} ({one_line(e)}); not measured")
            continue
        for kind, dtype, values in found:
            into = steps.setdefault((kind, dtype), {k: [] for k in values})
            for k, v in values.items():
                into[k].extend(v.tolist())
        ref_done = True
        if other:
            measured.append(other)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    comparisons = _comparisons(steps, ref, measured)
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


def _open_dtypes(loaded, dtypes: list[str], request, say: Progress, notes: list[str]) -> dict[str, object]:
    """The model in each of `dtypes`: `loaded` itself in its own, a copy opened by `request` (default: the model on
    its device) in each other; one that cannot be loaded is a note (`notes`), and none at all an error."""
    from engine.run.open import PairRequest

    device, display = loaded.device, loaded.ref.display
    own = dtype_name(loaded.dtype)
    models: dict[str, object] = {}
    for d in dtypes:
        if d == own:
            models[d] = loaded.model
            continue
        say(f"loading {display} in {d}", 0, 0)
        try:
            models[d] = _open_in(request or PairRequest(loaded.ref.name, device=str(device)), d, say)
        except KeyboardInterrupt:
            raise
        except Exception as e:
            notes.append(f"{d}: {display} cannot be loaded in {d} on {device.type} ({one_line(e)}); not measured")
    if not models:
        raise HieruiError(f"{display} could not be loaded in any of {', '.join(dtypes)} on {device.type}", 1)
    return models


def _compare_pair(pair, models: dict, chunks: list[list[str]], max_new_tokens: int, other, sides, say, label: str):
    """The comparisons of one pair of dtypes, prompt by prompt: (kind, dtype, per-step values) for the other dtype
    against the reference (`other`; None: the reference alone), and for each of `sides` ((dtype, its side of the
    pair)) its run alone against the same prompt in a batch and against a forward without the KV cache. Progress:
    say(label, prompts done, prompts)."""
    found: list[tuple[str, str, dict]] = []
    done, total = 0, sum(len(chunk) for chunk in chunks)
    say(label, 0, total)
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
            say(label, done, total)
    return found


def _comparisons(steps: dict[tuple[str, str], dict], ref: str, measured: list[str]) -> list[dict]:
    """Each (kind, dtype)'s per-step values summarized, in the order of KINDS and of the dtypes measured."""
    comparisons = []
    for (kind, dtype), values in steps.items():
        name = f"{ref} vs {dtype}" if kind == "dtype" else f"{kind} ({dtype})"
        comparisons.append({"name": name, "kind": kind, "dtype": dtype, **summarize(values)})
    comparisons.sort(key=lambda c: (KINDS.index(c["kind"]), measured.index(c["dtype"])))
    return comparisons


def _version() -> str:
    import engine

    return engine.__version__


def _open_in(request, dtype: str, say):
    """The dense model of `request` opened in `dtype` (engine.run.open's dense-only form), placed by its own plan."""
    from dataclasses import replace

    from engine.run.open import open_dense, plan_pair

    other = replace(request, dtype=dtype, specs=())
    return open_dense(other, plan_pair(other), progress=lambda m: say(m, 0, 0)).model
