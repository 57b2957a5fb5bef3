"""The dense base file of `hierui kld`: what perturbed models are scored against later without running the dense
model (as llama.cpp's --kl-divergence-base). Two kinds, both safetensors files:

**exact** (the default of `--save-base`): per scored token i (in corpus order, engine.kld.corpus's windows)
    head_in    (n, d)  the input of the dense model's output head (after its final norm), in the model's dtype
and once
    head_weight (V, d) the dense output head's weight (head_bias (V,) where it has one), in the model's dtype
and in the header the final logit soft-capping (Gemma 2) when there is one. Scoring recomputes the dense logits
as head(head_in) — the same operation on the same numbers as the dense model's last step, so every statistic
equals the two-model run's up to the rounding of a matmul of another shape (on the embedded model, heldout suite,
wanda:0.5, sparsegpt:0.5 and nf4: every per-token KL identical, difference 0.0). No dense forward runs: only the
dense head (V × d) sits beside the perturbed model, and `hierui kld --model DIR --base FILE` (DIR a saved
perturbed model, `hierui prune --save`) never loads the dense model at all.
Size: n·d + V·d elements, e.g. 1,530 heldout tokens of SmolLM2-135M in float32 = 3.5 MB + 113 MB of head; 300k
tokens of a 7B Llama in bfloat16 = 2.4 GB + 0.26 GB (llama.cpp's 16-bit full-vocabulary file would be 19 GB).
Writing one checks, on every window (engine.kld.window.forward), that the model's logits are head(head_in)
(soft-capped): a model whose logits are anything else (a logit scale, say) gets one clear line asking for a top-K
file. Reading one, a thread reads the next windows' rows (BaseFile.windows) while the perturbed model runs.

**top-K** (`--save-base FILE --base-k K`): per scored token
    topk_ids   int32   (n, K)  the dense model's K most probable tokens, most probable first
    topk_logp  float32 (n, K)  their log-probabilities ln P_d
    tail_logp  float32 (n,)    ln P_tail, P_tail = 1 − Σ_topK P_d (computed as a log-sum-exp over the rest)
    nll        float32 (n,)    −ln P_d(actual next token), exact (whether or not it is in the top K)
n·(8K + 8) bytes: 0.8 MB for the heldout suite at K = 64.

Both carry in the header (safetensors metadata, strings): format, version, kind, k (top-K), ctx, stride, tokens,
vocab, the tokenizer's fingerprint (engine.kld.corpus.tokenizer_fingerprint), the corpus's SHA-256, the model's
name and model_key (its weights' fingerprint, engine.models.names.ModelRef.cache_key, as every cache keys them).
A run that perturbs --model (kld --prune … --base FILE) must perturb the dense model the file was made from
(BaseFile.check_model); scoring a saved model (--model DIR --base FILE, no --prune) checks only the tokenizer,
vocabulary and tokens, as for a file that names no model_key (older files, and llama.cpp's).

The KL against a top-K file. With T the dense top-K, P_T = 1 − Σ_T P_d and Q_T = 1 − Σ_T P_p the two tail masses
(each a log-sum-exp over the tokens outside T):

    kl   = Σ_{i∈T} P_d(i) ln(P_d(i)/P_p(i)) + P_T ln(P_T/Q_T)
    kl_rev = Σ_{i∈T} P_p(i) ln(P_p(i)/P_d(i)) + Q_T ln(Q_T/P_T)

The top-K terms are exactly those of the full-vocabulary sums. The tail is one bucket: by the log-sum
inequality, Σ_{i∉T} a_i ln(a_i/b_i) ≥ (Σ a_i) ln(Σ a_i / Σ b_i) for non-negative a, b, so each bucketed tail
term is at most the true tail sum, and `kl`, `kl_rev` are lower bounds of the full KL: exact where the tail
distributions are proportional (P_d(i)/P_p(i) constant outside T), and the error is at most the full tail sum
minus its bucket. How tight it is depends on how far the perturbed tail is from proportional: measured on the
embedded SmolLM2-135M, wanda:0.5, heldout suite, ctx 512 (first 3 windows, full mean KL 0.817), the bound is
12.5% under at K = 64, 5.5% at 256, 1.9% at 1024, 0.4% at 4096 (tests/test_kld.py checks < 1% at 4096 for
magnitude:0.3). A small model's next-token distribution over 49,152 tokens keeps much of its mass, and of the
perturbation, outside any top 64: that is why the default file is the exact kind. same_top, dp, nll_d, nll_p and
conf_d are exact with either kind (the dense top-1 is topk_ids[:, 0]); the hidden-state cosines need the dense
model's every layer and are unavailable (null) with both.
"""

