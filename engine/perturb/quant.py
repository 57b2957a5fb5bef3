"""int8 / nf4: quantize the decoder's weight matrices in the sharing clone with bitsandbytes.

Every weight matrix inside the decoder layers is quantized; embeddings, norms and the LM head stay shared
with the dense model. How depends on the kind of module holding it (`details["methods"]` records which
method each kind got, `details["quantized"]` how many of each):

- `linear` (nn.Linear: attention q/k/v/o, fused qkv, MLP gate/up/down, a shared expert's projections) and
  `conv1d` (GPT-2's transformers Conv1D, whose weight is stored transposed, [in, out]): replaced by the
  bitsandbytes module, run by bitsandbytes' kernels. A Conv1D becomes the bitsandbytes linear of its
  transposed weight, the exact equivalent of Conv1D (`x @ W + b` = `linear(x, Wᵀ, b)`); transformers'
  BitsAndBytes integration handles Conv1D the same way.
- `experts` (a mixture of experts stored as one module with 3-D parameters, e.g. Mixtral's and Qwen2-MoE's
  `mlp.experts.gate_up_proj` [E, 2I, H] and `down_proj` [E, H, I]): bitsandbytes has no module for these,
  so each expert's matrix is quantized with bitsandbytes' own quantizer and de-quantized right away with
  its own de-quantizer (simulated or "fake" quantization), and the clone's experts module gets a new 3-D
  parameter holding those values, in the model's dtype. For nf4 this is the same arithmetic as
  Linear4bit, which de-quantizes its weight before the matmul; for int8 the weights are those of
  Linear8bitLt (per-row absmax int8), but the matmul runs in the model's dtype, so the per-token int8
  quantization of the activations that Linear8bitLt also does is not simulated. The simulated weights
  take as much memory as the dense experts. `experts.is_transposed` (weights stored [E, in, out]) is
  honoured: rows are always output features, as in a Linear.
- `router` (MoE routers: `mlp.gate`, Mixtral's TopKRouter, Qwen2-MoE's `shared_expert_gate` Linear(H→1);
  any module named `gate`, `router` or `shared_expert_gate`, whose class name ends in `Router`, or a
  linear directly inside the module holding the `experts`, as engine.anatomy.linears decides) and
  the model's `_keep_in_fp32_modules`: kept in full precision, shared with the dense model. Routers make
  discrete top-k choices from a handful of outputs; common practice (GPTQ/AWQ toolkits, llm-compressor's
  ignore lists) keeps them unquantized. transformers' own BitsAndBytes integration converts every
  nn.Linear/Conv1D outside `llm_int8_skip_modules` / `_keep_in_fp32_modules` (so it would convert
  Qwen2-MoE's shared_expert_gate, and leaves Mixtral's router and the 3-D experts alone).
- A linear whose shape bitsandbytes cannot run (e.g. a Linear with one output under nf4 on the CPU
  backend, which packs 32 rows at a time) is left in full precision and listed in `details["skipped"]`
  with the reason; quantization goes on.

Settings:
- `int8`: `bnb.nn.Linear8bitLt`, `has_fp16_weights=False`, `threshold=0.0` (bitsandbytes' default):
  LLM.int8()'s vector-wise quantization of weights (per output row) and activations (per token), with
  no fp16 outlier decomposition, so every column goes through int8. (transformers' `load_in_8bit`
  defaults to threshold 6.0, which computes activation outlier columns in fp16.) Experts:
  `bnb.functional.int8_vectorwise_quant` / `int8_vectorwise_dequant` of the fp16 weight, per expert.
- `nf4`: `bnb.nn.Linear4bit`, `quant_type="nf4"`, blocksize 64, no double quantization of the scales
  (the defaults of transformers' BitsAndBytesConfig), compute dtype = the model's dtype. Experts:
  `bnb.functional.quantize_4bit` / `dequantize_4bit` with the same settings, per expert matrix.

The dense weights are never touched: each weight is copied before quantization and the new module
gets its own Parameter objects (bias included), so nothing bitsandbytes does in place reaches them.
Before anything is replaced, a small module of each method is run once on every device the weights
live on, so a backend that cannot run at all is one line, not a crash in the middle of stepping.
"""

from __future__ import annotations

import logging

from engine.anatomy.linears import decoder_layers
from engine.errors import HieruiError, is_oom, one_line

