"""The `cache` check: KV-cached stepping equals a full forward pass.

The pair is stepped (engine.run.stepper.Stepper, shared mode, greedy, with choices); then each model runs once
over the prompt and the tokens it was fed, without a cache. At every step's position: the logits (max |Δz| / the
logit scale max |z|), the hidden states (max ‖Δh‖/‖h‖ over layers) and every recorded metric, recomputed from the
full pass with engine.run.metrics.step_metrics (max |Δ| per metric). For int8/nf4 the perturbed model's reference
is transformers' own incremental decoding through the same kernels (they compute one token per call otherwise
than many), and how far that is from the full pass is reported.
"""

from __future__ import annotations

import math

import torch

from engine.check.compare import deviation, largest_magnitude, relative_error, verdict
from engine.check.result import CheckResult
from engine.check.stepping import TEMPERATURE, TOPK, full_pass, incremental_pass, step_outputs, stepped_alone
from engine.check.tolerance import metric_tolerance, side_tolerance
from engine.perturb.pair import mapped_hidden
from engine.run import metrics as M


def check_cache(pair, steps: int, runs: dict | None = None) -> CheckResult:
    """KV-cached stepping against one full forward pass of each model over the same tokens."""
    spec = str(pair.spec)
    stepper, records, calls = stepped_alone(pair, 0, steps, runs)
    n = len(records)
    prompt = list(stepper.prompt_ids)
    device = stepper.batch.device
    eps = {side: side_tolerance(pair, side) for side in ("dense", "perturbed")}
    positions = torch.arange(len(prompt) - 1, len(prompt) - 1 + n)
    quantized = pair.spec.family == "quant"
    floor = 0.0
    parts: list[tuple[str, float, float]] = []
    full = {}
    scale = 0.0
    for side, model, index in (("dense", pair.dense, 0), ("perturbed", pair.perturbed, 1)):
        fed = [r["fed"][index] for r in records[:-1]]
        hidden, logits = full_pass(model, prompt + fed, device)
        hidden, logits = hidden[positions.to(hidden.device)], logits[positions.to(logits.device)]
        if quantized and side == "perturbed":
            # bitsandbytes computes one token per call (a cached step) otherwise than many (a full pass), so
            # the reference is transformers' own incremental decoding through the same kernels; how far that
            # is from the full pass is the kernels' floor, reported
            h_full, z_full = hidden, logits
            hidden, logits = incremental_pass(model, prompt, fed, device)
            delta = (hidden.float() - h_full.float()).norm(dim=-1) / h_full.float().norm(dim=-1).clamp_min(1e-30)
            floor = max(float(delta.max()), relative_error(logits, z_full, float(z_full.float().abs().max())))
        full[side] = (hidden, logits)
        cached = step_outputs(calls[id(model)], len(prompt), n)
        z_cached = torch.stack([z for _, z in cached]).to(logits.device)
        h_cached = torch.stack([h for h, _ in cached]).to(hidden.device)
        side_scale = float(logits.float().abs().max())
        scale = max(scale, side_scale)
        parts.append((f"{side} logits (relative)", relative_error(z_cached, logits, side_scale), eps[side]))
        if h_cached.shape != hidden.shape:
            shapes = f"{tuple(h_cached.shape)} vs {tuple(hidden.shape)}"
            parts.append((f"{side} hidden states: shape {shapes}", math.inf, eps[side]))
        else:
            delta = (h_cached.float() - hidden.float()).norm(dim=-1) / hidden.float().norm(dim=-1).clamp_min(1e-30)
            parts.append((f"{side} hidden states (relative)", float(delta.max()), eps[side]))
    (hd, zd), (hp, zp) = full["dense"], full["perturbed"]
    mapping = torch.tensor(pair.hidden_map, dtype=torch.long, device=hp.device)
    cids = torch.tensor(stepper.choice_ids, dtype=torch.long, device=zd.device) if stepper.choice_ids else None
    recomputed = M.to_host(
        M.step_metrics(
            hd,
            mapped_hidden(hd, hp.to(hd.device), mapping.to(hd.device)),
            zd,
            zp.to(zd.device),
            torch.tensor([r["fed"][0] for r in records], device=zd.device),
            torch.tensor([r["fed"][1] for r in records], device=zd.device),
            temperature=TEMPERATURE,
            k=TOPK,
            choice_ids=cids,
        )
    )
    parts.extend(_metric_parts(records, recomputed, max(eps.values()), scale))
    result = verdict(spec, "cache", parts)
    result.reason = f"{n} steps, shared mode; " + result.reason
    if quantized:
        result.reason += (
            f"; the perturbed model against transformers' own incremental decoding (the quantized kernels compute "
            f"one token per call otherwise than many: that decoding is {floor:.2g} from a full pass)"
        )
    return result


def _metric_parts(records: list[dict], recomputed: list[dict], eps: float, scale: float) -> list[tuple]:
    """(metric, max |Δ| over the steps, its tolerance) of every metric recomputed from the full pass."""
    devs: dict[str, float] = {}
    mags: dict[str, float] = {}
    for record, host in zip(records, recomputed):
        for key, value in host.items():
            if key.endswith("_ids"):
                continue
            if key in ("topk_d_probs", "topk_p_probs"):
                name = key.removesuffix("_probs")
                stored = [row[2] for row in record.get(name) or []]
            else:
                name, stored = key, record.get(key, "missing")
            dev = math.inf if stored == "missing" else deviation(stored, value)
            devs[name] = max(devs.get(name, 0.0), dev)
            mags[name] = max(mags.get(name, 0.0), largest_magnitude(stored if stored != "missing" else None, value))
    return [(f"metric {k}", devs[k], metric_tolerance(eps, scale, mags[k])) for k in devs]