from __future__ import annotations

from pathlib import Path

from engine.errors import HieruiError
from engine.record.validate import escape

FORMAT = "hierui-kld-base"
VERSION = "1"
TOPK_SHAPES = ("topk_ids", "topk_logp", "tail_logp", "nll")
LOGP_SLACK = 1e-4  # a stored log-probability above 0 by more than float32 rounding is refused
READ_AHEAD = 2  # windows of a base file read ahead of the scoring


class BaseWriter:
    """Collects what a base file holds, window by window (moved to the host once per window).

    `k` None: the exact kind (call `bind(model)` first, then `add_head_in(window)` per window); an int: the top-K
    kind (`add_dense(dense)` per chunk of positions)."""

    bos_first = False  # hierui's token stream (engine.kld.corpus.tokenize); llama.cpp's files begin with the BOS

    def __init__(self, path: str | Path, k: int | None = None):
        self.path = Path(path)
        self.k = k
        self.parts: dict[str, list] = {}
        self.head: dict = {}
        self.softcap: float | None = None

    @property
    def exact(self) -> bool:
        return self.k is None

    def bind(self, model) -> None:
        """The exact kind: the dense model's output head (weight, bias) and its final soft-capping."""
        from engine.kld.window import Head

        head = Head.of(model)
        if head is None:
            raise HieruiError(
                "--save-base: this model's output head is not a plain matrix; write a top-K file with --base-k K"
            )
        self.head = {"head_weight": head.weight}
        if head.bias is not None:
            self.head["head_bias"] = head.bias
        self.softcap = head.softcap

    def add_head_in(self, window) -> None:
        """The exact kind: one window's head inputs at its scored positions (an engine.kld.window.Window). A
        window whose logits are not head(head input) (the model rescales them; engine.kld.window.forward checks
        every window) is refused: the file would lie."""
        if window.head is None:
            raise HieruiError(
                "--save-base: this model's logits are not its output head applied to the last hidden "
                "state (it rescales them); write a top-K file with --base-k K"
            )
        self.parts.setdefault("head_in", []).append(window.head_in.cpu())

    def add_dense(self, dense: dict, logits=None) -> None:
        """The top-K kind: one chunk of scored positions, from engine.kld.window.dense_side (its log-probabilities
        and the NLL of the actual next tokens; `logits`, the chunk's logits, are for llama.cpp's writer)."""
        lp = dense["lp"]
        logp, ids = lp.topk(self.k, dim=-1)
        tail = lp.scatter(-1, ids, float("-inf")).logsumexp(dim=-1)
        for name, value in zip(TOPK_SHAPES, (ids.int(), logp, tail, dense["nll"])):
            self.parts.setdefault(name, []).append(value.cpu())

    def write(self, tokenizer, text: str, lay, model: str, model_key: str | None = None) -> Path:
        """The file, written whole (engine.record.paths.atomic_write); `model`, `model_key`: the dense model's --model
        name and its ModelRef.cache_key."""
        import torch
        from safetensors.torch import save_file

        from engine.kld.corpus import text_hash, tokenizer_fingerprint
        from engine.record.paths import atomic_write

        tensors = {name: torch.cat(parts).contiguous() for name, parts in self.parts.items()}
        if self.exact:
            tensors.update({name: t.cpu().contiguous().clone() for name, t in self.head.items()})
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "kind": "exact" if self.exact else "topk",
            "k": str(self.k or 0),
            "ctx": str(lay.ctx),
            "stride": str(lay.stride),
            "tokens": str(lay.total),
            # the logits' width: the head's rows (an embedding padded past the tokenizer has more), else the tokenizer's
            "vocab": str(self.head["head_weight"].shape[0] if self.exact else len(tokenizer)),
            "tokenizer": tokenizer_fingerprint(tokenizer),
            "corpus_sha256": text_hash(text),
            "model": model,
        }
        if model_key:
            meta["model_key"] = model_key
        if self.softcap:
            meta["softcap"] = repr(self.softcap)
        return atomic_write(self.path, lambda path: save_file(tensors, str(path), metadata=meta))

    def describe(self, tokens: int) -> str:
        if self.exact:
            d = self.parts["head_in"][0].shape[-1] if self.parts.get("head_in") else 0
            return f"exact (the dense head's inputs, d = {d}, and its head) for {tokens} tokens"
        return f"top-{self.k} log-probabilities of {tokens} tokens"