INT8_THRESHOLD = 0.0
NF4_BLOCKSIZE = 64
NF4_DOUBLE_QUANT = False

ROUTER_NAMES = frozenset({"gate", "router", "shared_expert_gate"})
KERNELS = "bitsandbytes kernels"
SIMULATED = "weights quantize-dequantized with bitsandbytes' quantizer"


def build(job):
    """The sharing clone with its decoder weight matrices quantized (engine.perturb.job.Job)."""
    from engine.perturb.pair import clone_sharing

    clone = clone_sharing(job.dense)
    job.say(f"quantizing to {job.spec}", 0, 0)
    job.report.details.update(quantize(clone, job.spec) or {})
    return clone


def quantize(clone, spec) -> dict:
    """Quantize every decoder weight matrix of `clone` (see the module docstring); say what was done."""
    import torch

    bnb = _import_bnb()
    dtype = next(clone.parameters()).dtype
    bits = spec.declared.params["bits"]  # 8: LLM.int8(), 4: nf4 (engine.record.methods.quant)
    counts = {"linear": 0, "conv1d": 0, "expert_matrices": 0}
    kept: dict[str, str] = {}  # path inside a layer -> why it stays in full precision
    skipped: list[str] = []
    probed: set = set()
    keep_fp32 = set(getattr(clone, "_keep_in_fp32_modules", None) or ()) | set(
        getattr(clone, "_keep_in_fp32_modules_strict", None) or ()
    )
    for index, layer in enumerate(decoder_layers(clone)):
        for name, module, kind in weight_modules(layer, keep_fp32):
            if kind in ("router", "fp32"):
                kept[name] = "router" if kind == "router" else "_keep_in_fp32_modules"
                continue
            device = _device_of(module)
            if device.type == "meta":
                raise HieruiError(
                    f"cannot quantize {name}: its weight is offloaded (meta device); load the model on one device"
                )
            if device not in probed:  # fail here with one line, not later in the middle of stepping
                _probe_backend(bnb, spec.method, bits, device, dtype, torch)
                probed.add(device)
            if kind == "experts":
                counts["expert_matrices"] += _quantize_experts(bnb, module, bits, dtype, torch)
                continue
            new, why = _quantized_linear(bnb, module, kind, bits, dtype, device)
            if new is None:
                skipped.append(f"layer {index} {name} {why}")
                continue
            layer.set_submodule(name, new)
            counts[kind] += 1
    if not any(counts.values()):  # never a silent no-op (KL exactly 0 would look like a result)
        why = f": bitsandbytes took none of them ({skipped[0]})" if skipped else ""
        raise HieruiError(f"{spec}: found no decoder weight matrix of {type(clone).__name__} to quantize{why}")
    return _details(bnb, counts, kept, skipped, bits, dtype)


def _quantized_linear(bnb, module, kind: str, bits: int, dtype, device):
    """(the bitsandbytes module replacing the linear or Conv1D `module`, None) after one forward pass through it,
    or (None, why) for a shape this backend cannot take: it stays in full precision."""
    import torch

    weight = module.weight.detach()
    if kind == "conv1d":
        weight = weight.t()  # Conv1D stores [in, out]; a linear's weight is [out, in]
    out_features, in_features = weight.shape
    try:
        if bits == 8:
            new = _int8_linear(bnb, weight, module.bias)
        else:
            new = _nf4_linear(bnb, weight, module.bias, dtype)
        new.train(module.training)
        new.requires_grad_(False)
        with torch.no_grad():
            new(torch.zeros(1, in_features, device=device, dtype=dtype))
    except Exception as e:  # a shape this backend cannot take: keep it in full precision, say why
        if is_oom(e):
            raise
        return None, f"({in_features}->{out_features}): {one_line(e)}"
    return new, None


