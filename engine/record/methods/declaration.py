"""What a perturbation method declares (`Method`, `Memory`): plain data that every layer reads, without torch."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from engine.record.methods.grammar import PATH, Grammar

# what a method changes in the dense model, the one fact most consumers ask about (see Method's properties):
#   nothing    the perturbed model is the dense one (none)
#   weights    new values of the decoder weight matrices, in the same modules (pruning)
#   modules    sublayers or blocks replaced or removed; no tensor copied (drops)
#   quantized  the decoder linears replaced by quantized ones (bitsandbytes)
#   model      a whole model of its own, loaded from elsewhere (checkpoint)
CHANGES = ("nothing", "weights", "modules", "quantized", "model")


@dataclass(frozen=True)
class Memory:
    """What a method adds to `hierui plan`'s estimate (engine.run.plan does the arithmetic). The perturbed copy
    follows from Method.changes; a quantized one counts `bits` per weight and a float32 scale per `scale_every`
    weights (0: per output row). The pruning workspace of the layer in flight counts, of its largest plain
    matrix of n weights with k = n · sparsity of them pruned: `per_weight` bytes per weight (float32 scores, bool
    masks), `per_weight_dtype` copies in the model's dtype, `per_pruned` bytes per pruned weight (top-k values and
    indices); `input_copy`: the float32 copy of a calibration chunk's input to the widest linear (and the input in
    float32 when the dtype is not); `gram_copies` > 0: a float32 Gram matrix (in × in) per linear of the layer
    kept until the layer is done, and, for the linear being pruned, `gram_copies` more of them or, once those are
    freed, `weight_copies` float32 copies of its weight (and one more when the dtype is not float32)."""

    bits: int = 0
    scale_every: int = 0
    copy_note: str = ""  # after the number of weights, e.g. "weights × 1 B + a float32 scale per row"
    per_weight: int = 0
    per_weight_dtype: int = 0
    per_pruned: int = 0
    input_copy: bool = False
    gram_copies: int = 0
    weight_copies: int = 0
    note: str = ""  # how the workspace was counted; {linears} and {grams} are filled in
    # calibration runs the whole decoder stack one chunk at a time and stores no layer inputs (drop scores)
    whole_stack: bool = False


def _nothing_to_say(details: dict) -> str:
    return ""


@dataclass(frozen=True)
class Method:
    """One perturbation method, as hierui knows it (engine.record.methods: the registry)."""

    name: str  # what the user types before the first ':'
    family: str  # methods that work alike: prune, drop, quant, or the method's own name
    grammar: Grammar  # what follows 'name:' (engine.record.methods.grammar)
    summary: str  # what it does, one line
    examples: tuple[str, ...]  # specs of it a user may type (tests parse each)
    apply: str  # "module:function" building the perturbed model from an engine.perturb.job.Job, imported to run
    changes: str = "nothing"  # one of CHANGES
    # the name its cached results (engine.perturb.cache) are keyed by, at the ALGORITHM_VERSION of the module
    # declaring it; None: it caches nothing
    algorithm: str | None = None
    calibrates: bool = False  # needs calibration batches (engine.perturb.calibration)
    quick_calibration: bool = False  # the interactive commands take fewer samples (engine.record.settings)
    streams: bool = True  # runs on decoder layers streamed from disk (engine.place.streaming)
    per_row: bool = False  # a sparsity applies to each output row (else to each matrix)
    # takes a layer allocation after its sparsity, `METHOD:S@owl` or `@FILE.json` (engine.perturb.allocation)
    allocates: bool = False
    identity: bool = False  # the dense model against itself: the self-check's zero check
    describe: Callable[[dict], str] = _nothing_to_say  # one line on what it did, from its report's details
    memory: Memory = Memory()
    self_check: tuple[str, ...] = ()  # the specs `hierui check` runs by default
    min_tolerance: float = 0.0  # the self-check's least relative tolerance for the perturbed model
    tolerance_note: str = ""  # why, added to a failed cache or batch check
    # settings the algorithm reads (a drop's kind, a quantization's bits)
    params: Mapping[str, object] = field(default_factory=dict, compare=False)
    declared_in: str = ""  # the declaring module, filled in by the registry

    def __post_init__(self) -> None:
        if self.changes not in CHANGES:
            raise ValueError(f"{self.name}: changes must be one of {', '.join(CHANGES)}, not {self.changes!r}")

    @property
    def version(self) -> int | None:
        """The ALGORITHM_VERSION of the declaring module (None when it caches nothing): read when asked, so a
        bumped constant takes effect at once."""
        if not self.algorithm or not self.declared_in:
            return None
        module = sys.modules.get(self.declared_in) or importlib.import_module(self.declared_in)
        return getattr(module, "ALGORITHM_VERSION", None)

    @property
    def takes_path(self) -> bool:
        """Its spec names a model's path or hub id (checkpoint:PATH): loaded only when the user names it."""
        return self.grammar is PATH

    @property
    def shares(self) -> bool:
        """Built from the dense model, sharing every tensor it leaves alone (a checkpoint shares nothing by design)."""
        return self.changes != "model"

    @property
    def measures_zeros(self) -> bool:
        """Its zero weights are worth counting (de-quantized weights' zeros mean nothing)."""
        return self.changes != "quantized"

    @property
    def keeps_layers(self) -> bool:
        """Layer ℓ of the perturbed model stands where layer ℓ of the dense one does (a drop renumbers them)."""
        return self.changes != "modules"

    @property
    def saves(self) -> bool:
        """`hierui prune --save` can write it (quantized models are made on the fly)."""
        return self.changes != "quantized"

    @property
    def zeros_table(self) -> bool:
        """`hierui prune` shows the zero weights of the decoder linears (their values changed)."""
        return self.changes in ("weights", "model")
