"""Perturbation specs: the strings users type after --prune, parsed into a `Spec`.

Grammar:  METHOD[:ARG[:ARG]], METHOD one of the registry's (engine.record.methods), which also says how its
arguments parse (engine.record.methods.grammar):

    magnitude:0.5   wanda:0.5   sparsegpt:0.5      unstructured, sparsity in (0, 1)
    magnitude:2:4   wanda:2:4   sparsegpt:4:8      N:M semi-structured, keep N of every M, 0 < N < M
    attndrop:4      mlpdrop:4   blockdrop:4        drop the N most redundant sublayers / blocks
    int8            nf4                            bitsandbytes quantization
    checkpoint:PATH                                an already-perturbed model from elsewhere (a folder or a GGUF
                                                   file; where many are given, `checkpoint:quants/*.gguf` or a
                                                   folder of GGUF files, expand_specs makes one spec of each)
    none                                           the dense model against itself

A pruning method's unstructured sparsity may carry a layer allocation after '@' (engine.perturb.allocation):
    wanda:0.6@owl   magnitude:0.7@owl:5:0.1   sparsegpt:0.6@alloc.json
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from engine.errors import HieruiError
from engine.perturb.allocation import Allocation, parse_allocation
from engine.record.methods import Method, find, identity, methods, names
from engine.record.methods.grammar import PATH, bad


@dataclass(frozen=True)
class Spec:
    """A parsed perturbation spec.

    `sparsity` is set for unstructured pruning; `n`, `m` for N:M (keep n of every m);
    `count` for drop methods; `path` for a method that takes a path (checkpoint); `allocation` for unstructured
    pruning whose layers get sparsities of their own around `sparsity` (engine.perturb.allocation).
    """

    method: str
    sparsity: float | None = None
    n: int | None = None
    m: int | None = None
    count: int | None = None
    path: str | None = None
    allocation: Allocation | None = None

    @property
    def declared(self) -> Method | None:
        """Its method's declaration (engine.record.methods), None for a name the registry does not know."""
        return find(self.method)

    @property
    def family(self) -> str:
        declared = self.declared
        return declared.family if declared is not None else self.method

    @property
    def needs_calibration(self) -> bool:
        declared = self.declared
        return declared is not None and declared.calibrates

    @property
    def target_sparsity(self) -> float | None:
        """The fraction of decoder-linear weights the spec asks to zero."""
        if self.sparsity is not None:
            return self.sparsity
        if self.n is not None and self.m is not None:
            return 1.0 - self.n / self.m
        return None

    def __str__(self) -> str:
        if self.path is not None:
            return f"{self.method}:{self.path}"
        if self.sparsity is not None:
            at = f"@{self.allocation}" if self.allocation is not None else ""
            return f"{self.method}:{self.sparsity:g}{at}"
        if self.n is not None:
            return f"{self.method}:{self.n}:{self.m}"
        if self.count is not None:
            return f"{self.method}:{self.count}"
        return self.method

    @property
    def slug(self) -> str:
        """A file-name-safe form, e.g. 'wanda-0.5', 'wanda-2of4', 'checkpoint-llama_7b'."""
        if self.path is not None:
            return f"{self.method}-" + "".join(c if c.isalnum() else "_" for c in Path(self.path).name)
        if self.allocation is not None:
            return f"{self.method}-{self.sparsity:g}-at-{self.allocation.slug}"
        return str(self).replace(":", "-") if self.n is None else f"{self.method}-{self.n}of{self.m}"


def parse_spec(text: str) -> Spec:
    """Parse a spec string; raise HieruiError with a one-line reason if it is malformed."""
    raw = text
    text = text.strip()
    if not text:
        raise bad(raw, "empty spec; try e.g. wanda:0.5, magnitude:2:4, attndrop:4, int8 or none")
    name, colon, rest = text.partition(":")
    if "@" in name:  # int8@owl, wanda@owl: an allocation with no arguments before it
        name, _, after = name.partition("@")
        rest, colon = "@" + after + colon + rest, ""
    name = name.strip().lower()
    declared = find(name)
    if declared is None:
        raise bad(raw, f"unknown method '{name}'; known: {', '.join(names())}")
    allocation = None
    if declared.grammar is not PATH and "@" in rest:  # (a path may hold '@' itself)
        rest, _, after = rest.partition("@")
        if not declared.allocates:
            allocating = ", ".join(m.name for m in methods() if m.allocates)
            raise bad(raw, f"a layer allocation (@…) applies to the pruning methods ({allocating}), not to {name}")
        allocation = parse_allocation(raw, after, bad)
    fields = declared.grammar.parse(raw, name, rest if colon else None)
    if allocation is not None and fields.get("sparsity") is None:
        raise bad(raw, "an N:M pattern fixes the sparsity of every group: a layer allocation (@…) needs a sparsity")
    lo, hi = (allocation.lo, allocation.hi) if allocation is not None else (None, None)
    if lo is not None and not lo <= fields["sparsity"] <= hi:
        raise bad(raw, f"the bounds {lo:g}–{hi:g} do not hold the target {fields['sparsity']:g}")
    return Spec(name, **fields, allocation=allocation)


