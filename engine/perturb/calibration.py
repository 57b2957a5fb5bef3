"""Calibration token batches for Wanda, SparseGPT and the drop methods.

Default: sequences sampled from the dense model itself with a fixed seed (no data set needed): each
starts at the BOS token and is sampled at temperature 1 with end-of-sequence suppressed, so every
sequence has the full length. `--calib FILE`: a plain text file, tokenised once and cut into windows
at seeded random offsets. Results are cached under $HIERUI_HOME/calib keyed by model and settings and
by ALGORITHM_VERSION and the hierui version (engine.perturb.cache), with their metadata beside them.

How many sequences of how many tokens a command takes by default is engine.record.settings.default_calibration;
`describe_calibration` says what a run used, in one line. Torch is imported only when a batch is built.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from engine.errors import HieruiError
from engine.record.settings import CALIB_LENGTH, CALIB_SAMPLES, CALIB_SEED
from engine.record.texts import read_text_file

DEFAULT_SAMPLES = CALIB_SAMPLES
DEFAULT_LENGTH = CALIB_LENGTH
DEFAULT_SEED = CALIB_SEED
# sequences sampled at once. Part of the algorithm: the random stream is drawn batch by batch, so the first
# GENERATION_BATCH sequences of a seed are the same whatever the number asked for (the explorer's 32 are the
# first 32 of a sweep's 64) and a session recorded with 64 × 128 rebuilds the same calibration on a rerun.
GENERATION_BATCH = 32

# bump when the batches built change: cached calibration (and what was pruned with it) is then rebuilt
ALGORITHM_VERSION = 1


@dataclass
class Calibration:
    """N × L token ids (CPU, int64) and how they were made."""

    ids: object  # torch.LongTensor (samples, length)
    source: str  # "self" or the text file's path
    samples: int
    length: int
    seed: int
    key: str  # identifies (model, source, samples, length, seed)
    from_cache: bool = False
    seconds: float = 0.0  # time it took to build or load

    def describe(self) -> dict:
        return {
            "source": self.source,
            "samples": self.samples,
            "length": self.length,
            "seed": self.seed,
            "from_cache": self.from_cache,
            "seconds": round(self.seconds, 3),
        }


def describe_calibration(calib: dict | None) -> str:
    """One line on a run's calibration (the `calibration` dict of a session header, Calibration.describe()):
    "calibration: 32×128 self-generated", "calibration: 64×128 from notes.txt", "calibration: none"."""
    if not calib:
        return "calibration: none"
    size = f"{calib.get('samples', '?')}×{calib.get('length', '?')}"
    source = calib.get("source")
    origin = "self-generated" if source in (None, "self") else f"from {Path(str(source)).name}"
    seed = calib.get("seed")
    if source in (None, "self") and seed not in (None, DEFAULT_SEED):
        origin += f" (seed {seed})"
    return f"calibration: {size} {origin}"


def calibration_slot(model_key: str, source: str, samples: int, length: int, seed: int, model: str | None = None):
    """The cache entry (engine.perturb.cache.Slot) of these calibration settings: a text file counts by its content."""
    from engine.perturb import cache

    content = source
    if source != "self":
        content = f"file:{hashlib.sha256(Path(source).read_bytes()).hexdigest()[:16]}"
    settings = {"source": content, "samples": samples, "length": length, "seed": seed}
    info = {"model": model, "source_path": None if source == "self" else source}
    return cache.slot("calib", "calibration", {"model_key": model_key, "calibration": settings}, info)


def build_calibration(
    loaded,
    source: str | None = None,
    samples: int = DEFAULT_SAMPLES,
    length: int = DEFAULT_LENGTH,
    seed: int = DEFAULT_SEED,
    use_cache: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> Calibration:
    """Calibration ids for `loaded` (an engine.models.loading.LoadedModel)."""
    import torch

    if samples < 1 or length < 2:
        raise HieruiError(f"calibration needs at least 1 sample of at least 2 tokens (got {samples} × {length})")
    text = None
    if source is not None and source != "self":
        text = read_text_file(source, "--calib")  # the one check of a text file a user names
        source = str(Path(source).expanduser().resolve())
    else:
        source = "self"
    entry = calibration_slot(loaded.ref.cache_key(), source, samples, length, seed, model=loaded.ref.name)
    key, cached = entry.key, entry.path
    if use_cache and cached.is_file():
        try:
            ids = torch.load(cached, weights_only=True)
            if tuple(ids.shape) == (samples, length):
                from engine.models.tokens import check_token_ids, model_rows

                check_token_ids(ids, model_rows(loaded.model), f"cached calibration {cached}")  # untrusted file
                return Calibration(ids.long(), source, samples, length, seed, key, from_cache=True)
        except Exception:
            pass  # a broken cache file (not a tensor, another shape, an id the model has not) is rebuilt
    if source == "self":
        ids = sample_from_model(loaded.model, loaded.tokenizer, samples, length, seed, progress)
    else:
        ids = windows_from_text(loaded.tokenizer, text, samples, length, seed, source)
    if use_cache:
        entry.store(lambda tmp: torch.save(ids, tmp))
    return Calibration(ids, source, samples, length, seed, key)


def check_calibration_file(source: str | Path, length: int, model: str | None = None, what: str = "--calib") -> str:
    """A calibration file checked before any model loads, as its absolute path: a text file a user can name
    (engine.record.texts.read_text_file: there, a regular file, readable, UTF-8, not empty), and, where `model`'s
    tokenizer is on this machine (every model but a hub model, whose tokenizer may need a download), at least
    `length` tokens long, the one window every sample is cut from. A hub model's file is counted once its
    tokenizer is loaded, when the calibration is built (before a sweep writes anything)."""
    text = read_text_file(source, what)
    if model is not None:
        from engine.models.names import resolve

        if resolve(model).kind != "hub":
            from engine.models.loading import load_tokenizer

            _check_tokens(len(tokenize(load_tokenizer(model), text)), length, source, what)
    return str(Path(source).expanduser().resolve())


def tokenize(tokenizer, text: str) -> list[int]:
    """The calibration text's token ids, as windows_from_text cuts them (no special tokens)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _check_tokens(count: int, length: int, source, what: str) -> None:
    if count < length:
        raise HieruiError(
            f"{what} {source}: {count:,} token{'s' * (count != 1)}, fewer than one calibration sequence of "
            f"--calib-len {length}: give a longer text or a smaller --calib-len"
        )