class BaseFile:
    """A base file, checked whole against this run before any model runs. A top-K file is read whole (a few MB);
    an exact one keeps its head in memory and reads the head inputs a window at a time (memory-mapped).

    The file is untrusted input: its metadata names the dense model only to describe it, and nothing loads what
    it names (the user gives --model; engine.models.trust); values from it are escaped in messages."""

    bos_first = False

    def __init__(self, path: str | Path):
        from engine.record.paths import check_regular_file

        self.path = check_regular_file(path, "--base")  # missing, a folder, a FIFO: one line
        try:
            from safetensors import safe_open

            with safe_open(str(self.path), framework="pt") as f:
                self.meta = dict(f.metadata() or {})
                self.shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118
        except Exception as e:  # a truncated or foreign file: safetensors' own errors vary
            raise HieruiError(f"--base {self.path}: not a readable base file ({type(e).__name__})") from None
        if self.meta.get("format") != FORMAT:
            raise HieruiError(f"--base {self.path}: not a hierui kld base file (write one with --save-base)")
        if self.meta.get("version") != VERSION:
            version = escape(str(self.meta.get("version")))
            raise HieruiError(f"--base {self.path}: base file version {version}, expected {VERSION}")
        try:
            self.kind = self.meta.get("kind", "topk")
            self.k, self.ctx = int(self.meta["k"]), int(self.meta["ctx"])
            self.stride, self.n = int(self.meta["stride"]), int(self.meta["tokens"])
            self.vocab = int(self.meta["vocab"])
            self.softcap = float(self.meta["softcap"]) if self.meta.get("softcap") else None
        except (KeyError, ValueError):
            raise HieruiError(f"--base {self.path}: its header is incomplete") from None
        if self.kind == "exact":
            d = self.shapes.get("head_in", (0, 0))[-1]
            shapes = {"head_in": (self.n, d), "head_weight": (self.vocab, d)}
            if "head_bias" in self.shapes:
                shapes["head_bias"] = (self.vocab,)
        elif self.kind == "topk":
            shapes = {"topk_ids": (self.n, self.k), "topk_logp": (self.n, self.k), "tail_logp": (self.n,)}
            shapes["nll"] = (self.n,)
        else:
            raise HieruiError(f"--base {self.path}: unknown kind {self.kind!r}")
        for name, shape in shapes.items():
            if self.shapes.get(name) != shape:
                raise HieruiError(f"--base {self.path}: tensor {name} is missing or not of shape {shape}")
        self._checked: dict = {}
        self._check_values()
        self.scored = 0
        self._device: dict = {}
        self._ids_checked: int | None = None  # the vocab_size check_ids passed for

    def _check_values(self) -> None:
        """The file's numbers, before any model loads: every value finite, a top-K file's log-probabilities at most
        0 and its nll at least 0 (within LOGP_SLACK; tail_logp may be -inf: the top K hold all the mass). One line
        naming the tensor and the first bad row: a NaN or an impossible probability was scored silently (`Mean
        KLD: nan`). An exact file's head_in is read in slices of about 64 MB (the whole file once, memory-mapped):
        a few seconds for a 2 GB file, against the model's minutes, for a bad file failing before the model loads."""
        import torch
        from safetensors import safe_open

        with safe_open(str(self.path), framework="pt") as f:
            if self.exact:
                for name in ("head_weight", "head_bias"):
                    if name in self.shapes:
                        self._checked[name] = f.get_tensor(name)  # kept for the scoring (_whole): read once
                        self._refuse_where(name, ~torch.isfinite(self._checked[name]), "a non-finite value")
                rows = self.shapes["head_in"]
                step = max(1, (64 << 20) // max(1, rows[1] * 4))
                head_in = f.get_slice("head_in")
                for start in range(0, rows[0], step):
                    bad = ~torch.isfinite(head_in[start : start + step])
                    self._refuse_where("head_in", bad, "a non-finite value", start)
                return
            logp, tail, nll = (f.get_tensor(name).float() for name in ("topk_logp", "tail_logp", "nll"))
        self._refuse_where("topk_logp", ~torch.isfinite(logp), "a non-finite log-probability")
        self._refuse_where("topk_logp", logp > LOGP_SLACK, "a log-probability above 0")
        self._refuse_where("tail_logp", torch.isnan(tail) | (tail == float("inf")), "a NaN or +inf log-probability")
        self._refuse_where("tail_logp", tail > LOGP_SLACK, "a log-probability above 0")
        self._refuse_where("nll", ~torch.isfinite(nll), "a non-finite value")
        self._refuse_where("nll", nll < -LOGP_SLACK, "a negative value (a probability above 1)")

    def _refuse_where(self, name: str, bad, what: str, start: int = 0) -> None:
        if bool(bad.any()):
            row = start + int(bad.reshape(bad.shape[0], -1).any(dim=1).nonzero()[0, 0]) if bad.dim() else start
            raise HieruiError(f"--base {self.path}: its {name} holds {what} (row {row}); write the base file again")

    @property
    def exact(self) -> bool:
        return self.kind == "exact"

    def describe(self) -> str:
        return "exact: the dense head's inputs" if self.exact else f"top-{self.k}, KL lower bounds"

    @property
    def model(self) -> str | None:
        """The dense model's name as the file records it (escaped: the file is untrusted), None where it names none."""
        name = self.meta.get("model")
        return escape(str(name)) if name else None

    def check_model(self, model: str) -> None:
        """`model` (a --model name, resolved, not loaded) must be the dense model the file was made from, when the
        file records its model_key: one line where its weights differ. A file without one (written before it was
        recorded, or by another tool) is checked by tokenizer, vocabulary and tokens only (check)."""
        key = self.meta.get("model_key")
        if not key:
            return
        from engine.models.names import resolve

        if resolve(model).cache_key() != key:
            raise HieruiError(
                f"--base {self.path}: made from another dense model ({self.model or escape(str(key))}) than --model "
                f"{model}: a --prune spec perturbs --model, so use the base file's dense model (without --prune, "
                "--model DIR is scored against the base file as it is)"
            )

    def check(self, tokenizer, text: str, lay, vocab_size: int | None = None, model: str | None = None) -> None:
        """One clear line when this run's tokenizer, corpus or windows are not the base file's, or (`vocab_size`:
        the token ids `model` embeds, where known) when the file holds a token id the model has not (check_ids)."""
        from engine.kld.corpus import text_hash, tokenizer_fingerprint

        if self.meta.get("tokenizer") != tokenizer_fingerprint(tokenizer):
            raise HieruiError(
                f"--base {self.path}: written with another tokenizer (model {escape(str(self.meta.get('model')))}); "
                "use a model with the same tokenizer"
            )
        if self.meta.get("corpus_sha256") != text_hash(text):
            raise HieruiError(f"--base {self.path}: written for another corpus; use the same --text or --suite")
        if (self.ctx, self.stride) != (lay.ctx, lay.stride):
            raise HieruiError(
                f"--base {self.path}: written with --ctx {self.ctx} --stride {self.stride}, "
                f"this run has --ctx {lay.ctx} --stride {lay.stride}"
            )
        if self.n != lay.total:
            raise HieruiError(f"--base {self.path}: holds {self.n} tokens, this run scores {lay.total}")
        self.scored = lay.scored
        if vocab_size is not None:
            self.check_ids(vocab_size, model)

    def check_ids(self, vocab_size: int, model: str | None = None) -> None:
        """The token ids the file holds, against the model scored against it (`vocab_size`: its embedding rows),
        before it runs: a top-K file's topk_ids (engine.models.tokens.check_token_ids: one line naming the file,
        the position and the id), an exact file's head (one row per token id)."""
        if self._ids_checked == vocab_size:
            return
        if self.exact:
            rows = self.shapes["head_weight"][0]
            if rows != vocab_size:
                raise HieruiError(
                    f"--base {self.path}: its head scores {rows} token ids, {model or 'the model'} has {vocab_size}"
                )
        else:
            from safetensors import safe_open

            from engine.models.tokens import check_token_ids

            with safe_open(str(self.path), framework="pt") as f:
                ids = f.get_tensor("topk_ids")
            check_token_ids(ids, vocab_size, f"--base {self.path}: topk_ids", model)
        self._ids_checked = vocab_size

    def _whole(self, name: str, device):
        from safetensors import safe_open

        if name not in self._device:
            if name in self._checked:
                self._device[name] = self._checked.pop(name).to(device)
            else:
                with safe_open(str(self.path), framework="pt") as f:
                    self._device[name] = f.get_tensor(name).to(device)
        return self._device[name]

    def head(self, device):
        """The exact kind: the dense output head the file holds (engine.kld.window.Head), on `device`."""
        from engine.kld.window import Head

        bias = self._whole("head_bias", device) if "head_bias" in self.shapes else None
        return Head(self._whole("head_weight", device), bias, self.softcap)

    def _names(self) -> tuple:
        return ("head_in",) if self.exact else TOPK_SHAPES

    def read(self, w: int) -> dict:
        """Window `w`'s rows of the file (the exact kind: head_in; top-K: its four tensors), on the host."""
        from safetensors import safe_open

        rows = slice(w * self.scored, (w + 1) * self.scored)
        with safe_open(str(self.path), framework="pt") as f:
            return {name: f.get_slice(name)[rows] for name in self._names()}

    def windows(self, count: int, device):
        """read(0 … count − 1) on `device`, read by a thread at most READ_AHEAD windows ahead of the scoring
        (read_ahead), so that reading the file overlaps the perturbed model's forward passes."""
        return read_ahead(self.read, count, device)

    def dense_side(self, rows: dict, lo: int, hi: int, targets) -> dict:
        """The dense side of scored positions lo … hi − 1 of a window (its `rows`, from windows()): the exact kind's
        as engine.kld.window.dense_side of the recomputed logits, the top-K kind's its stored tensors."""
        if self.exact:
            from engine.kld.window import dense_side

            head_in = rows["head_in"][lo:hi]
            return dense_side(self.head(head_in.device)(head_in), targets)
        return {name: rows[name][lo:hi] for name in TOPK_SHAPES}

    def pair_metrics(self, dense: dict, logits_p, targets) -> dict:
        """engine.kld.window.pair_metrics against the file's dense side (for a top-K file, kl and kl_rev are the
        bounded forms above)."""
        import torch

        if self.exact:
            from engine.kld.window import pair_metrics

            return pair_metrics(dense, logits_p, targets)
        ids = dense["topk_ids"].long()
        lp_dk, tail_d, nll_d = dense["topk_logp"], dense["tail_logp"], dense["nll"]
        lp_p = torch.log_softmax(logits_p.to(ids.device), dim=-1)
        top_p = lp_p.argmax(dim=-1)
        lq_k = lp_p.gather(-1, ids)
        nll_p = -lp_p.gather(-1, targets[:, None])[:, 0]
        tail_p = lp_p.scatter_(-1, ids, float("-inf")).logsumexp(dim=-1)  # lp_p is not read again
        p_k, q_k = lp_dk.exp(), lq_k.exp()
        p_t, q_t = tail_d.exp(), tail_p.exp()
        zero = torch.zeros_like(p_t)
        kl = (p_k * (lp_dk - lq_k)).sum(-1) + torch.where(p_t > 0, p_t * (tail_d - tail_p), zero)
        kl_rev = (q_k * (lq_k - lp_dk)).sum(-1) + torch.where(q_t > 0, q_t * (tail_p - tail_d), zero)
        return {
            "kl": kl,
            "kl_rev": kl_rev,
            "same_top": ids[:, 0] == top_p,
            "dp": nll_p.neg().exp() - nll_d.neg().exp(),
            "nll_d": nll_d,
            "nll_p": nll_p,
            "conf_d": lp_dk[:, 0].exp(),
            "top_d": ids[:, 0],
            "top_p": top_p,
        }

    def token_metrics(self, w: int, logits_p, targets) -> dict:
        """The metrics of window `w`'s scored positions at once (logits_p (m, V)): one window, for checks."""
        rows = {name: t.to(logits_p.device) for name, t in self.read(w).items()}
        return self.pair_metrics(self.dense_side(rows, 0, self.scored, targets), logits_p, targets)


def read_ahead(read, count: int, device):
    """read(0 … count − 1) (dicts of host tensors) moved to `device`, read by a thread at most READ_AHEAD windows
    ahead of the consumer (a bounded queue)."""
    import queue
    import threading

    ahead: queue.Queue = queue.Queue(maxsize=READ_AHEAD)
    stop = threading.Event()

    def reader() -> None:
        try:
            for w in range(count):
                if stop.is_set():
                    return
                ahead.put({name: t.to(device, non_blocking=True) for name, t in read(w).items()})
        except BaseException as e:  # handed to the consumer's thread, raised there
            ahead.put(e)

    thread = threading.Thread(target=reader, name="hierui-base-reader", daemon=True)
    thread.start()
    try:
        for _ in range(count):
            item = ahead.get()
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a reader waiting on a full queue
            try:
                ahead.get_nowait()
            except queue.Empty:
                thread.join(0.01)
