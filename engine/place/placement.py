"""A pair on several devices: one device_map for the dense model and its perturbed copy.

Layer ℓ of the dense model and layer ℓ of its perturbed copy always sit on the same device. The map is made
once, for the dense model, by accelerate's `infer_auto_device_map` on the model's meta-device build (so
decoder layers are never split, tied tensors stay together, and any family works), with each GPU's budget
cut down so that what the perturbed copy adds there (its new weight matrices, its KV cache) fits beside the
dense layers: the copy is made by engine.perturb.pair.clone_sharing, which shares the placement (and accelerate's
hooks) along with every tensor the perturbation does not change, and a perturbation writes each new tensor
on the device of the one it replaces. `check_same_placement` makes sure of it after perturbing.

Moving data between devices is left to the model: accelerate's hooks move a layer's inputs onto its device
once per device boundary. What hierui adds per step (the last position's hidden state of every layer, for
the metrics and the lens) goes to the head's device in one copy per device (`gather`), not one per layer.
"""

from __future__ import annotations

import logging

import torch

from engine.errors import HieruiError


def dispatch(model, device_map: dict, main_device=None):
    """Place `model` by `device_map` ({module name: device}) with accelerate's hooks, which move every module's
    inputs to its device (and the model's outputs back to the first device). Hooks are attached even where the
    map names one device, so the hooked path is the same on one CPU as on several GPUs. `main_device`: where
    modules mapped to "cpu" run ("cpu": on the CPU, not offloaded; a GPU + CPU map then runs on both)."""
    from accelerate import dispatch_model

    quiet = logging.getLogger("accelerate.big_modeling")  # "on the meta device because offloaded to the cpu":
    level = quiet.level  # said of any map naming "cpu", though nothing is offloaded with main_device "cpu"
    quiet.setLevel(logging.ERROR)
    try:
        return dispatch_model(model, device_map=dict(device_map), main_device=main_device, force_hooks=True)
    finally:
        quiet.setLevel(level)


def layer_devices(model) -> list[torch.device]:
    """The device each decoder layer of `model` runs on (a streamed layer: its execution device)."""
    from engine.anatomy.linears import decoder_layers
    from engine.place.streaming import layer_device

    return [layer_device(layer) for layer in decoder_layers(model)]


def mismatched_layers(dense, perturbed) -> list[tuple[int, str, str]]:
    """(ℓ, dense device, perturbed device) of every decoder layer the two models hold on different devices."""
    d, p = layer_devices(dense), layer_devices(perturbed)
    return [(i, str(a), str(b)) for i, (a, b) in enumerate(zip(d, p)) if a != b]


def check_same_placement(dense, perturbed) -> None:
    """Raise when a layer of the perturbed copy is not on its dense counterpart's device (a bug: the metrics of
    layer ℓ would move one model's hidden states to the other's device at every step)."""
    from engine.anatomy.linears import decoder_layers

    try:
        if len(decoder_layers(dense)) != len(decoder_layers(perturbed)):  # a checkpoint of another depth
            return
    except ValueError:  # an architecture whose layers hierui cannot find: nothing to compare
        return
    wrong = mismatched_layers(dense, perturbed)
    if wrong:
        listed = ", ".join(f"layer {i}: dense {a}, perturbed {b}" for i, a, b in wrong[:4])
        raise RuntimeError(f"the perturbed copy is not placed like the dense model ({listed})")


def device_runs(devices: list) -> list[tuple[object, int, int]]:
    """(device, start, end) of each run of consecutive equal devices: [a, a, b, b, b] → [(a, 0, 2), (b, 2, 5)]."""
    runs: list[tuple[object, int, int]] = []
    for i, device in enumerate(devices):
        if runs and runs[-1][0] == device:
            runs[-1] = (device, runs[-1][1], i + 1)
        else:
            runs.append((device, i, i + 1))
    return runs


def gather(tensors: list[torch.Tensor], device, dim: int = 1) -> torch.Tensor:
    """torch.stack(tensors, dim) on `device`, the tensors living on several devices: stacked where they are,
    run by run, then one copy per run to `device` (a layer's hidden state per device, not one per layer)."""
    parts = [
        torch.stack(tensors[start:end], dim=dim).to(device)
        for _device, start, end in device_runs([t.device for t in tensors])
    ]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


# ---------------------------------------------------------------- the map, before loading


def pair_device_map(model, dtype, budgets: dict[int, int], overhead: float) -> dict[str, int]:
    """The device_map of the dense model `model` (a meta-device build, engine.run.plan) over the GPUs of `budgets`
    ({GPU index: bytes the pair may use there}), where every byte of dense weights costs `overhead` ≥ 1 bytes
    (what the perturbed copy and the KV caches add in proportion). GPUs are filled in order, so the pair spans
    as few devices as it can: each boundary is a copy of the hidden states at every forward pass.

    HieruiError when the weights do not fit the GPUs (the plan then streams them)."""
    from accelerate import infer_auto_device_map

    if overhead < 1:
        raise ValueError("overhead is at least 1 (the dense weights themselves)")
    memory = {index: max(0, int(budget / overhead)) for index, budget in budgets.items()}
    quiet = logging.getLogger("accelerate.utils.modeling")  # "Device 1 is not available": a plan made ahead
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        device_map = infer_auto_device_map(
            model,
            max_memory={**memory, "cpu": 0, "disk": 0},
            no_split_module_classes=list(getattr(model, "_no_split_modules", None) or []),
            dtype=dtype,
        )
    finally:
        quiet.setLevel(level)
    off = sorted(name for name, device in device_map.items() if not isinstance(device, int))
    if off:
        raise HieruiError(f"the pair does not fit {len(budgets)} GPU(s): {off[0]} would not be on one")
    return {name: int(device) for name, device in device_map.items()}


def describe(device_map: dict, layers_prefix: str) -> str:
    """'cuda:0: embed_tokens, layers 0–13 · cuda:1: layers 14–31, norm, lm_head' for a map of module names."""
    return " · ".join(f"{_device_name(d)}: {text}" for d, text in modules_by_device(device_map, layers_prefix).items())


def modules_by_device(device_map: dict, layers_prefix: str) -> dict:
    """{device: 'embed_tokens, layers 0–13'}: what a map of module names puts on each device, in map order."""
    by_device: dict[object, list[str]] = {}
    for name, device in device_map.items():
        by_device.setdefault(device, []).append(name)
    out = {}
    for device, names in by_device.items():
        layers = sorted(int(n[len(layers_prefix) :].split(".")[0]) for n in names if n.startswith(layers_prefix))
        words = [n.rsplit(".", 1)[-1] or n for n in names if not n.startswith(layers_prefix)]
        if layers:
            words.append(f"layer {layers[0]}" if len(layers) == 1 else f"layers {layers[0]}–{layers[-1]}")
        out[device] = ", ".join(words)
    return out


def _device_name(device) -> str:
    return f"cuda:{device}" if isinstance(device, int) else str(device)