GLOB = set("*?[")


def expand_specs(texts: list[str]) -> list[str]:
    """The specs as typed, each checkpoint of many files expanded to one spec per file: `checkpoint:quants/*.gguf`
    (a glob: the matching GGUF files and model folders, by name) and `checkpoint:DIR` for a folder that is not a
    model itself (no config.json) but holds GGUF files (each of them). Anything else is left as it is (parse_spec
    judges it). A glob that matches nothing, or a folder with nothing to score, is one line (exit 2)."""
    import glob

    out: list[str] = []
    for text in texts:
        name, colon, path = text.strip().partition(":")
        if name.strip().lower() != "checkpoint" or not colon:
            out.append(text)
            continue
        folder = Path(path).expanduser()
        if GLOB & set(path):
            found = sorted(glob.glob(str(folder)))
            found = [f for f in found if Path(f).suffix.lower() == ".gguf" or (Path(f) / "config.json").is_file()]
            if not found:
                raise bad(text, f"no GGUF file or model folder matches {path}")
        elif folder.is_dir() and not (folder / "config.json").is_file():
            found = sorted(str(f) for f in folder.iterdir() if f.suffix.lower() == ".gguf" and f.is_file())
            if not found:
                raise bad(text, f"{path} is a folder with neither a config.json nor GGUF files")
        else:
            out.append(text)
            continue
        out.extend(f"checkpoint:{f}" for f in found)
    return out


def unperturbed() -> Spec:
    """The spec of the dense model against itself (the registry's identity method, none)."""
    return Spec(identity().name)


def check_fits(spec: Spec, config: dict | None) -> None:
    """Check a spec against the model's config.json (engine.models.configs.read_config), before anything is loaded:
    a drop count below the layer count, a sparsity that prunes at least one weight of every decoder linear
    (a method pruning per output row, Wanda, one of its fewest input features; magnitude and SparseGPT per matrix)."""
    from engine.models.configs import config_int, smallest_linear

    if spec.allocation is not None:
        from engine.perturb.allocated import check_before_loading

        check_before_loading(spec, config)
    if not config:
        return
    layers = config_int(config, "num_hidden_layers")
    if spec.family == "drop" and layers and spec.count >= layers:
        raise bad(str(spec), f"the model has {layers} layers and at least one must remain; drop at most {layers - 1}")
    smallest = smallest_linear(config)
    if spec.sparsity is not None and smallest:
        ins, numel = smallest
        per_row = spec.declared is not None and spec.declared.per_row
        group, what = (ins, "weights of a row") if per_row else (numel, "weights of a matrix")
        if int(group * spec.sparsity) < 1:
            raise bad(
                str(spec),
                f"sparsity {spec.sparsity:g} prunes no weight of the smallest decoder linear ({group:,} {what}); "
                f"use at least 1/{group} (about {1 / group:.3g})",
            )
    if spec.m is not None and smallest and spec.m > smallest[0]:
        raise bad(str(spec), f"M = {spec.m} is larger than the smallest decoder linear's {smallest[0]} inputs")


def streamable() -> tuple[str, ...]:
    """The methods that run on streamed layers: pruning writes each layer's new weights to the clone's own store,
    a drop replaces modules of the clone (engine.perturb.drop), a checkpoint streams its own files
    (engine.perturb.checkpoint); quantization does not."""
    return tuple(m.name for m in methods() if m.streams)


def check_streamable(specs) -> None:
    """One clear line (exit 2) for a spec that cannot run with streamed layers, before anything is loaded."""
    for spec in specs:
        spec = parse_spec(spec) if isinstance(spec, str) else spec
        if spec.method not in streamable():
            raise HieruiError(
                f"{spec} cannot run with streamed layers (the pair is above the device's budget): streaming "
                f"supports {', '.join(streamable())} (not quantization); raise --gpu-mem, use a smaller model or "
                "--dtype bfloat16"
            )
