"""Perturbation specs: the strings users type after --prune, parsed into a `Spec`.

Grammar (see shared/design.md):  METHOD[:ARG[:ARG]]

    magnitude:0.5   wanda:0.5   sparsegpt:0.5      unstructured, sparsity in (0, 1)
    magnitude:2:4   wanda:2:4   sparsegpt:4:8      N:M semi-structured, keep N of every M, 0 < N < M
    attndrop:4      mlpdrop:4   blockdrop:4        drop the N most redundant sublayers / blocks
    int8            nf4                            bitsandbytes quantization
    checkpoint:PATH                                an already-perturbed model from elsewhere
    none                                           the dense model against itself
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from engine.errors import HieruiError

PRUNE_METHODS = ("magnitude", "wanda", "sparsegpt")
DROP_METHODS = ("attndrop", "mlpdrop", "blockdrop")
QUANT_METHODS = ("int8", "nf4")
ALL_METHODS = PRUNE_METHODS + DROP_METHODS + QUANT_METHODS + ("checkpoint", "none")


@dataclass(frozen=True)
class Spec:
    """A parsed perturbation spec.

    `sparsity` is set for unstructured pruning; `n`, `m` for N:M (keep n of every m);
    `count` for drop methods; `path` for checkpoint.
    """

    method: str
    sparsity: float | None = None
    n: int | None = None
    m: int | None = None
    count: int | None = None
    path: str | None = None

    @property
    def family(self) -> str:
        if self.method in PRUNE_METHODS:
            return "prune"
        if self.method in DROP_METHODS:
            return "drop"
        if self.method in QUANT_METHODS:
            return "quant"
        return self.method

    @property
    def needs_calibration(self) -> bool:
        return self.method in ("wanda", "sparsegpt") or self.family == "drop"

    @property
    def target_sparsity(self) -> float | None:
        """The fraction of decoder-linear weights the spec asks to zero."""
        if self.sparsity is not None:
            return self.sparsity
        if self.n is not None and self.m is not None:
            return 1.0 - self.n / self.m
        return None

    def __str__(self) -> str:
        if self.method == "checkpoint":
            return f"checkpoint:{self.path}"
        if self.sparsity is not None:
            return f"{self.method}:{self.sparsity:g}"
        if self.n is not None:
            return f"{self.method}:{self.n}:{self.m}"
        if self.count is not None:
            return f"{self.method}:{self.count}"
        return self.method

    @property
    def slug(self) -> str:
        """A file-name-safe form, e.g. 'wanda-0.5', 'wanda-2of4'."""
        if self.method == "checkpoint":
            from pathlib import Path

            return "checkpoint-" + "".join(c if c.isalnum() else "_" for c in Path(self.path or "").name)
        return str(self).replace(":", "-") if self.n is None else f"{self.method}-{self.n}of{self.m}"


def _bad(text: str, why: str) -> HieruiError:
    return HieruiError(f"invalid perturbation spec '{text}': {why}")


# ASCII decimals only: Python's int() and float() also take '０.５', '0.5_0', '1e-3', 'nan', '٤'
_WHOLE = re.compile(r"[0-9]+")
_DECIMAL = re.compile(r"[0-9]*\.?[0-9]+")


def _int(text: str, part: str, what: str) -> int:
    if not _WHOLE.fullmatch(part):
        raise _bad(text, f"{what} must be a whole number written with the digits 0-9, got '{part}'")
    return int(part)


def parse_spec(text: str) -> Spec:
    """Parse a spec string; raise HieruiError with a one-line reason if it is malformed."""
    raw = text
    text = text.strip()
    if not text:
        raise _bad(raw, "empty spec; try e.g. wanda:0.5, magnitude:2:4, attndrop:4, int8 or none")
    method, _, rest = text.partition(":")
    method = method.strip().lower()
    if method not in ALL_METHODS:
        raise _bad(raw, f"unknown method '{method}'; known: {', '.join(ALL_METHODS)}")

    if method == "checkpoint":
        if not rest.strip():
            raise _bad(raw, "checkpoint needs a path, e.g. checkpoint:/models/llama-7b-wanda50")
        return Spec("checkpoint", path=rest.strip())

    args = rest.split(":") if rest != "" or text.endswith(":") else []
    if any(a.strip() == "" for a in args):
        raise _bad(raw, "an argument is missing after ':'")
    args = [a.strip() for a in args]

    if method in ("none",) + QUANT_METHODS:
        if args:
            raise _bad(raw, f"'{method}' takes no arguments")
        return Spec(method)

    if method in DROP_METHODS:
        if len(args) != 1:
            raise _bad(raw, f"'{method}' takes one argument, the number to drop, e.g. {method}:4")
        count = _int(raw, args[0], "the number to drop")
        if count < 1:
            raise _bad(raw, "the number to drop must be at least 1")
        return Spec(method, count=count)

    # pruning: METHOD:SPARSITY or METHOD:N:M
    if len(args) == 1:
        if not _DECIMAL.fullmatch(args[0]):
            raise _bad(raw, f"sparsity must be a decimal number in (0, 1) such as 0.5, got '{args[0]}'")
        sparsity = float(args[0])
        if not 0.0 < sparsity < 1.0:
            raise _bad(raw, f"sparsity must be in (0, 1), got {args[0]}")
        return Spec(method, sparsity=sparsity)
    if len(args) == 2:
        n = _int(raw, args[0], "N")
        m = _int(raw, args[1], "M")
        if not 0 < n < m:
            raise _bad(raw, f"N:M needs 0 < N < M (keep N of every M weights), got {n}:{m}")
        return Spec(method, n=n, m=m)
    raise _bad(raw, f"'{method}' takes a sparsity (e.g. {method}:0.5) or N:M (e.g. {method}:2:4)")


def check_fits(spec: Spec, config: dict | None) -> None:
    """Check a spec against the model's config.json (engine.models.loading.read_config), before anything is loaded:
    a drop count below the layer count, a sparsity that prunes at least one weight of every decoder linear
    (Wanda prunes per output row: one of its fewest input features; magnitude and SparseGPT per matrix)."""
    from engine.models.loading import config_int, smallest_linear

    if not config:
        return
    layers = config_int(config, "num_hidden_layers")
    if spec.family == "drop" and layers and spec.count >= layers:
        raise _bad(str(spec), f"the model has {layers} layers and at least one must remain; drop at most {layers - 1}")
    smallest = smallest_linear(config)
    if spec.sparsity is not None and smallest:
        ins, numel = smallest
        group, what = (ins, "weights of a row") if spec.method == "wanda" else (numel, "weights of a matrix")
        if int(group * spec.sparsity) < 1:
            raise _bad(
                str(spec),
                f"sparsity {spec.sparsity:g} prunes no weight of the smallest decoder linear ({group:,} {what}); "
                f"use at least 1/{group} (about {1 / group:.3g})",
            )
    if spec.m is not None and smallest and spec.m > smallest[0]:
        raise _bad(str(spec), f"M = {spec.m} is larger than the smallest decoder linear's {smallest[0]} inputs")


# the methods that run on streamed layers: pruning writes each layer's new weights to the clone's own store, a drop
# replaces modules of the clone (engine.perturb.drop), a checkpoint streams its own files (engine.perturb.checkpoint)
STREAMABLE = ("magnitude", "wanda", "sparsegpt", "none", "checkpoint", "attndrop", "mlpdrop", "blockdrop")


def check_streamable(specs) -> None:
    """One clear line (exit 2) for a spec that cannot run with streamed layers, before anything is loaded."""
    for spec in specs:
        spec = parse_spec(spec) if isinstance(spec, str) else spec
        if spec.method not in STREAMABLE:
            raise HieruiError(
                f"{spec} cannot run with streamed layers (the pair is above the device's budget): streaming "
                f"supports {', '.join(STREAMABLE)} (not quantization); raise --gpu-mem, use a smaller model or "
                "--dtype bfloat16"
            )
