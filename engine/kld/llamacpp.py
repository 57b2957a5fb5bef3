"""llama.cpp's KL-divergence base file (`llama-perplexity --kl-divergence-base FILE`), written and read by
`hierui kld` (`--save-base FILE --base-format llama.cpp`; `--base FILE` knows it by its first bytes).

The layout (tools/perplexity/perplexity.cpp, read there; all little-endian):

    "_logits_"                      8 bytes
    n_ctx, n_vocab, n_chunk         int32 each
    tokens                          int32 × n_chunk·n_ctx: the text as llama.cpp tokenizes it (a BOS first where
                                    the tokenizer adds one), cut to whole chunks
    per chunk, per scored position  nv = 2·⌈n_vocab/2⌉ + 4 uint16 (a row)

Chunk c is tokens[c·n_ctx … (c+1)·n_ctx − 1] with its first token replaced by the BOS (where there is one), as
hierui's windows at --stride = --ctx over the same token stream (engine.kld.corpus, bos_first). Its scored
positions are n_ctx/2 … n_ctx − 2 (n_ctx − 1 − n_ctx/2 of them, hierui's `Layout.scored`), the logits at j
predicting token j + 1. A row is, from that position's float32 logits z:

    max = max z;  lo = max(min z, max − 16);  lse = ln Σ exp(z − max)  (summed in double, kept as float32)
    scale = (max − lo)/65535;  min_log_prob = lo − max − lse           (the row's first 4 uint16: two float32)
    q_i = round(z_i − lo)/scale  to the nearest integer (ties to even: llama.cpp adds 1.5·2²³), 0 where z_i ≤ lo
                                                                        (all 0 where scale is 0)
    then n_vocab uint16 q_i and one uint16 of padding where n_vocab is odd.

Reading, ln P_d(i) ≈ scale·q_i + min_log_prob: 16 bits over the top 16 nats of each row, every logit more than
16 below the maximum at the floor. llama.cpp's own --kl-divergence then takes, per position,

    kl      = Σ_{i: ln P_d(i) > −16} P_d(i) (ln P_d(i) − ln P_p(i))   (the floor's terms dropped: their value is
                                                                      unknown, at most e^−16 each)
    nll_d   = −(scale·q_t + min_log_prob);  same_top: the first argmax of the stored q against the perturbed argmax

and hierui does the same (so its numbers against a llama.cpp file are llama.cpp's for the same logits), in
float32 as llama.cpp does. Beyond it: kl_rev = Σ_i P_p(i) (ln P_p(i) − ln P_d(i)) over every token, the floor
at its stored value (an upper bound of those tokens' ln P_d: their terms are lower bounds), conf_d the largest
stored probability, dp and nll as everywhere. The hidden-state cosines are unavailable (null), as with
hierui's top-K files. The file holds no model name, corpus hash or tokenizer: it is checked by its tokens (the
tokenizer's tokenization of --text / --suite, the first difference named), its n_ctx (the run's --ctx; left
out, it is the file's) and n_vocab (the model's token ids).
"""

from __future__ import annotations

import struct
from pathlib import Path

from engine.errors import HieruiError

MAGIC = b"_logits_"
HEADER = 8 + 12
FLOOR = -16.0  # llama.cpp keeps the top 16 nats of a row, and drops the KL terms at or below −16


