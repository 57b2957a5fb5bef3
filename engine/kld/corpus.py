"""Corpus KLD: teacher-forced scoring of a text in windows, dense vs perturbed, with llama.cpp's statistics.

The corpus is tokenized once (no special tokens); windows of `ctx` tokens start every `stride` tokens
(default `ctx`: no overlap). Where the tokenizer adds a BOS, the first token of each window is replaced by it
(as llama.cpp's `perplexity --kl-divergence`). In each window the logits at positions `ctx - 1 - m … ctx - 2`
predict the window's last `m = min(stride, ctx - 1 - ctx//2)` tokens, so every scored token has at least
ctx/2 tokens of context and (for stride ≤ ctx − 1 − ctx//2) every token after the first window is scored once.

Per scored token (the contract of docs/design.md, "Corpus KLD"; P_d dense, P_p perturbed, t the actual
next token):
    kl        KL(P_d ‖ P_p) over the full vocabulary (natural log)
    kl_rev    KL(P_p ‖ P_d)
    same_top  argmax P_d == argmax P_p
    dp        P_p(t) − P_d(t)
    nll_d     −ln P_d(t);  nll_p  −ln P_p(t)
    conf_d    max P_d (the dense top-1 probability, for the confidence buckets)

Statistics (engine.kld.statistics.summarize) follow llama.cpp's tools/perplexity/perplexity.cpp (kl_divergence) exactly:
mean_and_uncertainty(sum, sum², n) = (f, sqrt((sum²/n − f²)/(n − 1))), the uncertainty 0 when n ≤ 10 or the
variance is not positive; the covariance of the two NLL streams (sum_ab/n − mean_a mean_b)/(n − 1) (0 when
n < 10); ln_ppl_ratio = mean nll_p − mean nll_d with uncertainty sqrt(u_p² + u_d² − 2 cov); ln_ppl_cor =
cov/(u_p u_d) (the per-token NLL correlation llama.cpp prints as Cor(ln(PPL(Q)), ln(PPL(base)))); percentiles
interpolate linearly at fraction·(n − 1) of the sorted values (numpy's "linear"); dp_rms = sqrt(mean dp²) with
uncertainty 0.5/rms · u(dp²); same_top ± sqrt(p(1 − p)/(n − 1)). One difference: llama.cpp sums the KL only
over tokens whose base log-probability exceeds −16 (its 16-bit log-prob files); here the sum is exact (against
one of llama.cpp's files, engine.kld.llamacpp, hierui sums as llama.cpp does).

Beyond llama.cpp: the mean KL per decile of the dense top-1 probability, the per-layer hidden-state cosine
(mean over scored positions, layers 0 … L, needs the dense model's states: null with a base file), and the
tokens with the highest KL with their context, the flips of top-1 correctness (argmax == the actual next
token) dense → perturbed with McNemar's exact p, and per pair of specs (`pair_rows`) the paired differences of
mean KL and same-top rate with bootstrap intervals resampling whole windows (engine.results.paired). `--base` mode
(engine.kld.base) replaces the dense model's forward pass with a stored file: the dense head's inputs (exact,
the default) or a top-K (`kl` and `kl_rev` are then lower bounds; see that module).

This module holds no UI: hierui.views.kld prints the report, hierui.cli.kld declares the command.
"""

from __future__ import annotations

import hashlib
import math
import weakref
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

from engine.errors import HieruiError
from engine.kld.statistics import kl_mean_interval, pair_rows, summarize, token_flips
from engine.results.paired import is_silent

SUITES = {"heldout": "data/corpus/heldout.txt"}
DEFAULT_CTX = 512
WORST = 20  # the tokens with the highest KL kept per spec
TOKEN_FIELDS = ("kl", "kl_rev", "same_top", "dp", "nll_d", "nll_p", "conf_d")

# progress(stage, done, total), as engine.perturb
Progress = Callable[[str, int, int], None]


# ------------------------------------------------------------------ the corpus


def suite_text(name: str) -> str:
    if name not in SUITES:
        raise HieruiError(f"unknown --suite '{name}': use {', '.join(SUITES)}")
    return resources.files("engine").joinpath(SUITES[name]).read_text(encoding="utf-8")


