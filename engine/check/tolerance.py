"""The tolerances of `hierui check`: ε from the dtype a model runs in, and what it allows a logit, a hidden state
and a metric.

A relative tolerance ε is chosen from the dtype the model runs in, ε = 1e-4 for float32, 1e-2 for float16, 5e-2
for bfloat16 (1e-9 for float64): cached, batched and full passes reorder the same float sums, which moves a logit
by a few units in the last place of every layer it passes through, far below ε, while a wrong cache, position or
mask moves it by a sizeable part of the logit scale. Logits must agree to ε·max|z|, hidden states to ε·‖h‖. A
logit error of ε·max|z| moves every log-probability by at most 2ε·max|z|/T, so a metric must agree to
ε · max(1, 4·max|z|/T) · (1 + |v|), |v| its largest magnitude (which makes the bound relative for large values:
NLL, rank_shift, amp). The perturbed model of int8 gets ε ≥ 4/127: bitsandbytes quantizes its activations per
token in float16, so a last-bit difference upstream can flip an activation by one int8 step (1/127 of its row's
largest value), in several layers. A check made of several quantities reports the one furthest beyond (or closest
to) its own tolerance, and names it (engine.check.compare).
"""

from __future__ import annotations

import torch

from engine.check.stepping import TEMPERATURE

REL_TOLERANCE = {"float32": 1e-4, "float64": 1e-9, "float16": 1e-2, "bfloat16": 5e-2}
FLOOR_FACTOR = 4.0  # a quantized model's batch tolerance: this many times its kernels' own noise (batch_floor)


def dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def rel_tolerance(dtype) -> float:
    """ε of the tolerance rule for a model running in `dtype` (module docstring)."""
    return REL_TOLERANCE.get(dtype_name(dtype), REL_TOLERANCE["bfloat16"])


def kernel_dtype(pair) -> str:
    """The precision the perturbed model's quantized kernels really return, measured: a quantized linear's
    outputs for random inputs that are all exactly bfloat16 (or float16) values mean the kernel rounds to that
    precision whatever the model's dtype (bitsandbytes' CPU nf4 kernel does, for a float32 model); else the
    model's own dtype."""
    own = dtype_name(pair.dense.get_input_embeddings().weight.dtype)
    if pair.spec.family != "quant":
        return own
    module = next((m for m in pair.perturbed.modules() if type(m).__module__.startswith("bitsandbytes")), None)
    if module is None or not hasattr(module, "in_features"):
        return own
    weight = pair.dense.get_input_embeddings().weight
    x = torch.randn(4, module.in_features, generator=torch.Generator().manual_seed(0)).to(weight.device, weight.dtype)
    with torch.no_grad():
        out = module(x)
    if out.dtype == torch.float32:
        for name, narrow in (("bfloat16", torch.bfloat16), ("float16", torch.float16)):
            if bool((out == out.to(narrow).float()).all()):
                return name
    return own


def side_tolerance(pair, side: str, floor: float = 0.0) -> float:
    """ε of one model of a pair: the dtype's (for the perturbed model, the precision its quantized kernels
    really return: kernel_dtype), and for the perturbed model at least its method's Method.min_tolerance (int8's
    4/127: it quantizes its activations per token, so a last-bit difference can move an activation by one int8
    step)."""
    eps = rel_tolerance(pair.dense.get_input_embeddings().weight.dtype)
    if side == "perturbed" and pair.spec.family == "quant":
        eps = max(eps, rel_tolerance(kernel_dtype(pair)))
    if side == "perturbed":
        eps = max(eps, pair.spec.declared.min_tolerance)
    if side == "perturbed" and floor:
        eps = max(eps, FLOOR_FACTOR * floor)
    return eps


def metric_tolerance(eps: float, scale: float, magnitude: float, temperature: float = TEMPERATURE) -> float:
    """How far a metric of magnitude `magnitude` may move when the logits (scale max|z|) move by ε·scale."""
    return eps * max(1.0, 4.0 * scale / temperature) * (1.0 + magnitude)


def tolerance_rule(dtype) -> str:
    eps = rel_tolerance(dtype)
    return (
        f"{dtype_name(dtype)}: ε = {eps:g}; logits within ε·max|z|, hidden states within ε·‖h‖, each metric within "
        f"ε·max(1, 4·max|z|/T)·(1 + |value|) (int8's perturbed model: ε ≥ 4/127); zero and sharing exact; "
        f"sparsity exact per comparison group; int8/nf4: the perturbed model's cache reference is transformers' own "
        f"incremental decoding, its ε that of the precision its kernels return (bitsandbytes' CPU nf4: bfloat16) and "
        f"at least {FLOOR_FACTOR:g}× the kernels' own noise (batch_floor)"
    )
