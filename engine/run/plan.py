"""`hierui plan`: the predicted peak memory of a pair, where it will be placed, and whether it fits, before loading.

Everything is read from the model's config alone: the model is built on torch's `meta` device (shapes, no
memory, no weights), which gives every parameter's exact shape for any family (tied embeddings, GQA, fused
projections, experts), and `engine.anatomy.linears.weight_views` of that meta model says which matrices a
perturbation replaces. A `random:` shape gets the tokenizer's vocabulary, as engine.models.random_shapes builds it.

What the estimate counts, read from the code that allocates it (bytes; b = the dtype's bytes per element):

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
  metrics' float32 vectors (B × V each), the logit lens (B × L × V float32 several times) and the prefill's
  activations.

The peak is the largest of the stages (load, calibrate, prune, step). On CUDA the figures are device memory as
torch allocates it (torch.cuda.max_memory_allocated: the CUDA context and the host process are not in it); on a
CPU, the process's resident memory. The placement: one device when the peak fits it; on CUDA with --gpus N > 1,
one device_map shared by both models (layer ℓ of both on one GPU; engine.place.placement.pair_device_map on the meta
build, each GPU's budget less what may peak on any of them, divided by what each byte of dense weights brings
along: the perturbed copy's layers and the KV caches), which explore / batch / prune load by; else streamed
layers (engine.place.streaming): the embeddings, norms and head resident, every decoder layer's weights on disk
(memory-mapped safetensors) and brought in one layer at a time, so the device holds the resident parts, the
layer in flight and its pruned copy (STREAMED_LAYERS), and the activations, caches and workspace. On a CPU,
--gpu-mem simulates a smaller device (the RAM budget of the run): a pair above it is streamed the same way;
without it a peak above the available RAM cannot fit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from engine.errors import HieruiError, one_line

KiB, MiB, GiB = 2**10, 2**20, 2**30

# The CPU process before any weight exists: `import torch, transformers`, engine.models.loading, engine.perturb,
# engine.run.stepper, engine.run.metrics and the SmolLM2 tokenizer loaded, VmRSS read from /proc/self/status: 369 MiB
# (torch 2.13.0+cpu, transformers 5.24.0, python 3, this 2-core machine), rounded up for the modules a run
# imports later (sessions, tables, the lens).
BASELINE_CPU = 380 * MiB
# `import bitsandbytes` after the above (int8 / nf4 import it): +118 MiB VmRSS, measured the same way
BITSANDBYTES_CPU = 120 * MiB
# the prompt's length in tokens when it is not known (the default prompt in its chat template is ~30 tokens)
PROMPT_TOKENS = 64
CALIB_CHUNK = 8  # engine.perturb.layerwise / engine.perturb.drop: calibration sequences per forward pass
GENERATION_BATCH = 32  # engine.perturb.calibration: sequences sampled at once
PREFILL_CHUNK = 512  # engine.run.stepper.PREFILL_CHUNK
METRIC_VECTORS = 14  # float32 (B, V) tensors engine.run.metrics.step_metrics holds at once (softmaxes, logs, products)
LENS_VECTORS = 7  # float32 (B, L, V) tensors engine.run.lens.lens_metrics holds at once
# decoder layers' weights resident at once when streamed (engine.place.streaming): pruning holds the layer in flight
# and its pruned copy; stepping one layer of one model at a time
STREAMED_LAYERS = 2

_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([kmgt]i?b|b)\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS.update({"kib": KiB, "mib": MiB, "gib": GiB, "tib": 2**40})


def parse_size(text: str, option: str = "--gpu-mem") -> int:
    """'80GiB' → 85899345920, '24GB' → 24·10⁹, '512MiB'; one clear line for anything else."""
    match = _SIZE.match(text or "")
    if not match or float(match.group(1)) <= 0:
        raise HieruiError(f"{option} '{text}': expected a size with its unit, such as 80GiB, 24GB or 512MiB")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


# ---------------------------------------------------------------- the model's geometry, from its config


@dataclass(frozen=True)
class Geometry:
    """What the estimate needs of a model, from its meta-device build: byte counts in its dtype."""

    name: str
    dtype: str
    itemsize: int
    weight_bytes: int  # every parameter and buffer once
    params: int
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    intermediate: int  # the widest decoder linear's input (the MLP's down projection on most families)
    layer_bytes: int  # the largest decoder layer's parameters
    outside_bytes: int  # embeddings, final norm, head: what is not in a decoder layer
    matrices: tuple  # per WeightView of the largest layer: (out, in, expert)
    changed: int  # weights replaced by pruning over all layers (3-D expert parameters once)
    changed_plain: int  # of which in plain 2-D matrices (linears, Conv1Ds)
    changed_experts: int  # of which in 3-D expert parameters
    context: int | None


def _config_object(name: str, fetch: bool = False):
    """The transformers config of a --model name, without weights (None where it is not known before loading;
    `fetch`: a hub model's config is fetched, without its weights, when it is not in the local hub cache)."""
    from engine.models.loading import config_from_file, fetch_light, read_config, resolve

    ref = resolve(name)
    if ref.kind == "tiny":
        from engine.models.tiny import tiny_config

        return tiny_config()
    if ref.kind == "zoo":
        from engine.models.zoo import check_family

        return check_family(ref.source).config()
    if ref.kind == "random":
        from engine.models.random_shapes import parse_random, random_tokenizer, transformers_config

        return transformers_config(parse_random(ref.name), random_tokenizer())
    config = read_config(name)
    if config is None and ref.kind == "hub" and fetch:
        light = fetch_light(name)
        config = config_from_file(light / "config.json") if light is not None else None
    if config is None:
        return None
    from transformers import AutoConfig

    values = {k: v for k, v in config.items() if not k.startswith("_") and k not in _NOT_CONFIG}
    model_type = values.pop("model_type", None)
    if not isinstance(model_type, str):
        raise HieruiError(f"the config of {name} has no model_type: it is not a transformers config.json")
    try:
        return AutoConfig.for_model(model_type, **values)
    except Exception as e:
        raise HieruiError(f"cannot read the config of {name}: {one_line(e)}") from None


_NOT_CONFIG = ("auto_map", "quantization_config", "dtype", "torch_dtype", "transformers_version", "text_config")


def meta_model(name: str, config, dtype):
    """The model of `config` built on torch's meta device: every tensor's shape, no memory."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, dtype=dtype)
    except Exception as e:  # a value the model class refuses
        raise HieruiError(f"cannot build the shape of {name}: {one_line(e)}") from None


def geometry(name: str, dtype, fetch: bool = False) -> Geometry | None:
    """The Geometry of `name` in `dtype` (a torch dtype), built on the meta device; None when the config is
    not known before loading (`fetch`: see _config_object)."""
    import torch

    from engine.anatomy.linears import decoder_layers, weight_views

    config = _config_object(name, fetch)
    if config is None:
        return None
    model = meta_model(name, config, dtype)
    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    weight_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    layers = list(decoder_layers(model))
    inside: set[int] = set()
    layer_bytes, largest, changed_plain, changed_experts = 0, (), 0, 0
    for index, layer in enumerate(layers):
        own = {id(p): p for p in layer.parameters()}
        inside |= set(own)
        size = sum(p.numel() * p.element_size() for p in own.values())
        views = weight_views(layer, index)
        stacks = {id(v.parameter): v.parameter for v in views if v.expert is not None}
        changed_plain += sum(v.out_features * v.in_features for v in views if v.expert is None)
        changed_experts += sum(p.numel() for p in stacks.values())
        if size >= layer_bytes:
            layer_bytes = size
            largest = tuple((v.out_features, v.in_features, v.expert is not None) for v in views)
    outside = sum(t.numel() * t.element_size() for i, t in tensors.items() if i not in inside)
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    hidden = int(getattr(text, "hidden_size", 0) or getattr(text, "n_embd", 0) or 0)
    heads = int(getattr(text, "num_attention_heads", 0) or getattr(text, "n_head", 0) or 1)
    kv_heads = int(getattr(text, "num_key_value_heads", 0) or heads)
    head_dim = int(getattr(text, "head_dim", 0) or (hidden // heads if heads else 0))
    head = model.get_output_embeddings()
    vocab = int(head.weight.shape[0]) if head is not None else int(getattr(text, "vocab_size", 0) or 0)
    widest = max((m[1] for m in largest), default=hidden)
    context = getattr(text, "max_position_embeddings", None)
    return Geometry(
        name=name,
        dtype=str(dtype).removeprefix("torch."),
        itemsize=torch.empty((), dtype=dtype).element_size(),
        weight_bytes=weight_bytes,
        params=params,
        layers=len(layers),
        hidden=hidden,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        vocab=vocab,
        intermediate=widest,
        layer_bytes=layer_bytes,
        outside_bytes=outside,
        matrices=largest,
        changed=changed_plain + changed_experts,
        changed_plain=changed_plain,
        changed_experts=changed_experts,
        context=context if isinstance(context, int) else None,
    )


# ---------------------------------------------------------------- the estimate


@dataclass(frozen=True)
class Item:
    """One line of the estimate: what, how many bytes, in which stages it is resident, and how it was counted."""

    name: str
    nbytes: int
    stages: tuple[str, ...]
    note: str = ""
    on_device: bool = True  # False: host memory whatever the device (the process baseline)


STAGES = ("load", "calibrate", "prune", "step")


@dataclass
class Plan:
    """The estimate for one model, dtype, device and set of specs, and the placement hierui would use."""

    model: str
    display: str
    dtype: str
    device: str  # "cpu", "cuda:0", …
    gpus: int
    specs: list[str]
    batch_size: int
    max_new_tokens: int
    prompt_tokens: int
    calibration: tuple[int, int] | None  # (samples, length) when a spec calibrates
    items: list[Item] = field(default_factory=list)
    stages: dict[str, int] = field(default_factory=dict)  # stage → bytes resident at its peak
    peak: int = 0
    peak_stage: str = ""
    capacity: int | None = None  # bytes available per device
    capacity_source: str = ""
    host_available: int | None = None
    placement: str = "one device"  # one device | several GPUs | streamed
    placement_note: str = ""
    fits: bool = True
    implemented: bool = True
    streamed_device: int = 0  # what streaming keeps on the device
    per_gpu: int = 0  # what several GPUs each hold
    device_map: dict | None = None  # several GPUs: {module name: GPU index}, the load's (engine.place.placement)
    device_peak: int | None = None  # the peak less what is not on the device (a CPU's process baseline)
    # several GPUs: index → (its modules, e.g. 'embed_tokens, layers 0–12'; dense weight bytes; predicted peak)
    gpu_loads: dict = field(default_factory=dict)

    def summary(self) -> dict:
        """What a session header and batch.json record (key `plan`)."""
        return {
            "peak_bytes": int(self.peak),
            "peak_stage": self.peak_stage,
            "placement": self.placement,
            "fits": bool(self.fits),
            "device": self.device,
            "dtype": self.dtype,
            "capacity_bytes": None if self.capacity is None else int(self.capacity),
            **({"device_map": dict(self.device_map)} if self.device_map else {}),
        }

    def line(self) -> str:
        """One line for the start of explore / batch / prune."""
        where = f"{self.capacity_source} {gib(self.capacity)}" if self.capacity is not None else "capacity unknown"
        verdict = "fits" if self.fits else "does not fit"
        peak = f"{gib(self.peak)} ({self.peak_stage})"
        if self.device_peak is not None and self.device_peak < self.peak:  # --gpu-mem simulated on a CPU
            part = gib(self.device_peak) if self.device_peak >= GiB else f"{self.device_peak / MiB:.1f} MiB"
            peak = f"{gib(self.peak)} ({self.peak_stage}; {part} of it in the device's budget)"
        on = f"{len(self.gpu_loads)} GPUs in all" if len(self.gpu_loads) > 1 else self.device
        where = where.replace("--gpu-mem", "--gpu-mem per GPU") if len(self.gpu_loads) > 1 else where
        out = f"plan: predicted peak {peak} on {on}, {where}: {verdict}"
        out += f" · placement: {self.placement}"
        if self.placement_note:
            out += f" ({self.placement_note})"
        return out


def stage_total(items: list[Item], stage: str, device_only: bool = False) -> int:
    return sum(i.nbytes for i in items if stage in i.stages and (i.on_device or not device_only))


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


def estimate(
    model: str,
    specs: list,
    device: str = "cpu",
    dtype: str = "auto",
    batch_size: int = 1,
    max_new_tokens: int = 64,
    prompt_tokens: int = PROMPT_TOKENS,
    calib: tuple[int, int] | None = None,
    self_calibration: bool = True,
    lens: bool = True,
    gpus: int = 1,
    gpu_mem: int | None = None,
    perplexity: int = 0,
    fetch: bool = False,
    geom: Geometry | None = None,
) -> Plan | None:
    """The Plan of `model` perturbed by each of `specs` (strings or Specs; one pair at a time, as a sweep runs
    them), stepped `batch_size` prompts × `max_new_tokens`. `calib`: (samples, length) of the calibration;
    `perplexity`: the window of a perplexity measurement after pruning (hierui prune: 512 tokens), 0 for none.
    None when the model's config is not known before loading (a hub model neither cached nor reachable)."""
    from engine.models.loading import pick_device, pick_dtype, resolve
    from engine.perturb.spec import parse_spec, unperturbed

    parsed = [parse_spec(s) if isinstance(s, str) else s for s in specs] or [unperturbed()]
    ref = resolve(model)
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    if gpus < 1:
        raise HieruiError(f"--gpus {gpus}: give at least 1")
    if gpus > 1:
        import torch

        present = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if gpus > present:
            raise HieruiError(f"--gpus {gpus}: only {present} CUDA GPU(s) here")
        if dev.type != "cuda":
            raise HieruiError(f"--gpus {gpus} applies to --device cuda; the device here is {dev.type}")
    if gpu_mem is not None and dev.type not in ("cuda", "cpu"):  # on a CPU it simulates a smaller device
        raise HieruiError(f"--gpu-mem applies to --device cuda (or cpu, simulated); the device here is {dev.type}")
    g = geom or geometry(model, dt, fetch)
    if g is None:
        return None
    b = g.itemsize
    on_cpu = dev.type == "cpu"
    samples, length = calib or (0, 0)
    calibrates = [s for s in parsed if s.needs_calibration]
    chunk_seqs = min(CALIB_CHUNK, samples) if samples else 0
    chunk_tokens = chunk_seqs * length

    items: list[Item] = []
    if on_cpu:
        items.append(Item("process baseline", BASELINE_CPU, STAGES, "python, torch, transformers, tokenizer", False))
    items.append(Item("dense weights", g.weight_bytes, STAGES, f"{g.params:,} parameters × {b} B ({g.dtype})"))
    quantized = [s for s in parsed if s.family == "quant"]
    if on_cpu and quantized:
        items.append(Item("bitsandbytes", BITSANDBYTES_CPU, ("prune", "step"), "its import (measured)", False))

    # the perturbed copy: one pair at a time; the largest spec decides
    worst = max(parsed, key=lambda s: _perturbed_bytes(s, g, dt)[0])
    pert, how = _perturbed_bytes(worst, g, dt)
    if pert:
        items.append(Item(f"perturbed copy ({worst})", pert, ("prune", "step"), how))

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
                f"{chunk_seqs} through it",
            )
        )
        if self_calibration:
            gen = min(GENERATION_BATCH, samples)
            kv = 2 * g.layers * gen * length * g.kv_heads * g.head_dim * b
            logits = gen * g.vocab * (b + 5 * 4)
            how = f"{gen} sequences × {length}: KV cache, logits"
            items.append(Item("calibration sampling", kv + logits, ("calibrate",), how))
    work = max((_workspace(s, g, chunk_tokens) for s in parsed), key=lambda w: w[0])
    if work[0]:
        items.append(Item("pruning workspace (layer in flight)", work[0], ("prune",), work[1]))

    tokens = prompt_tokens + max_new_tokens
    kv = 2 * 2 * g.layers * batch_size * g.kv_heads * tokens * g.head_dim * b
    items.append(
        Item("KV caches (both models)", kv, ("step",), f"{batch_size} × ({prompt_tokens} prompt + {max_new_tokens})")
    )
    logits = 2 * batch_size * g.vocab * b + METRIC_VECTORS * batch_size * g.vocab * 4
    prefill = batch_size * min(prompt_tokens, PREFILL_CHUNK) * (4 * g.intermediate + 6 * g.hidden) * b
    items.append(Item("logits, metrics, prefill", logits + prefill, ("step",), f"{batch_size} × vocab {g.vocab:,}"))
    if perplexity:  # engine.run.quality.perplexity: a window's logits, their float32 copy and log-softmax
        window = perplexity * (g.vocab * (b + 2 * 4) + (4 * g.intermediate + 6 * g.hidden) * b)
        items.append(Item("perplexity window", window, ("step",), f"{perplexity} tokens × vocab {g.vocab:,}"))
    if quantized:  # a quantized linear de-quantizes its weight to the compute dtype for each matmul
        largest = max((o * i for o, i, e in g.matrices if not e), default=0)
        items.append(Item("de-quantized weight in flight", largest * b, ("step",), f"the largest matrix, {g.dtype}"))
    if lens:
        lens_bytes = batch_size * g.layers * g.vocab * (2 * b + LENS_VECTORS * 4)
        items.append(Item("logit lens", lens_bytes, ("step",), f"{batch_size} × {g.layers} layers × vocab"))

    stages = {s: stage_total(items, s) for s in STAGES}
    peak_stage = max(STAGES, key=lambda s: stages[s])
    plan = Plan(
        model=ref.name,
        display=ref.display,
        dtype=g.dtype,
        device=str(dev) if dev.type != "cuda" or dev.index is not None else "cuda:0",
        gpus=gpus,
        specs=[str(s) for s in parsed],
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        prompt_tokens=prompt_tokens,
        calibration=(samples, length) if calibrates and samples else None,
        items=items,
        stages=stages,
        peak=stages[peak_stage],
        peak_stage=peak_stage,
    )
    _place(plan, g, dev, dt, gpu_mem, fetch)
    return plan