def _details(bnb, counts: dict, kept: dict, skipped: list, bits: int, dtype) -> dict:
    """What quantize did, for the perturbation's report: how many of each kind, by which method, what was kept
    in full precision or skipped, and the settings."""
    module_class = "Linear8bitLt" if bits == 8 else "Linear4bit"
    methods = {}
    if counts["linear"]:
        methods["linear"] = f"{KERNELS} ({module_class})"
    if counts["conv1d"]:
        methods["conv1d"] = f"{KERNELS} ({module_class} of the transposed Conv1D weight)"
    if counts["expert_matrices"]:
        how = "int8_vectorwise_quant/dequant, per output row" if bits == 8 else "quantize_4bit/dequantize_4bit"
        methods["experts"] = f"{SIMULATED} ({how}, per expert matrix; matmul in the model's dtype)"
        if bits == 8:
            methods["experts"] += "; activations not quantized"
    details = {
        "quantized_linears": counts["linear"] + counts["conv1d"],
        "quantized": counts,
        "methods": methods,
        "full_precision": kept,
        "skipped": skipped,
        "bits": bits,
        "backend": f"bitsandbytes {bnb.__version__}",
    }
    if bits == 8:
        details["threshold"] = INT8_THRESHOLD
    else:
        details.update(
            quant_type="nf4",
            blocksize=NF4_BLOCKSIZE,
            double_quant=NF4_DOUBLE_QUANT,
            compute_dtype=str(dtype).removeprefix("torch."),
        )
    return details


def weight_modules(layer, keep_fp32=frozenset()):
    """(path inside the layer, module, kind) for every module of one decoder layer that holds weight matrices.

    kind: `linear` (nn.Linear), `conv1d` (transformers' Conv1D), `experts` (a module with 3-D parameters),
    `router` (see ROUTER_NAMES) or `fp32` (named in the model's _keep_in_fp32_modules). Modules already
    quantized by bitsandbytes are not listed.
    """
    import torch
    import torch.nn as nn
    from transformers.pytorch_utils import Conv1D

    found = []
    claimed: list[str] = []  # modules decided as a whole: nothing inside them is listed again
    modules = dict(layer.named_modules())
    for name, module in modules.items():
        if not name or any(name.startswith(prefix + ".") for prefix in claimed):
            continue
        own = dict(module.named_parameters(recurse=False))
        leaf = name.rsplit(".", 1)[-1]
        fp32 = bool(set(name.split(".")) & set(keep_fp32))
        if type(module).__module__.startswith("bitsandbytes"):
            kind = None  # already quantized
        elif _is_router(name, leaf, module, modules):
            kind = "router"
        elif isinstance(module, (nn.Linear, Conv1D)):
            kind = "fp32" if fp32 else ("conv1d" if isinstance(module, Conv1D) else "linear")
        elif any(p.dim() == 3 and torch.is_floating_point(p) for p in own.values()):
            kind = "fp32" if fp32 else "experts"
        else:
            continue
        claimed.append(name)
        if kind is not None:
            found.append((name, module, kind))
    return found


def _is_router(name: str, leaf: str, module, modules: dict) -> bool:
    """An MoE router: named gate/router/shared_expert_gate, a class called *Router, or a linear directly
    inside the module that holds the `experts` (the rule engine.anatomy.linears uses for pruning too)."""
    import torch.nn as nn

    if leaf in ROUTER_NAMES or type(module).__name__.endswith("Router"):
        return True
    parent = modules.get(name.rpartition(".")[0])
    experts = getattr(parent, "experts", None) if parent is not None else None
    return isinstance(module, nn.Linear) and isinstance(experts, nn.Module) and experts is not module


def _device_of(module):
    return next(module.parameters(recurse=False)).device


