"""What the estimate counts: each item of memory a run holds, in bytes, and in which stages, read from the code
that allocates it (b = the dtype's bytes per element).

- process baseline (CPU only): python + torch + transformers + hierui's engine + a tokenizer, before any
  weight is built; see BASELINE_CPU.
- dense weights: every parameter and buffer once (tied tensors once).
- perturbed copy: only what the perturbation replaces (engine.perturb.pair.clone_sharing shares everything else):
  a pruned model's decoder weight matrices (each WeightView as a new tensor; a 3-D expert parameter once);
  int8: 1 byte per weight + a float32 scale per row; nf4: half a byte per weight + a float32 absmax per 64;
  quantized experts are simulated in b (as dense); drop methods and `none`: nothing; a checkpoint: its own
  whole model.
- calibration activations (wanda, sparsegpt, drop): engine.perturb.layerwise keeps every chunk's input of the
  layer in flight and its outputs (2 · N · L · H · b) and the rotary cos/sin per chunk, and runs the layer on
  one chunk of 8 sequences at a time (its MLP and attention activations).
- pruning workspace of the layer in flight: magnitude: the largest matrix's float32 score, bool mask and the
  top-k values and int64 indices of its pruned entries; wanda: the same per row plus |W| (float32) and the
  float32 copy of a linear's input in the statistics hook; sparsegpt: every linear of the layer keeps its
  float32 Hessian (in × in) until the layer is done, and the one being pruned adds the clone, the damped copy,
  the Cholesky factor, the inverse and its upper factor (5 · in² · 4) or, once those are freed, the float32
  working copy of W and the update product.
- self-generated calibration: sampled 32 sequences at a time with a KV cache and float32 logits.
- stepping: both models' KV caches for B × (prompt + T) tokens, the last position's logits (b) and the
  metrics' float32 vectors (B × V each), the logit lens and the prefill's activations. The lens (engine.run.lens,
  any mode but "off": "sampled" may choose every row at a step) holds one vocabulary chunk of both models' mid
  layers at a time, (2, B·(L−1), LENS_CHUNK) in b and LENS_CHUNK_VECTORS float32 (B·(L−1), LENS_CHUNK) tensors,
  and LENS_FINAL_VECTORS float32 (B, V) (the models' own distributions at ℓ = L).
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.record.settings import LENS_CHUNK, lens_mode
from engine.run.plan.result import STAGES, Item
from engine.run.plan.shape import Geometry, geometry
from engine.run.plan.units import MiB, gib

# The CPU process before any weight exists: `import torch, transformers`, engine.models.loading, engine.perturb,
# engine.run.stepper, engine.run.metrics and the SmolLM2 tokenizer loaded, VmRSS read from /proc/self/status: 369 MiB
# (torch 2.13.0+cpu, transformers 5.24.0, python 3, this 2-core machine), rounded up for the modules a run
# imports later (sessions, tables, the lens).
BASELINE_CPU = 380 * MiB
# `import bitsandbytes` after the above (int8 / nf4 import it): +118 MiB VmRSS, measured the same way
BITSANDBYTES_CPU = 120 * MiB
CALIB_CHUNK = 8  # engine.perturb.layerwise / engine.perturb.drop: calibration sequences per forward pass
GENERATION_BATCH = 32  # engine.perturb.calibration: sequences sampled at once
PREFILL_CHUNK = 512  # engine.run.stepper.PREFILL_CHUNK
METRIC_VECTORS = 14  # float32 (B, V) tensors engine.run.metrics.step_metrics holds at once (softmaxes, logs, products)
LENS_CHUNK_VECTORS = 6  # float32 (B·(L−1), chunk) tensors engine.run.lens._online holds at once (z, exp, products)
LENS_FINAL_VECTORS = 5  # float32 (B, V) tensors engine.run.lens.lens_metrics holds at once (log-softmaxes, exps)


@dataclass(frozen=True)
class Workload:
    """What a run does with the pair, as far as memory goes: the prompts it steps and the calibration it builds."""

    batch_size: int
    max_new_tokens: int
    prompt_tokens: int
    samples: int  # calibration sequences (0: none)
    length: int  # tokens per calibration sequence
    self_calibration: bool  # sampled from the dense model itself, not read from a file
    lens: str  # the lens mode (engine.record.settings.LENS_MODES; a bool: True "all", False "off")
    perplexity: int  # the window of a perplexity measurement after pruning, 0 for none

    @property
    def chunk_seqs(self) -> int:
        """Calibration sequences run through the layer in flight at once."""
        return min(CALIB_CHUNK, self.samples) if self.samples else 0

    @property
    def chunk_tokens(self) -> int:
        return self.chunk_seqs * self.length


def count_items(specs: list, g: Geometry, dtype, on_cpu: bool, work: Workload) -> list[Item]:
    """Every item of the estimate of `g` perturbed by each of `specs` (Specs; one pair at a time, the largest
    decides), in the order the plan lists them."""
    return [*_weight_items(specs, g, dtype, on_cpu), *_calibration_items(specs, g, work), *_step_items(specs, g, work)]


def _weight_items(specs: list, g: Geometry, dtype, on_cpu: bool) -> list[Item]:
    """The process, the dense weights and the perturbed copy: resident from the stage each is built in on."""
    b = g.itemsize
    items: list[Item] = []
    if on_cpu:
        items.append(Item("process baseline", BASELINE_CPU, STAGES, "python, torch, transformers, tokenizer", False))
    items.append(Item("dense weights", g.weight_bytes, STAGES, f"{g.params:,} parameters × {b} B ({g.dtype})"))
    if on_cpu and any(s.family == "quant" for s in specs):
        items.append(Item("bitsandbytes", BITSANDBYTES_CPU, ("prune", "step"), "its import (measured)", False))

    # the perturbed copy: one pair at a time; the largest spec decides
    worst = max(specs, key=lambda s: _perturbed_bytes(s, g, dtype)[0])
    pert, how = _perturbed_bytes(worst, g, dtype)
    if pert:
        items.append(Item(f"perturbed copy ({worst})", pert, ("prune", "step"), how))
    return items


def _calibration_items(specs: list, g: Geometry, work: Workload) -> list[Item]:
    """The calibration's activations and sampling, and the pruning workspace of the layer in flight."""
    b = g.itemsize
    samples, length, chunk_tokens = work.samples, work.length, work.chunk_tokens
    calibrates = [s for s in specs if s.needs_calibration]
    items: list[Item] = []
    if calibrates and samples:
        acts = 2 * samples * length * g.hidden * b + 2 * samples * length * g.head_dim * b
        layer = chunk_tokens * (4 * g.intermediate + 6 * g.hidden) * b
        whole_stack = [s for s in calibrates if s.declared.memory.whole_stack]
        if whole_stack:  # similarity scores run the whole decoder stack on a chunk: no stored inputs
            acts = max(acts, chunk_tokens * (3 * g.hidden) * b)
        items.append(
            Item(
                "calibration activations",
                acts + layer,
                ("prune",),
                f"{samples}×{length} tokens: inputs and outputs of the layer in flight, and one chunk of "
                f"{work.chunk_seqs} through it",
            )
        )
        if work.self_calibration:
            gen = min(GENERATION_BATCH, samples)
            kv = 2 * g.layers * gen * length * g.kv_heads * g.head_dim * b
            logits = gen * g.vocab * (b + 5 * 4)
            how = f"{gen} sequences × {length}: KV cache, logits"
            items.append(Item("calibration sampling", kv + logits, ("calibrate",), how))
    work_bytes, how = max((_workspace(s, g, chunk_tokens) for s in specs), key=lambda w: w[0])
    if work_bytes:
        items.append(Item("pruning workspace (layer in flight)", work_bytes, ("prune",), how))
    return items