def host_memory() -> tuple[int, int]:
    """(available, total) host RAM in bytes."""
    try:
        import psutil

        vm = psutil.virtual_memory()
        return int(vm.available), int(vm.total)
    except ImportError:  # pragma: no cover - psutil comes with the package set
        info = {}
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                key, _, value = line.partition(":")
                info[key] = int(value.split()[0]) * KiB
        return info.get("MemAvailable", info.get("MemFree", 0)), info.get("MemTotal", 0)


def _place(plan: Plan, g: Geometry, dev, dt, gpu_mem: int | None, fetch: bool = False) -> None:
    """Where the pair goes, and whether it fits; HieruiError (exit 2) when it cannot fit even streamed."""
    available, total = host_memory()
    plan.host_available = available
    items = plan.items
    if dev.type != "cuda" and gpu_mem is None:
        plan.capacity, plan.capacity_source = available, "RAM available"
        plan.placement = f"one device ({plan.device})"
        if plan.peak > available:
            smaller = "a smaller model" if plan.dtype != "float32" else "--dtype bfloat16, a smaller model"
            raise HieruiError(
                f"{plan.display} in {plan.dtype} with {', '.join(plan.specs)} cannot fit: predicted peak "
                f"{gib(plan.peak)} ({plan.peak_stage}) > {gib(available)} of RAM available ({gib(total)} total): "
                f"stream the layers from disk with --gpu-mem SIZE (pruning, drops, checkpoints; not quantization), "
                f"or use {smaller} or a GPU"
            )
        return
    index = dev.index or 0
    if gpu_mem is not None:
        caps = [gpu_mem] * plan.gpus
        plan.capacity_source = "--gpu-mem" if dev.type == "cuda" else "--gpu-mem (simulated on the CPU)"
    else:
        import torch

        caps = [int(torch.cuda.mem_get_info(index + i)[0]) for i in range(plan.gpus)]
        plan.capacity_source = "free CUDA memory"
    plan.capacity = min(caps)
    plan.device_peak = max(stage_total(items, s, device_only=True) for s in STAGES)
    if plan.device_peak <= caps[0]:
        plan.placement = f"one device ({plan.device})"
        if plan.gpus > 1:  # the load keeps to that GPU rather than spreading over every one present
            plan.device_map = {"": index}
        return
    if plan.gpus > 1 and _place_on_gpus(plan, g, dt, caps, index, fetch):
        return
    # streamed: the embeddings/head and STREAMED_LAYERS layers' weights on the device, the layers on disk
    resident = g.outside_bytes + STREAMED_LAYERS * g.layer_bytes
    weights = {"dense weights"} | {i.name for i in items if i.name.startswith("perturbed")}
    device_need = max(
        resident + sum(i.nbytes for i in items if s in i.stages and i.on_device and i.name not in weights)
        for s in STAGES
    )
    # on disk: the pruned weights the perturbed model writes (a checkpoint's layers are read where they are)
    disk_need = sum(i.nbytes for i in items if i.name.startswith("perturbed"))
    disk_free = _disk_free()
    plan.streamed_device = device_need
    plan.fits, plan.implemented = False, True
    plan.placement = "streamed"
    where = "on the GPU" if dev.type == "cuda" else "in the simulated budget"
    if device_need > plan.capacity or disk_need > disk_free:
        why = (
            f"streamed it still needs {gib(device_need)} {where} ({gib(plan.capacity)} {plan.capacity_source})"
            if device_need > plan.capacity
            else f"streaming writes {gib(disk_need)} of pruned weights to disk ({gib(disk_free)} free)"
        )
        raise HieruiError(
            f"{plan.display} in {plan.dtype} with {', '.join(plan.specs)} cannot fit even streamed: predicted peak "
            f"{gib(plan.peak)} ({plan.peak_stage}); {why}: use a smaller --batch-size or --max-new-tokens, fewer "
            f"--calib-samples, a smaller model or more GPUs"
        )
    plan.placement_note = (
        f"{gib(device_need)} {where}: embeddings and head resident, decoder layers streamed from disk one at a time"
    )


