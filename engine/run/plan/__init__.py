"""`hierui plan`: the predicted peak memory of a pair, where it will be placed, and whether it fits, before loading.

Everything is read from the model's config alone (engine.run.plan.shape: the model built on torch's `meta`
device). The estimate counts what each stage of a run holds (engine.run.plan.counting); the peak is the largest
of the stages (load, calibrate, prune, step). On CUDA the figures are device memory as torch allocates it
(torch.cuda.max_memory_allocated: the CUDA context and the host process are not in it); on a CPU, the process's
resident memory. Then the pair is placed: one device, several GPUs under one device_map, or its decoder layers
streamed from disk (engine.run.plan.placing). The answer is a Plan (engine.run.plan.result).

This module is the package's face: estimate, the plan a run makes and records, and what every other module
imports of the plan.
"""

from __future__ import annotations

from engine.errors import HieruiError
from engine.run.plan.counting import Workload, count_items
from engine.run.plan.placing import place
from engine.run.plan.result import STAGES, DoesNotFit, Item, Plan, stage_total
from engine.run.plan.shape import Geometry, geometry
from engine.run.plan.units import GiB, MiB, gib, parse_size

__all__ = [
    "PROMPT_TOKENS",
    "STAGES",
    "DoesNotFit",
    "GiB",
    "Geometry",
    "Item",
    "MiB",
    "Plan",
    "estimate",
    "forget",
    "geometry",
    "gib",
    "last_figure",
    "parse_size",
    "plan_for_run",
    "planned_device_map",
    "plans_streaming",
    "remember",
    "stage_total",
    "visible_gpus",
]

# the prompt's length in tokens when it is not known (the default prompt in its chat template is ~30 tokens)
PROMPT_TOKENS = 64


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
    lens: str = "all",
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
    from engine.models.devices import pick_device, pick_dtype
    from engine.models.names import resolve
    from engine.perturb.spec import parse_spec, unperturbed

    parsed = [parse_spec(s) if isinstance(s, str) else s for s in specs] or [unperturbed()]
    ref = resolve(model)
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    check_gpus(dev, gpus, gpu_mem)
    g = geom or geometry(model, dt, fetch)
    if g is None:
        return None
    samples, length = calib or (0, 0)
    work = Workload(batch_size, max_new_tokens, prompt_tokens, samples, length, self_calibration, lens, perplexity)
    items = count_items(parsed, g, dt, dev.type == "cpu", work)
    calibrates = any(s.needs_calibration for s in parsed)
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
    place(plan, g, dev, dt, gpu_mem, fetch)
    return plan


def check_gpus(dev, gpus: int, gpu_mem: int | None) -> None:
    """--gpus and --gpu-mem against the device: one line for what cannot be."""
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
    lens: str = "all",
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