def _step_items(specs: list, g: Geometry, work: Workload) -> list[Item]:
    """What stepping holds beside the weights: KV caches, logits and metrics, the lens, a perplexity window."""
    b = g.itemsize
    batch_size, prompt_tokens, max_new_tokens = work.batch_size, work.prompt_tokens, work.max_new_tokens
    items: list[Item] = []
    tokens = prompt_tokens + max_new_tokens
    kv = 2 * 2 * g.layers * batch_size * g.kv_heads * tokens * g.head_dim * b
    items.append(
        Item("KV caches (both models)", kv, ("step",), f"{batch_size} × ({prompt_tokens} prompt + {max_new_tokens})")
    )
    logits = 2 * batch_size * g.vocab * b + METRIC_VECTORS * batch_size * g.vocab * 4
    prefill = batch_size * min(prompt_tokens, PREFILL_CHUNK) * (4 * g.intermediate + 6 * g.hidden) * b
    items.append(Item("logits, metrics, prefill", logits + prefill, ("step",), f"{batch_size} × vocab {g.vocab:,}"))
    perplexity = work.perplexity
    if perplexity:  # engine.run.quality.perplexity: a window's logits, their float32 copy and log-softmax
        window = perplexity * (g.vocab * (b + 2 * 4) + (4 * g.intermediate + 6 * g.hidden) * b)
        items.append(Item("perplexity window", window, ("step",), f"{perplexity} tokens × vocab {g.vocab:,}"))
    quantized = any(s.family == "quant" for s in specs)
    if quantized:  # a quantized linear de-quantizes its weight to the compute dtype for each matmul
        largest = max((o * i for o, i, e in g.matrices if not e), default=0)
        items.append(Item("de-quantized weight in flight", largest * b, ("step",), f"the largest matrix, {g.dtype}"))
    if lens_mode(work.lens) != "off":
        rows, chunk = batch_size * max(g.layers - 1, 0), min(LENS_CHUNK, g.vocab)
        lens_bytes = rows * chunk * (2 * b + LENS_CHUNK_VECTORS * 4) + LENS_FINAL_VECTORS * batch_size * g.vocab * 4
        how = f"{batch_size} × {g.layers - 1} layers × a chunk of {chunk:,} of the vocabulary, both models"
        items.append(Item(f"logit lens ({lens_mode(work.lens)})", lens_bytes, ("step",), how))
    return items