# what is split over the GPUs in proportion to the dense weights, beside the dense layers: the perturbed copy's
# layers and the KV caches (stepping's, and the calibration sampler's, which is mostly its KV cache)
SPLIT_WITH_LAYERS = ("KV caches (both models)", "calibration sampling")


def _place_on_gpus(plan: Plan, g: Geometry, dt, caps: list[int], first: int, fetch: bool) -> bool:
    """Several GPUs: one device_map (engine.place.placement.pair_device_map) for both models, made here from the meta
    build so that the load follows it; False when the pair does not fit them even so (then it is streamed)."""
    from engine.anatomy.linears import decoder_layers_prefix
    from engine.place.placement import describe, modules_by_device, pair_device_map

    items = plan.items
    layered = {"dense weights", *SPLIT_WITH_LAYERS} | {i.name for i in items if i.name.startswith("perturbed")}
    # the rest (activations, workspace, logits, lens) may peak on whichever GPU holds the layer in flight
    reserve = max(
        sum(i.nbytes for i in items if s in i.stages and i.on_device and i.name not in layered) for s in STAGES
    )
    overhead = max(sum(i.nbytes for i in items if s in i.stages and i.name in layered) for s in STAGES)
    overhead /= max(1, g.weight_bytes)
    budgets = {first + k: cap - reserve for k, cap in enumerate(caps)}
    if min(budgets.values()) <= 0:
        return False
    config = _config_object(plan.model, fetch)
    model = meta_model(plan.model, config, dt)
    try:
        device_map = pair_device_map(model, dt, budgets, max(1.0, overhead))
    except HieruiError:
        return False
    used = sorted(set(device_map.values()))
    per_gpu = {k: 0 for k in used}
    sizes = _bytes_by_entry(model, device_map)
    for name, gpu in device_map.items():
        per_gpu[gpu] += sizes.get(name, 0)
    prefix = decoder_layers_prefix(model)
    modules = modules_by_device(device_map, prefix)
    # per GPU: (its modules, its dense weights, what the pair may peak at there: those × overhead + the reserve)
    plan.gpu_loads = {gpu: (modules[gpu], dense, reserve + int(dense * overhead)) for gpu, dense in per_gpu.items()}
    plan.per_gpu = max(peak for _modules, _dense, peak in plan.gpu_loads.values())
    plan.device_map = device_map
    many = len(used) > 1
    plan.placement = f"{len(used)} GPUs, one device_map for both models" if many else f"one device (cuda:{used[0]})"
    plan.placement_note = (
        f"{describe(device_map, prefix)}; up to {gib(plan.per_gpu)} per GPU; layer ℓ of dense and perturbed on one GPU"
    )
    plan.fits, plan.implemented = True, True
    return True


