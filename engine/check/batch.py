"""The `batch` check: batched stepping equals one-at-a-time.

engine.run.stepper.BatchStepper over three prompts of different lengths (and different numbers of choices)
against a Stepper on each: the same tokens, the logits (relative, as the cache check) and every recorded field
(max |Δ| per metric, engine.run.rerun.deviations). A dense token that differs where its two candidates are a near
tie (within 2ε·max|z|: float noise can pick either) ends the comparison of that prompt at that step (said in the
reason); a differing token anywhere else fails. For int8/nf4 the perturbed model's tolerance is at least
FLOOR_FACTOR times what the quantized kernels alone move in calls of another number of rows (batch_floor).
"""

from __future__ import annotations

import math

import torch

from engine.check.compare import largest_magnitude, relative_error, verdict
from engine.check.result import CheckResult
from engine.check.stepping import (
    CHOICES,
    PROMPTS,
    full_pass,
    incremental_pass,
    spy_forwards,
    step_outputs,
    step_settings,
    stepped_alone,
)
from engine.check.tolerance import FLOOR_FACTOR, metric_tolerance, side_tolerance


def batch_floor(pair, steps: int, runs: dict | None = None) -> float:
    """int8/nf4 only (0 otherwise): how far the quantized kernels alone move the perturbed model's outputs
    when the same tokens are computed in calls with another number of rows, with no hierui code: transformers'
    own incremental decoding of a prompt in a batch of as many identical rows as the check steps against alone,
    and a full pass over the prompt against passes over its first k tokens (the same numbers in exact
    arithmetic). bitsandbytes' CPU nf4 kernel, for one, computes a call of a few rows otherwise than one of
    many, so batched rows (padded to the longest prompt) and single ones differ by that much before hierui does
    anything; the batch check's tolerance for the perturbed model is FLOOR_FACTOR times it."""
    if pair.spec.family != "quant":
        return 0.0
    runs = {} if runs is None else runs
    if "batch floor" not in runs:
        stepper, records, _calls = stepped_alone(pair, 0, steps, runs)
        prompt, fed = list(stepper.prompt_ids), [r["fed"][1] for r in records[:-1]]
        device = stepper.batch.device
        _h, one = incremental_pass(pair.perturbed, prompt, fed, device)
        _h, two = incremental_pass(pair.perturbed, prompt, fed, device, rows=len(PROMPTS))
        scale = float(one.float().abs().max())
        floor = relative_error(two, one, scale)
        _h, whole = full_pass(pair.perturbed, prompt, device)
        for k in sorted({1, 2, 3, 5, 8} & set(range(1, len(prompt)))):
            _h, part = full_pass(pair.perturbed, prompt[:k], device)
            floor = max(floor, relative_error(part, whole[:k], scale))
        runs["batch floor"] = floor
    return runs["batch floor"]


def _floor_note(floor: float) -> str:
    if not floor:
        return ""
    return (
        f"; the quantized kernels alone move the same tokens' outputs by {floor:.2g} in calls of another number of "
        f"rows (no hierui code): the perturbed model's tolerance is {FLOOR_FACTOR:g}× that"
    )


def check_batch(pair, steps: int, runs: dict | None = None) -> CheckResult:
    """BatchStepper over PROMPTS against a Stepper on each."""
    from engine.run.rerun import deviations
    from engine.run.stepper import BatchStepper

    spec = str(pair.spec)
    floor = batch_floor(pair, steps, runs)
    eps = {side: side_tolerance(pair, side, floor) for side in ("dense", "perturbed")}
    settings = step_settings("shared", steps, None)
    batch = BatchStepper(pair, list(PROMPTS), settings, choices=[list(c) if c else None for c in CHOICES])
    batch.eos = set()  # to the step limit (engine.run.stepper: an empty set never ends a run)
    batch_calls = spy_forwards(batch, pair)
    batched = batch.run()
    width = max(len(r.ids) for r in batch.rows)
    parts: list[tuple[str, float, float]] = []
    notes: list[str] = []
    for b in range(len(PROMPTS)):
        single, records, calls = stepped_alone(pair, b, steps, runs)
        row = batched[b]
        if single.prompt_ids != batch.rows[b].ids:
            parts.append((f"prompt {b + 1} tokenized differently", math.inf, 0.0))
            continue
        if len(records) != len(row):
            parts.append((f"prompt {b + 1}: {len(row)} steps batched, {len(records)} alone", math.inf, 0.0))
        n = min(len(records), len(row))
        logits, scale = {}, 0.0
        for side, model in (("dense", pair.dense), ("perturbed", pair.perturbed)):
            alone = step_outputs(calls[id(model)], len(single.prompt_ids), n)
            together = step_outputs(batch_calls[id(model)], width, n, row=b)
            z1 = torch.stack([z for _, z in alone]).float()
            z2 = torch.stack([z for _, z in together]).float().to(z1.device)
            logits[side] = (z1, z2, float(z1.abs().max()))
            scale = max(scale, logits[side][2])
        split, problem = _token_split(records[:n], row[:n], logits, eps)
        if problem:
            parts.append((f"prompt {b + 1}: {problem}", math.inf, 0.0))
        elif split < n:
            notes.append(f"prompt {b + 1} split at step {split + 1} on a near tie")
        for side, (z1, z2, side_scale) in logits.items():  # up to the split: the same inputs until then
            rel = relative_error(z2[: split + 1], z1[: split + 1], side_scale)
            parts.append((f"prompt {b + 1} {side} logits (relative)", rel, eps[side]))
        for name, dev in deviations(records[:split], row[:split]).items():
            mag = largest_magnitude(*(r.get(name) for r in records[:split] if name not in ("topk_d", "topk_p")))
            parts.append((f"prompt {b + 1} metric {name}", dev, metric_tolerance(max(eps.values()), scale, mag)))
    result = verdict(spec, "batch", parts)
    lengths = "/".join(str(len(r.ids)) for r in batch.rows)
    said = "; ".join([f"{len(PROMPTS)} prompts of {lengths} tokens, {steps} steps", *notes, result.reason])
    result.reason = said + _floor_note(floor)
    return result


def _near_tie(z: torch.Tensor, a: int, b: int, tol: float) -> bool:
    """Whether tokens `a` and `b` are within `tol` of each other in the logits `z` (V,)."""
    return abs(float(z[a]) - float(z[b])) <= tol


def _token_split(alone: list[dict], together: list[dict], logits: dict, eps: dict) -> tuple[int, str]:
    """(the first step whose dense token differs, or the step count; a problem, or "").

    A token that differs where its two candidates are a near tie (within 2ε·max|z| in either run's logits: each
    may move by ε·max|z|) is float noise: the runs are compared up to that step. Elsewhere it is a problem. A
    perturbed token that differs on a near tie changes nothing fed (shared mode) and is ignored."""
    for i, (a, b) in enumerate(zip(alone, together)):
        for key, side in (("token_p", "perturbed"), ("token_d", "dense")):
            if a[key] == b[key]:
                continue
            z1, z2, scale = logits[side]
            tol = 2.0 * eps[side] * scale
            if not (_near_tie(z1[i], a[key], b[key], tol) or _near_tie(z2[i], a[key], b[key], tol)):
                gap = abs(float(z1[i][a[key]]) - float(z1[i][b[key]]))
                return i, f"{side} tokens differ at step {i + 1} (logit gap {gap:.3g}, a near tie is ≤ {tol:.3g})"
            if key == "token_d":
                return i, ""
        if a.get("fed") != b.get("fed") and a["token_d"] == b["token_d"]:
            return i, f"fed tokens differ at step {i + 1}"
    return len(alone), ""
