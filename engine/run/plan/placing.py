"""Where the pair goes, and whether it fits: one device, several GPUs under one device_map, or streamed layers.

One device when the peak fits it; on CUDA with --gpus N > 1, one device_map shared by both models (layer ℓ of
both on one GPU; engine.place.placement.pair_device_map on the meta build, each GPU's budget less what may peak on
any of them, divided by what each byte of dense weights brings along: the perturbed copy's layers and the KV
caches), which explore / batch / prune load by; else streamed layers (engine.place.streaming): the embeddings,
norms and head resident, every decoder layer's weights on disk (memory-mapped safetensors) and brought in one
layer at a time, so the device holds the resident parts, the layer in flight and its pruned copy
(STREAMED_LAYERS), and the activations, caches and workspace. On a CPU, --gpu-mem simulates a smaller device (the
RAM budget of the run): a pair above it is streamed the same way; without it a peak above the available RAM
cannot fit.
"""

from __future__ import annotations

from engine.errors import HieruiError
from engine.run.plan.result import STAGES, DoesNotFit, Plan, stage_total
from engine.run.plan.shape import Geometry, config_object, meta_model
from engine.run.plan.units import KiB, gib

# decoder layers' weights resident at once when streamed (engine.place.streaming): pruning holds the layer in flight
# and its pruned copy; stepping one layer of one model at a time
STREAMED_LAYERS = 2


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


def place(plan: Plan, g: Geometry, dev, dt, gpu_mem: int | None, fetch: bool = False) -> None:
    """Where the pair goes, and whether it fits; HieruiError (exit 2) when it cannot fit even streamed."""
    available, total = host_memory()
    plan.host_available = available
    items = plan.items
    if dev.type != "cuda" and gpu_mem is None:
        _place_in_ram(plan, available, total)
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
    _place_streamed(plan, g, dev)


def _place_in_ram(plan: Plan, available: int, total: int) -> None:
    """A CPU without --gpu-mem: the whole pair in the RAM available, or one line saying what to do instead."""
    plan.capacity, plan.capacity_source = available, "RAM available"
    plan.placement = f"one device ({plan.device})"
    if plan.peak > available:
        smaller = "a smaller model" if plan.dtype != "float32" else "--dtype bfloat16, a smaller model"
        raise DoesNotFit(
            f"{plan.display} in {plan.dtype} with {', '.join(plan.specs)} cannot fit: predicted peak "
            f"{gib(plan.peak)} ({plan.peak_stage}) > {gib(available)} of RAM available ({gib(total)} total): "
            f"stream the layers from disk with --gpu-mem SIZE (pruning, drops, checkpoints; not quantization), "
            f"or use {smaller} or a GPU",
            plan,
        )


def _place_streamed(plan: Plan, g: Geometry, dev) -> None:
    """Streamed layers: the embeddings/head and STREAMED_LAYERS layers' weights on the device, the layers on disk;
    HieruiError when even that does not fit the device or the disk."""
    items = plan.items
    resident = g.outside_bytes + STREAMED_LAYERS * g.layer_bytes
    weights = {"dense weights"} | {i.name for i in items if i.name.startswith("perturbed")}
    device_need = max(
        resident + sum(i.nbytes for i in items if s in i.stages and i.on_device and i.name not in weights)
        for s in STAGES
    )
    # on disk: the pruned weights the perturbed model writes (a checkpoint's layers are read where they are)
    disk_need = sum(i.nbytes for i in items if i.name.startswith("perturbed"))
    free = disk_free()
    plan.streamed_device = device_need
    plan.fits, plan.implemented = False, True
    plan.placement = "streamed"
    where = "on the GPU" if dev.type == "cuda" else "in the simulated budget"
    if device_need > plan.capacity or disk_need > free:
        why = (
            f"streamed it still needs {gib(device_need)} {where} ({gib(plan.capacity)} {plan.capacity_source})"
            if device_need > plan.capacity
            else f"streaming writes {gib(disk_need)} of pruned weights to disk ({gib(free)} free)"
        )
        raise DoesNotFit(
            f"{plan.display} in {plan.dtype} with {', '.join(plan.specs)} cannot fit even streamed: predicted peak "
            f"{gib(plan.peak)} ({plan.peak_stage}); {why}: use a smaller --batch-size or --max-new-tokens, fewer "
            f"--calib-samples, a smaller model or more GPUs",
            plan,
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
    config = config_object(plan.model, fetch)
    model = meta_model(plan.model, config, dt)
    try:
        device_map = pair_device_map(model, dt, budgets, max(1.0, overhead))
    except HieruiError:
        return False
    used = sorted(set(device_map.values()))
    per_gpu = {k: 0 for k in used}
    sizes = bytes_by_entry(model, device_map)
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


def bytes_by_entry(model, names) -> dict[str, int]:
    """Bytes of the tensors under each module of `names` (a device_map's keys; tied tensors counted once)."""
    seen: set[int] = set()
    sizes: dict[str, int] = {}
    for name in names:
        module = model.get_submodule(name) if name else model
        tensors = [t for t in list(module.parameters()) + list(module.buffers()) if id(t) not in seen]
        seen |= {id(t) for t in tensors}
        sizes[name] = sum(t.numel() * t.element_size() for t in tensors)
    return sizes


def disk_free() -> int:
    """Free bytes where streamed models write their layers (engine.place.streaming: the temporary folder)."""
    import shutil
    import tempfile

    try:
        return int(shutil.disk_usage(tempfile.gettempdir()).free)
    except OSError:  # pragma: no cover
        return 2**62