def _bytes_by_entry(model, names) -> dict[str, int]:
    """Bytes of the tensors under each module of `names` (a device_map's keys; tied tensors counted once)."""
    seen: set[int] = set()
    sizes: dict[str, int] = {}
    for name in names:
        module = model.get_submodule(name) if name else model
        tensors = [t for t in list(module.parameters()) + list(module.buffers()) if id(t) not in seen]
        seen |= {id(t) for t in tensors}
        sizes[name] = sum(t.numel() * t.element_size() for t in tensors)
    return sizes


def _disk_free() -> int:
    """Free bytes where streamed models write their layers (engine.place.streaming: the temporary folder)."""
    import shutil
    import tempfile

    try:
        return int(shutil.disk_usage(tempfile.gettempdir()).free)
    except OSError:  # pragma: no cover
        return 2**62


def _field(plan, key: str):
    """`key` of a plan: an engine.run.plan.Plan, its summary dict (batch.json, a session header, a sweep), or None."""
    return plan.get(key) if isinstance(plan, dict) else getattr(plan, key, None)


def plans_streaming(plan) -> bool:
    """The plan streams the decoder layers (engine.place.streaming)."""
    return _field(plan, "placement") == "streamed"


def planned_device_map(plan) -> dict | None:
    """The plan's device_map for several GPUs ({module name: GPU index}, engine.place.placement), else None."""
    found = _field(plan, "device_map")
    return dict(found) if found else None