def _perturbed_bytes(spec, g: Geometry, dtype) -> tuple[int, str]:
    """Bytes of the tensors `spec` replaces (the perturbed model's own), and how they were counted: what its
    method changes and its declared Memory (engine.record.methods)."""
    b = g.itemsize
    declared = spec.declared
    if declared.changes == "weights":
        return g.changed * b, f"{g.changed:,} decoder weights × {b} B (new tensors; the rest is shared)"
    if declared.changes == "quantized":
        memory, plain = declared.memory, g.changed_plain
        rows = sum(o for o, _i, e in g.matrices if not e) * g.layers
        scales = plain // memory.scale_every if memory.scale_every else rows
        nbytes = plain * memory.bits // 8 + 4 * scales
        how = f"{plain:,} {memory.copy_note}"
        if g.changed_experts:
            nbytes += g.changed_experts * b
            how += f"; {g.changed_experts:,} expert weights simulated in {g.dtype}"
        return nbytes, how
    if declared.changes == "model":
        other = geometry(spec.path, dtype)
        if other is None:
            return g.weight_bytes, "the checkpoint's config is unknown: counted as large as the dense model"
        return other.weight_bytes, f"the checkpoint's own {other.params:,} parameters"
    return 0, "shares every tensor with the dense model"


def _workspace(spec, g: Geometry, tokens_in_chunk: int) -> tuple[int, str]:
    """The pruning workspace of the layer in flight (bytes), and how it was counted, from the method's declared
    Memory (engine.record.methods.declaration.Memory says what each number counts)."""
    b = g.itemsize
    plain = [(o, i) for o, i, e in g.matrices if not e] or [(o, i) for o, i, _e in g.matrices]
    if not plain:
        return 0, ""
    memory = spec.declared.memory
    n = max(o * i for o, i in plain)
    k = int(n * (spec.target_sparsity or 0.5))
    nbytes = memory.per_weight * n + memory.per_weight_dtype * n * b + memory.per_pruned * k
    widened = 4 if b != 4 else 0  # a float32 copy of what the model holds in another dtype
    if memory.input_copy:
        nbytes += tokens_in_chunk * max(i for _o, i in plain) * (4 + widened)
    grams = 0
    if memory.gram_copies:
        grams = sum(4 * i * i for _o, i in plain)
        inverting = max(memory.gram_copies * 4 * i * i for _o, i in plain)
        updating = max(4 * i * i + memory.weight_copies * 4 * o * i + widened * o * i for o, i in plain)
        nbytes += grams + max(inverting, updating)
    if not nbytes:
        return 0, ""
    return nbytes, memory.note.format(linears=len(plain), grams=gib(grams))