def windows_from_text(tokenizer, text: str, samples: int, length: int, seed: int, source="the calibration text"):
    """`samples` windows of `length` tokens at seeded random offsets of the tokenised text."""
    import torch

    ids = torch.tensor(tokenize(tokenizer, text), dtype=torch.long)
    _check_tokens(ids.numel(), length, source, "--calib")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - length + 1, (samples,), generator=gen)
    return torch.stack([ids[s : s + length] for s in starts.tolist()]).long()


def sample_from_model(
    model, tokenizer, samples: int, length: int, seed: int, progress: Callable[[int, int], None] | None = None
):
    """Sequences sampled from `model` itself, batched, with a KV cache and a private seeded generator."""
    import torch
    from transformers import DynamicCache

    device = model.get_input_embeddings().weight.device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    from engine.models.tokens import eos_ids

    banned = sorted(
        eos_ids(tokenizer, model) | ({tokenizer.pad_token_id} if tokenizer.pad_token_id is not None else set())
    )
    start = tokenizer.bos_token_id
    vocab = model.get_output_embeddings().weight.shape[0]
    out = []
    done = 0
    total = samples * (length - 1)  # the first token of each sequence is given, not sampled
    if progress:
        progress(0, total)
    with torch.no_grad():
        for b0 in range(0, samples, GENERATION_BATCH):
            b = min(GENERATION_BATCH, samples - b0)
            if start is None:
                first = torch.randint(0, vocab, (b, 1), generator=gen)
            else:
                first = torch.full((b, 1), start, dtype=torch.long)
            seq = [first]
            cache = DynamicCache(config=model.config)
            nxt = first
            for _ in range(length - 1):
                logits = model(input_ids=nxt.to(device), cache=cache, use_cache=True).logits[:, -1, :].float().cpu()
                if banned:
                    logits[:, banned] = float("-inf")
                # exponential-race sampling: argmax p_i / E_i with E_i ~ Exp(1) draws i with probability p_i
                probs = torch.softmax(logits, dim=-1)
                race = torch.empty_like(probs).exponential_(generator=gen)
                nxt = (probs / race).argmax(dim=-1, keepdim=True)
                seq.append(nxt)
                done += b
                if progress:
                    progress(done, total)
            out.append(torch.cat(seq, dim=1))
    return torch.cat(out, dim=0).long()