class _QuietCast(logging.Filter):
    """Drops the warning MatMul8bitLt logs on every forward whose input is not float16 (it is by design)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("MatMul8bitLt: inputs will be cast")


_QUIET_CAST = _QuietCast()


def _import_bnb():
    """bitsandbytes, or one line saying why not.

    Two notices that would otherwise reach stderr are silenced: the import-time one about an optional
    CPU kernel package (`kernels`; the built-in CPU kernels are used instead), and the per-call one
    saying int8 casts float32/bfloat16 inputs to float16 before quantizing them.
    """
    log = logging.getLogger("bitsandbytes")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        import bitsandbytes as bnb
    except Exception as e:  # ImportError, or a failing native library
        raise HieruiError(f"int8/nf4 need bitsandbytes, which failed to import: {one_line(e)}", 1) from None
    finally:
        log.setLevel(level)
    cast_log = logging.getLogger("bitsandbytes.autograd._functions")
    if _QUIET_CAST not in cast_log.filters:
        cast_log.addFilter(_QUIET_CAST)
    return bnb


def _own_bias(bias):
    """A new Parameter over the dense bias tensor (shared memory, but its own object)."""
    import torch.nn as nn

    return None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)


def _int8_linear(bnb, weight, bias):
    """Linear8bitLt over a copy of `weight` ([out, in])."""
    import torch

    w = weight.to(dtype=torch.float16, copy=True).contiguous()
    cb, scb, _ = bnb.functional.int8_vectorwise_quant(w)  # int8 rows and their absmax scales
    out_features, in_features = w.shape
    new = bnb.nn.Linear8bitLt(
        in_features,
        out_features,
        bias=bias is not None,
        has_fp16_weights=False,
        threshold=INT8_THRESHOLD,
        device="meta",
    )
    new.weight = bnb.nn.Int8Params(cb, requires_grad=False, has_fp16_weights=False, CB=cb, SCB=scb)
    new.bias = _own_bias(bias)
    return new


def _nf4_linear(bnb, weight, bias, dtype):
    """Linear4bit (nf4) over a copy of `weight` ([out, in])."""
    import torch

    w = weight.detach().clone().contiguous()
    packed, state = _nf4_quant(bnb, w, torch)
    out_features, in_features = w.shape
    new = bnb.nn.Linear4bit(
        in_features,
        out_features,
        bias=bias is not None,
        compute_dtype=dtype,
        compress_statistics=NF4_DOUBLE_QUANT,
        quant_type="nf4",
        quant_storage=torch.uint8,
        device="meta",
    )
    new.weight = bnb.nn.Params4bit(
        packed,
        requires_grad=False,
        quant_state=state,
        blocksize=NF4_BLOCKSIZE,
        compress_statistics=NF4_DOUBLE_QUANT,
        quant_type="nf4",
        quant_storage=torch.uint8,
        module=new,
        bnb_quantized=True,
    )
    new.quant_state = state
    new.bias = _own_bias(bias)
    return new


def _nf4_quant(bnb, w, torch):
    return bnb.functional.quantize_4bit(
        w, blocksize=NF4_BLOCKSIZE, compress_statistics=NF4_DOUBLE_QUANT, quant_type="nf4", quant_storage=torch.uint8
    )


def simulated_weight(bnb, weight, bits: int):
    """`weight` ([out, in]) quantized and de-quantized by bitsandbytes' own functions, in its dtype: what
    Linear4bit multiplies with (nf4, 4 bits), or Linear8bitLt's int8 rows times their scales (8 bits)."""
    import torch

    if bits == 8:
        cb, scb, _ = bnb.functional.int8_vectorwise_quant(weight.to(dtype=torch.float16, copy=True).contiguous())
        return bnb.functional.int8_vectorwise_dequant(cb, scb).to(weight.dtype)
    packed, state = _nf4_quant(bnb, weight.detach().clone().contiguous(), torch)
    return bnb.functional.dequantize_4bit(packed, state).to(weight.dtype)


def _quantize_experts(bnb, experts, bits: int, dtype, torch) -> int:
    """Give each 3-D parameter of `experts` a new one holding its simulated quantized values; return how
    many expert matrices that was."""
    import torch.nn as nn

    transposed = bool(getattr(experts, "is_transposed", False))  # [E, in, out] instead of [E, out, in]
    count = 0
    for pname, p in list(experts.named_parameters(recurse=False)):
        if p.dim() != 3 or not torch.is_floating_point(p):
            continue
        mats = []
        with torch.no_grad():
            for w in p.detach():
                w = w.t() if transposed else w
                q = simulated_weight(bnb, w, bits)
                mats.append(q.t() if transposed else q)
        setattr(experts, pname, nn.Parameter(torch.stack(mats).contiguous(), requires_grad=False))
        count += p.shape[0]
    return count


def _probe_backend(bnb, method: str, bits: int, device, dtype, torch) -> None:
    """One tiny forward pass through a fresh quantized linear of an ordinary shape (64 × 64); a backend that
    cannot run it at all is one line."""
    try:
        weight = torch.ones(64, 64, device=device, dtype=dtype)
        module = _int8_linear(bnb, weight, None) if bits == 8 else _nf4_linear(bnb, weight, None, dtype)
        module.eval()
        with torch.no_grad():
            module(torch.zeros(1, 64, device=device, dtype=dtype))
    except Exception as e:
        raise HieruiError(
            f"bitsandbytes cannot run {method} on {device} with {str(dtype).removeprefix('torch.')}: {one_line(e)}", 1
        ) from None