def read_text(path: str | Path) -> str:
    """A corpus file as text, read as every text file a user names (engine.record.texts.read_text_file: one line
    for a missing, non-regular, binary, non-UTF-8 or empty file)."""
    from engine.record.texts import read_text_file

    return read_text_file(path, "--text")


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of the tokenizer's vocabulary (token → id) and its special ids: equal for equal tokenizers. Kept per
    tokenizer object and its special ids and size (half a second for a 49k vocabulary, asked at every check of a
    base file)."""
    specials = [tokenizer.bos_token_id, tokenizer.eos_token_id, len(tokenizer)]
    try:
        known = _FINGERPRINTS.get(tokenizer)
    except TypeError:  # not weakly referable: computed each time
        known = None
    if known is not None and known[0] == specials:
        return known[1]
    vocab = sorted(tokenizer.get_vocab().items())
    value = hashlib.sha256(repr((vocab, specials)).encode("utf-8")).hexdigest()[:32]
    with suppress(TypeError):
        _FINGERPRINTS[tokenizer] = (specials, value)
    return value


_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def bos_id(tokenizer) -> int | None:
    """The id the tokenizer puts before a text (None where it adds none, as SmolLM2's)."""
    ids = list(tokenizer("", add_special_tokens=True)["input_ids"])
    return ids[0] if ids else None


@dataclass(frozen=True)
class Layout:
    """Where the windows start and which of their positions are scored."""

    n_tokens: int
    ctx: int
    stride: int

    @property
    def scored(self) -> int:
        """Tokens scored per window: its last m, predicted by the logits at ctx−1−m … ctx−2."""
        return min(self.stride, self.ctx - 1 - self.ctx // 2)

    @property
    def starts(self) -> list[int]:
        return list(range(0, self.n_tokens - self.ctx + 1, self.stride))

    @property
    def total(self) -> int:
        return len(self.starts) * self.scored


def check_window(ctx: int, stride: int | None, max_ctx: int | None = None) -> int:
    """--ctx and --stride on their own (and against the model's context, where known): the stride to use."""
    if ctx < 4:
        raise HieruiError(f"--ctx {ctx}: use at least 4 tokens")
    if max_ctx is not None and ctx > max_ctx:
        raise HieruiError(f"--ctx {ctx} is beyond the model's context of {max_ctx} tokens")
    stride = ctx if stride is None else stride
    if not 1 <= stride <= ctx:
        raise HieruiError(f"--stride {stride}: use 1 … ctx ({ctx})")
    return stride


def layout(n_tokens: int, ctx: int, stride: int | None, max_ctx: int | None = None) -> Layout:
    stride = check_window(ctx, stride, max_ctx)
    if n_tokens < ctx:
        raise HieruiError(f"the corpus is {n_tokens} tokens, shorter than one window of --ctx {ctx}")
    return Layout(n_tokens, ctx, stride)


def tokenize(tokenizer, text: str, bos_first: bool = False) -> list[int]:
    """The corpus's token ids (no special tokens); `bos_first`: with the BOS before them where the tokenizer adds
    one, as llama.cpp tokenizes a text (its base files, engine.kld.llamacpp)."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    bos = bos_id(tokenizer) if bos_first else None
    return ids if bos is None else [bos, *ids]


# ------------------------------------------------------------------ the run


@dataclass
class SpecResult:
    """One spec's per-token arrays (in corpus order), hidden-state cosines and the perturbation's report."""

    spec: str
    tokens: dict = field(default_factory=dict)  # name -> np.ndarray (TOKEN_FIELDS, top_d, top_p)
    hidden_cos: list | None = None  # mean cosine per layer 0 … L; None with a base file
    measured_sparsity: float | None = None
    layer_sparsity: list | None = None  # the zero weights' fraction per decoder layer (PerturbReport.details)
    allocation: dict | None = None  # a layer allocation's details (PerturbReport.details["allocation"]), for kld.json
    gguf: dict | None = None  # a GGUF candidate's file (PerturbReport.details["gguf"], engine.models.gguf_info)


@dataclass
class KldRun:
    """Everything a `hierui kld` run computed, for the tables and the report."""

    model: str
    corpus: str  # the suite's name or the file's path
    corpus_sha256: str
    ctx: int
    stride: int
    windows: int
    positions: np.ndarray  # (n,) the corpus index of each scored token
    targets: np.ndarray  # (n,) its id
    window_of: np.ndarray  # (n,) its window
    ids: list  # the corpus's token ids
    starts: list
    bos: int | None
    results: list[SpecResult] = field(default_factory=list)
    base: str | None = None  # the base file compared against
    base_k: int | None = None  # its K for a top-K file (kl and kl_rev are then lower bounds); None: exact
    base_kind: str | None = None  # "exact", "topk" or "llama.cpp" (engine.kld.llamacpp); None: no base file
    base_model: str | None = None  # the dense model the base file names (engine.kld.base.BaseFile.model)
    noise_floor: dict | None = None  # engine.sweep.folder.noise_floor of the dense model (None: not measured)
    workers: list | None = (
        None  # with --ray (engine.kld.distributed): per spec the worker that scored it, seconds, attempts
    )
    seconds: float = 0.0
    pairs: list | None = None  # pair_rows(self), kept by write_tables for the report

    def merged(self, other: KldRun) -> KldRun:
        """This run with `other`'s specs after its own (the same corpus and windows, scored separately)."""
        self.results.extend(other.results)
        self.seconds += other.seconds
        return self

    def summaries(self) -> list[dict]:
        rows = []
        for r in self.results:
            row = {
                "spec": r.spec,
                "model": self.model,
                "corpus": self.corpus,
                "corpus_sha256": self.corpus_sha256,
                "ctx": self.ctx,
                "stride": self.stride,
                "windows": self.windows,
                "base": self.base,
                "base_k": self.base_k,
                "base_kind": self.base_kind,
                "base_model": self.base_model,
                "measured_sparsity": r.measured_sparsity,
                "layer_sparsity": r.layer_sparsity,
                "file_size": (r.gguf or {}).get("file_size"),
                "bits_per_weight": (r.gguf or {}).get("bits_per_weight"),
                "quant_types": (r.gguf or {}).get("types"),
                **summarize(r.tokens),
                **kl_mean_interval(r.tokens["kl"], self.window_of),
                **token_flips(r.tokens, self.targets),
                "hidden_cos": r.hidden_cos,
            }
            row["noise_floor_kl"] = (self.noise_floor or {}).get("kl_mean")
            row["silent"] = is_silent(row["kl_mean"], row["mcnemar_p"], row["noise_floor_kl"])
            rows.append(row)
        return rows

    def token_rows(self) -> list[dict]:
        rows = []
        for r in self.results:
            cols = {name: r.tokens[name].tolist() for name in (*TOKEN_FIELDS, "top_d", "top_p")}
            for i in range(len(self.positions)):
                row = {"spec": r.spec, "window": int(self.window_of[i]), "pos": int(self.positions[i])}
                row["token"] = int(self.targets[i])
                row.update({name: cols[name][i] for name in cols})
                rows.append(row)
        return rows

    def worst(self, tokenizer, count: int = WORST, context_tokens: int | None = None) -> list[dict]:
        """Per spec, the `count` tokens with the highest KL: rank, KL, where, the token, the two top-1 tokens
        and the text before it in its window (the whole window's prefix: what the models saw)."""
        out = []
        for r in self.results:
            order = np.argsort(-np.asarray(r.tokens["kl"]), kind="stable")[:count]
            for rank, i in enumerate(order, start=1):
                pos, w = int(self.positions[i]), int(self.window_of[i])
                start = self.starts[w]
                prefix = list(self.ids[start:pos])
                if self.bos is not None:
                    prefix[0] = self.bos
                if context_tokens is not None:
                    prefix = prefix[-context_tokens:]
                out.append(
                    {
                        "spec": r.spec,
                        "rank": rank,
                        "kl": float(r.tokens["kl"][i]),
                        "window": w,
                        "pos": pos,
                        "token": int(self.targets[i]),
                        "text": tokenizer.decode([int(self.targets[i])]),
                        "top_d": tokenizer.decode([int(r.tokens["top_d"][i])]),
                        "top_p": tokenizer.decode([int(r.tokens["top_p"][i])]),
                        "p_d": math.exp(-float(r.tokens["nll_d"][i])),
                        "p_p": math.exp(-float(r.tokens["nll_p"][i])),
                        "context": tokenizer.decode(prefix, skip_special_tokens=True),
                    }
                )
        return out


def prepare(tokenizer, text: str, ctx: int, stride: int | None, max_ctx: int | None, bos_first: bool = False):
    """(ids, layout, bos) of a corpus: the checks before any model runs (`bos_first`: tokenize)."""
    ids = tokenize(tokenizer, text, bos_first)
    return ids, layout(len(ids), ctx, stride, max_ctx), bos_id(tokenizer)


def frame(
    tokenizer, text: str, corpus: str, model: str, ctx: int, stride: int | None, max_ctx=None, base=None, save=None
):
    """A KldRun of `text` with no spec scored yet: its windows, scored positions and targets (what score() fills,
    and what a rerun into the same folder puts the stored specs in, engine.kld.folder). A llama.cpp base file
    (`base` read, `save` written) makes the token stream llama.cpp's (a BOS first, tokenize)."""
    bos_first = getattr(base, "bos_first", False) or getattr(save, "bos_first", False)
    ids, lay, bos = prepare(tokenizer, text, ctx, stride, max_ctx, bos_first)
    m = lay.scored
    positions = np.concatenate([np.arange(s + ctx - m, s + ctx) for s in lay.starts])
    return KldRun(
        model=model,
        corpus=corpus,
        corpus_sha256=text_hash(text),
        ctx=ctx,
        stride=lay.stride,
        windows=len(lay.starts),
        positions=positions,
        targets=np.asarray(ids, dtype=np.int64)[positions],
        window_of=np.repeat(np.arange(len(lay.starts)), m),
        ids=ids,
        starts=lay.starts,
        bos=bos,
        base=str(base.path) if base is not None else None,
        base_k=base.k if base is not None and not base.exact else None,
        base_kind=base.kind if base is not None else None,
        base_model=base.model if base is not None else None,
    )


def score(
    loaded,
    pairs: list,
    text: str,
    corpus: str,
    ctx: int = DEFAULT_CTX,
    stride: int | None = None,
    base=None,
    save_base=None,
    progress: Progress | None = None,
) -> KldRun:
    """Score `text` with the dense model of `loaded` and each pair's perturbed model (engine.perturb.pair.ModelPair).

    `base`: an engine.kld.base.BaseFile to compare against instead of running the dense model; `save_base`:
    an engine.kld.base.BaseWriter filled on the way (needs the dense model)."""
    import time

    import torch

    started = time.perf_counter()
    say = progress or (lambda *_: None)
    from engine.models.configs import config_int

    max_ctx = config_int(loaded.model.config.to_dict(), "max_position_embeddings")
    run = frame(loaded.tokenizer, text, corpus, loaded.ref.name, ctx, stride, max_ctx, base, save_base)
    lay = Layout(len(run.ids), ctx, run.stride)
    if base is not None:
        from engine.models.tokens import model_rows

        base.check(loaded.tokenizer, text, lay, model_rows(loaded.model), loaded.ref.name)
    if save_base is not None and save_base.exact:
        save_base.bind(loaded.model)
    collected, cos_sum = _score_windows(loaded, pairs, run.ids, lay, run.bos, base, save_base, say)
    for j, pair in enumerate(pairs):
        tokens = {name: torch.cat(parts).numpy() for name, parts in collected[j].items()}
        hidden = None
        if cos_sum[j] is not None:
            hidden = [None if math.isnan(v) else v for v in (cos_sum[j] / lay.total).tolist()]
        report = getattr(pair, "report", None)
        measured = getattr(report, "measured_sparsity", None)
        details = getattr(report, "details", None) or {}
        run.results.append(
            SpecResult(
                str(pair.spec),
                tokens,
                hidden,
                measured,
                details.get("layer_sparsity"),
                details.get("allocation"),
                details.get("gguf"),
            )
        )
    run.seconds = time.perf_counter() - started
    return run


def _score_windows(loaded, pairs: list, ids: list, lay: Layout, bos: int | None, base, save_base, say):
    """Every window through the dense model (or its `base` file) and each pair's perturbed model: per pair, the
    per-token metrics of each window on the host (name → list of (m,) tensors), and the sum over the scored
    positions of the hidden-state cosine per layer (None with a base file).

    Per window (engine.kld.window): each model runs to its head's inputs, the dense model's hidden states kept and
    each perturbed model's compared with them as it runs; then chunk by chunk of positions, the dense logits and
    their log-softmax once for every spec, and per spec its logits and metrics. Peak memory: the models, one
    forward pass's activations, the dense hidden states at the scored positions and one chunk of logits."""
    import torch

    from engine.kld.window import Cosines, Head, chunks, dense_side, pair_metrics

    ctx, m = lay.ctx, lay.scored
    collected: list[dict[str, list]] = [{} for _ in pairs]
    cos_sum: list = [None for _ in pairs]
    stage = f"kld windows ({len(pairs)} spec{'s' * (len(pairs) != 1)})" if pairs else "kld windows (dense)"
    say(stage, 0, len(lay.starts))
    device = loaded.device
    models = ([loaded.model] if base is None else []) + [pair.perturbed for pair in pairs]
    heads = {id(model): Head.of(model) for model in models}  # None: scored from the model's own logits
    rows = base.windows(len(lay.starts), device) if base is not None else None
    cosines = base is None and bool(pairs)
    if cosines:
        cos_sum = [torch.zeros(len(pair.hidden_map), dtype=torch.float64) for pair in pairs]
    try:
        for w, start in enumerate(lay.starts):
            window = list(ids[start : start + ctx])
            if bos is not None:
                window[0] = bos
            x = torch.tensor([window], dtype=torch.long, device=device)
            tgt = torch.tensor(window[ctx - m :], dtype=torch.long, device=device)
            states = Cosines(len(pairs[0].hidden_map)) if cosines else None
            dense = None
            if base is None:
                dense = _forward(loaded.model, x, m, heads, states.keep if states is not None else None)
                if save_base is not None and save_base.exact:
                    save_base.add_head_in(dense)
            perturbed = []
            for j, pair in enumerate(pairs):
                on_state = states.against(pair.hidden_map, cos_sum[j]) if states is not None else None
                perturbed.append(_forward(pair.perturbed, x, m, heads, on_state))
                if states is not None:
                    states.settle()
            states = None  # the dense hidden states, before the logits
            dense_rows = next(rows) if rows is not None else None
            if not pairs and (save_base is None or save_base.exact):
                say(stage, w + 1, len(lay.starts))
                continue
            found: list[dict[str, list]] = [{} for _ in pairs]
            vocab = dense.vocab if dense is not None else perturbed[0].vocab
            for lo, hi in chunks(m, vocab):
                t = tgt[lo:hi]
                if base is None:
                    logits = dense.logits_at(lo, hi)
                    d = dense_side(logits, t)
                    if save_base is not None and not save_base.exact:
                        save_base.add_dense(d, logits)
                    score = pair_metrics
                else:
                    d = base.dense_side(dense_rows, lo, hi, t)
                    score = base.pair_metrics
                for j, p in enumerate(perturbed):
                    for name, value in score(d, p.logits_at(lo, hi), t).items():
                        found[j].setdefault(name, []).append(value)
            for j in range(len(pairs)):  # to the host once per window
                for name, parts in found[j].items():
                    collected[j].setdefault(name, []).append(torch.cat(parts).cpu())
            say(stage, w + 1, len(lay.starts))
    finally:
        if rows is not None:
            rows.close()
    return collected, cos_sum if cosines else [None for _ in pairs]


def _forward(model, x, m: int, heads: dict, on_state):
    """engine.kld.window.forward with the model's head (None once a window showed its logits are not head(h))."""
    from engine.kld.window import forward

    window = forward(model, x, m, heads[id(model)], on_state)
    heads[id(model)] = window.head
    return window


# ------------------------------------------------------------------ the tables


def write_tables(run: KldRun, out: str | Path, tokenizer) -> list[dict]:
    """OUT/kld_tokens.parquet, OUT/kld_summary.parquet and .csv, OUT/kld_pairs.parquet and .csv (engine.record.schema;
    an empty table with one spec) and OUT/kld_worst.json; returns the summary rows."""
    import json

    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    from engine.record import schema
    from engine.record.paths import atomic_write

    out = Path(out)
    summary = run.summaries()
    tokens = schema.to_table(run.token_rows(), schema.KLD_TOKENS, "kld_tokens.parquet")
    table = schema.to_table(summary, schema.KLD_SUMMARY, "kld_summary.parquet")
    atomic_write(out / "kld_tokens.parquet", lambda path: pq.write_table(tokens, str(path)))
    atomic_write(out / "kld_summary.parquet", lambda path: pq.write_table(table, str(path)))
    flat = table.drop_columns(["conf_count", "conf_kl_mean", "hidden_cos"])
    atomic_write(out / "kld_summary.csv", lambda path: pcsv.write_csv(flat, str(path)))
    run.pairs = pair_rows(run)
    pairs = schema.to_table(run.pairs, schema.KLD_PAIRS, "kld_pairs.parquet")
    atomic_write(out / "kld_pairs.parquet", lambda path: pq.write_table(pairs, str(path)))
    atomic_write(out / "kld_pairs.csv", lambda path: pcsv.write_csv(pairs, str(path)))
    worst = {"model": run.model, "corpus": run.corpus, "ctx": run.ctx, "worst": run.worst(tokenizer)}
    atomic_write(out / "kld_worst.json", json.dumps(worst, ensure_ascii=False, indent=1))
    if run.workers:  # --ray: who scored each spec, how long it took
        atomic_write(out / "kld_workers.json", json.dumps(run.workers, ensure_ascii=False, indent=1))
    return summary


def worst_prompt(run_dir: str | Path, n: int, spec: str | None = None, model: str | None = None) -> dict:
    """The N-th worst token (1 = the highest KL) of a `hierui kld` output folder, for `explore --from-kld`:
    {model, spec, prompt (the text before it in its window), kl, text}. `spec`: the user's --prune (None: not
    given, the run's first spec), which picks one of the run's specs: another is refused. `model`: the user's
    --model (None: not given), which only confirms the file's: another is refused (engine.models.trust,
    confirm_only). The file is untrusted input: the model and a checkpoint spec it names go through
    engine.models.trust. The spec's calibration is kld.json's (engine.kld.folder.recorded_calibration)."""
    import json

    from engine.models.trust import same, trusted
    from engine.record.validate import escape

    path = Path(run_dir).expanduser() / "kld_worst.json"
    if not path.is_file():
        raise HieruiError(f"--from-kld {run_dir}: no kld_worst.json there (the output folder of hierui kld)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        entries = list(data["worst"])
        specs = list(dict.fromkeys(e["spec"] for e in entries))
        if not isinstance(data["model"], str) or not all(isinstance(s, str) for s in specs):
            raise TypeError("the model and the specs are strings")
    except (OSError, ValueError, KeyError, TypeError):
        raise HieruiError(f"--from-kld {path}: not a readable kld_worst.json") from None
    if not specs:
        raise HieruiError(f"--from-kld {path}: holds no tokens")
    chosen = specs[0] if spec is None else next((s for s in specs if same(s, spec, "spec")), None)
    if chosen is None:
        held = ", ".join(escape(s) for s in specs)
        raise HieruiError(f"--prune {spec}: {path} holds the worst tokens of {held}: pick one or leave --prune out")
    mine = sorted((e for e in entries if e["spec"] == chosen), key=lambda e: e["rank"])
    if not 1 <= n <= len(mine):
        raise HieruiError(f"--worst {n}: {path} holds the {len(mine)} worst tokens of {chosen} (use 1 … {len(mine)})")
    entry = mine[n - 1]
    if not entry.get("context"):
        raise HieruiError(f"--worst {n}: that token has no preceding text in its window")
    return {
        "model": trusted(data["model"], model, "model", path, confirm_only=True),
        "spec": trusted(chosen, spec, "spec", path, confirm_only=True),
        "prompt": entry["context"],
        "kl": entry["kl"],
        "text": entry["text"],
    }