def visible_gpus(device: str | None) -> int:
    """The GPUs a run on `device` spreads the pair over: every visible one for auto and cuda (choose them with
    CUDA_VISIBLE_DEVICES), one for cuda:N, cpu or mps."""
    if (device or "auto").strip().lower() not in ("auto", "cuda"):
        return 1
    import torch

    return max(1, torch.cuda.device_count()) if torch.cuda.is_available() else 1


def plan_for_run(
    model: str,
    specs: list,
    device: str,
    dtype: str,
    calib: dict | None,
    batch_size: int = 1,
    max_new_tokens: int = 64,
    lens: bool = True,
    prompt_tokens: int = PROMPT_TOKENS,
    perplexity: int = 0,
    gpu_mem: int | None = None,
    gpus: int | None = None,
) -> Plan | None:
    """The plan a run prints and records (engine.run.open.plan_pair): None where the config is not known before
    loading (nothing is refused then); HieruiError when the pair cannot fit even streamed. `gpu_mem`: the device's
    budget (--gpu-mem; on a CPU a simulated one), below the pair's peak the layers are streamed; `gpus`: how many
    GPUs the pair spreads over (--gpus; default every visible one, visible_gpus)."""
    calib = calib or {}
    gpus = gpus if gpus is not None else visible_gpus(device)
    return estimate(
        model,
        specs,
        device=device,
        dtype=dtype,
        gpus=gpus,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        prompt_tokens=prompt_tokens,
        calib=(int(calib.get("samples") or 0), int(calib.get("length") or 0)),
        self_calibration=calib.get("source") in (None, "self"),
        lens=lens,
        perplexity=perplexity,
        gpu_mem=gpu_mem,
    )


_REMEMBERED: dict = {}  # the last plan of this process: an out-of-memory message names its figure


def remember(plan: Plan | None) -> None:
    """Keep the plan's peak for an out-of-memory message later in this process (last_figure)."""
    if plan is not None:
        _REMEMBERED.update(peak=int(plan.peak), stage=plan.peak_stage, device=plan.device)


def forget() -> None:
    """Drop the remembered plan (a new command starts)."""
    _REMEMBERED.clear()


def last_figure() -> str:
    """' (hierui plan predicted a peak of 1.23 GiB on cpu, at the prune stage)' when this process planned a
    run, else ''."""
    if not _REMEMBERED:
        return ""
    r = _REMEMBERED
    return f" (hierui plan predicted a peak of {gib(r['peak'])} on {r['device']}, at the {r['stage']} stage)"