def row_width(n_vocab: int) -> int:
    """uint16 values per scored position: two float32, the vocabulary, padded to an even count."""
    return 2 * ((n_vocab + 1) // 2) + 4


def scored(n_ctx: int) -> int:
    return n_ctx - 1 - n_ctx // 2


def is_llamacpp(path: str | Path) -> bool:
    """Whether `path` starts with llama.cpp's magic (False for anything unreadable or not a regular file, which
    opening would block on, a FIFO: the caller's reader says why)."""
    if not Path(path).is_file():
        return False
    try:
        with open(path, "rb") as f:
            return f.read(8) == MAGIC
    except OSError:
        return False


def peek_ctx(path: str | Path) -> int | None:
    """The n_ctx of a llama.cpp base file (None: not one, not a regular file, or too short to say)."""
    if not Path(path).is_file():
        return None
    try:
        with open(path, "rb") as f:
            head = f.read(12)
    except OSError:
        return None
    if len(head) < 12 or head[:8] != MAGIC:
        return None
    return struct.unpack("<i", head[8:12])[0]


def log_softmax(logits):
    """ln softmax of (m, V) logits as llama.cpp takes it: z − max − ln Σ exp(z − max), the sum in float64, the rest
    in float32. torch.log_softmax's float32 sum is biased on real logits (on the embedded model's, by about +9e-6
    nats: the 16-bit file's own rounding is unbiased), and the NLL, the KL and the PPL ratio would carry it."""
    z = logits.float()
    top = z.max(dim=-1, keepdim=True).values
    return (z - top) - (z - top).exp().double().sum(dim=-1, keepdim=True).log().float()


def quantize(logits):
    """llama.cpp's rows of (m, V) float32 logits: a (m, row_width(V)) uint16 numpy array (on the host)."""
    import numpy as np
    import torch

    z = logits.float()
    m, v = z.shape
    top = z.max(dim=-1).values
    lo = torch.maximum(z.min(dim=-1).values, top - 16)
    lse = (z - top[:, None]).exp().double().sum(dim=-1).log().float()
    min_log_prob = (lo - top) - lse
    scale = (top - lo) / 65535
    inv = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
    q = torch.round(inv[:, None] * (z - lo[:, None]))
    q = torch.where((z > lo[:, None]) & (scale[:, None] > 0), q, torch.zeros_like(q)).clamp_(0, 65535)
    rows = np.zeros((m, row_width(v)), dtype=np.uint16)
    head = torch.stack([scale, min_log_prob], dim=1).cpu().numpy().astype("<f4")
    rows[:, :4] = head.view("<u2")
    rows[:, 4 : 4 + v] = q.to(torch.int32).cpu().numpy().astype(np.uint16)
    return rows


def dequantize(rows, n_vocab: int):
    """(m, V) float32 torch log-probabilities of (m, nv) uint16 rows (a numpy array or a torch int32 tensor)."""
    import numpy as np
    import torch

    rows = np.ascontiguousarray(rows, dtype=np.uint16)
    head = torch.from_numpy(rows[:, :4].copy().view("<f4").astype(np.float32))
    q = torch.from_numpy(rows[:, 4 : 4 + n_vocab].astype(np.int32))
    return head[:, :1] * q.float() + head[:, 1:2], q


def open_base(path: str | Path):
    """The base file at `path`: llama.cpp's (LlamaCppBase, known by its first bytes) or hierui's own
    (engine.kld.base.BaseFile)."""
    from engine.kld.base import BaseFile

    return LlamaCppBase(path) if is_llamacpp(path) else BaseFile(path)


class LlamaCppWriter:
    """`--save-base FILE --base-format llama.cpp`: the rows, window by window, to a temporary file beside FILE
    (n · V · 2 bytes do not stay in memory), then the header, the tokens and the rows written whole."""

    exact = False
    bos_first = True  # the token stream as llama.cpp tokenizes it (engine.kld.corpus.tokenize)
    kind = "llama.cpp"

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.k = None
        self.vocab: int | None = None
        self.rows = 0
        self._tmp = None

    def add_dense(self, dense: dict, logits=None) -> None:
        """One chunk of scored positions: its float32 logits (dense_side's log-probabilities would round
        differently from llama.cpp's, which quantizes the logits)."""
        import tempfile

        if logits is None:
            raise ValueError("a llama.cpp base file is made from the logits")
        if self._tmp is None:
            self._tmp = tempfile.NamedTemporaryFile(prefix=".hierui-llamacpp-", dir=self.path.parent, delete=False)
        self.vocab = int(logits.shape[-1])
        rows = quantize(logits)
        self._tmp.write(rows.astype("<u2").tobytes())
        self.rows += rows.shape[0]

    def write(self, tokenizer, text: str, lay, model: str = "", model_key: str | None = None) -> Path:
        import os
        import shutil

        import numpy as np

        from engine.kld.corpus import tokenize
        from engine.record.paths import atomic_write

        if lay.stride != lay.ctx:
            raise HieruiError("--base-format llama.cpp: llama.cpp's chunks do not overlap; use --stride = --ctx")
        n_chunk = len(lay.starts)
        ids = tokenize(tokenizer, text, bos_first=True)[: n_chunk * lay.ctx]
        tmp = self._tmp
        if tmp is None or self.rows != lay.total:
            raise HieruiError(f"--save-base {self.path}: {self.rows} scored positions, the windows hold {lay.total}")
        tmp.close()

        def put(path: Path) -> None:
            with open(path, "wb") as out, open(tmp.name, "rb") as body:
                out.write(MAGIC + struct.pack("<iii", lay.ctx, self.vocab, n_chunk))
                out.write(np.asarray(ids, dtype="<i4").tobytes())
                shutil.copyfileobj(body, out, 1 << 22)

        try:
            return atomic_write(self.path, put)
        finally:
            os.unlink(tmp.name)
            self._tmp = None

    def discard(self) -> None:
        import os

        if self._tmp is not None:
            self._tmp.close()
            os.unlink(self._tmp.name)
            self._tmp = None

    def describe(self, tokens: int) -> str:
        return f"llama.cpp's 16-bit log-probabilities (n_vocab {self.vocab}) for {tokens} tokens"


class LlamaCppBase:
    """A llama.cpp base file, read as engine.kld.base.BaseFile is (the same methods, for engine.kld.corpus.score):
    its header and tokens checked whole before any model runs, its rows read a window at a time (memory-mapped)."""

    exact = False
    bos_first = True
    kind = "llama.cpp"
    k = None
    model = None  # the file names no model
    meta: dict = {}

    def __init__(self, path: str | Path):
        import numpy as np

        from engine.record.paths import check_regular_file

        self.path = check_regular_file(path, "--base")
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(HEADER)
            if head[:8] != MAGIC:
                raise HieruiError(f"--base {self.path}: not a llama.cpp base file (it does not start with _logits_)")
            if len(head) < HEADER:
                raise HieruiError(f"--base {self.path}: truncated llama.cpp base file (its header is incomplete)")
            self.ctx, self.vocab, self.chunks = struct.unpack("<iii", head[8:HEADER])
        if self.ctx < 4 or self.vocab < 1 or self.chunks < 1:
            raise HieruiError(
                f"--base {self.path}: not a usable llama.cpp base file (n_ctx {self.ctx}, n_vocab {self.vocab}, "
                f"n_chunk {self.chunks})"
            )
        self.stride = self.ctx
        self.scored = scored(self.ctx)
        self.width = row_width(self.vocab)
        self.n = self.chunks * self.scored
        tokens_end = HEADER + 4 * self.chunks * self.ctx
        expected = tokens_end + 2 * self.n * self.width
        if size != expected:
            what = "truncated" if size < expected else "longer than its header says"
            raise HieruiError(
                f"--base {self.path}: {what}: {size} bytes, a llama.cpp file of n_ctx {self.ctx}, n_vocab "
                f"{self.vocab} and {self.chunks} chunks has {expected}"
            )
        self.tokens = np.fromfile(self.path, dtype="<i4", count=self.chunks * self.ctx, offset=HEADER)
        self._rows = np.memmap(self.path, dtype="<u2", mode="r", offset=tokens_end, shape=(self.n, self.width))

    def describe(self) -> str:
        return "llama.cpp: 16-bit log-probabilities"

    def check_model(self, model: str) -> None:
        """The file names no model: checked by its tokens and vocabulary only (check)."""

    def check(self, tokenizer, text: str, lay, vocab_size: int | None = None, model: str | None = None) -> None:
        """One clear line where the run's windows, tokens or vocabulary are not the file's."""
        from engine.kld.corpus import tokenize

        if (self.ctx, self.stride) != (lay.ctx, lay.stride):
            raise HieruiError(
                f"--base {self.path}: llama.cpp's chunks of {self.ctx} tokens; this run has --ctx {lay.ctx} "
                f"--stride {lay.stride} (leave --ctx and --stride out)"
            )
        ids = tokenize(tokenizer, text, bos_first=True)
        mine = ids[: len(self.tokens)]
        diff = next((i for i, (a, b) in enumerate(zip(self.tokens.tolist(), mine)) if a != b), None)
        if diff is None and len(mine) < len(self.tokens):
            diff = len(mine)
        if diff is not None:
            theirs = int(self.tokens[diff])
            ours = str(mine[diff]) if diff < len(mine) else "the end of the text"
            raise HieruiError(
                f"--base {self.path}: its tokens are not this text's: token {diff} is {theirs} there, {ours} here "
                "(use the --text it was made from and a model with the same tokenizer)"
            )
        if len(lay.starts) != self.chunks:
            raise HieruiError(
                f"--base {self.path}: holds {self.chunks} chunks of {self.ctx} tokens, this text has "
                f"{len(lay.starts)} (llama-perplexity --chunks cut it: give the text it scored)"
            )
        if vocab_size is not None:
            self.check_ids(vocab_size, model)

    def check_ids(self, vocab_size: int, model: str | None = None) -> None:
        if vocab_size != self.vocab:
            raise HieruiError(
                f"--base {self.path}: n_vocab {self.vocab}, {model or 'the model'} has {vocab_size} token ids"
            )
        bad = (self.tokens < 0) | (self.tokens >= vocab_size)
        if bad.any():
            where = int(bad.nonzero()[0][0])
            raise HieruiError(
                f"--base {self.path}: token {where} is id {int(self.tokens[where])}, not in the vocabulary"
            )

    def read(self, w: int) -> dict:
        """Window `w`'s rows: {"lp": (m, V) float32 log-probabilities, "q": (m, V) int32} on the host."""
        lp, q = dequantize(self._rows[w * self.scored : (w + 1) * self.scored], self.vocab)
        return {"lp": lp, "q": q}

    def windows(self, count: int, device):
        """read(0 … count − 1) on `device`, in order (a thread reads ahead, as engine.kld.base.BaseFile.windows)."""
        from engine.kld.base import read_ahead

        return read_ahead(self.read, count, device)

    def dense_side(self, rows: dict, lo: int, hi: int, targets) -> dict:
        """engine.kld.window.dense_side's fields from the file's rows; "p" is zero at or below the floor, so that
        the KL sums only the tokens llama.cpp's does."""
        import torch

        lp, q = rows["lp"][lo:hi], rows["q"][lo:hi]
        t = targets.to(lp.device)[:, None]
        return {
            "lp": lp,
            "p": torch.where(lp > FLOOR, lp.exp(), torch.zeros_like(lp)),
            "top": q.argmax(dim=-1),
            "nll": -lp.gather(-1, t)[:, 0],
            "conf": lp.max(dim=-1).values.exp(),
        }

    def pair_metrics(self, dense: dict, logits_p, targets) -> dict:
        """llama.cpp's KL (terms at or below the floor dropped: dense_side's "p") and the rest, against the file's
        rows, with the perturbed log-softmax as llama.cpp takes it (engine.kld.window.pair_metrics)."""
        from engine.kld.window import pair_metrics

        if logits_p.shape[-1] != dense["lp"].shape[-1]:
            raise HieruiError(f"--base {self.path}: n_vocab {self.vocab}, the model's logits have {logits_p.shape[-1]}")
        return pair_metrics(dense, logits_p, targets, log_softmax)

    def token_metrics(self, w: int, logits_p, targets) -> dict:
        rows = {name: t.to(logits_p.device) for name, t in self.read(w).items()}
        return self.pair_metrics(self.dense_side(rows, 0, self.scored, targets), logits_p, targets)
