"""The units of one level, scored from the cached dense input of their layer (engine.sensitivity.dense).

For decoder layer ℓ, every layer before it is dense, so a unit's run starts from the dense input of ℓ: the model's
own forward pass (engine.kld.window.forward: the head's inputs at the scored positions, the head applied chunk by
chunk) with layers 0 … ℓ − 1 standing in, each returning the cached input of ℓ, the unit's perturbed tensors swapped
into layer ℓ (engine.sensitivity.swap), and layers ℓ … L − 1, the final norm and whatever else the family does after
them running as they do. The embeddings still run (a lookup); no dense layer before ℓ does. Each window's dense side
(engine.kld.window.dense_side) is made once for all the units of ℓ (once for the run where it fits:
engine.sensitivity.dense.KEPT_BYTES), and each unit's per-token metrics are
engine.kld.window.pair_metrics, as `hierui kld` scores them: the numbers of `hierui kld --prune` on a model where only
that unit is perturbed (tests/test_sensitivity.py compares them token by token)."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager

from engine.errors import HieruiError

# the summary columns a row keeps (engine.kld.statistics.summarize's names)
KEPT = ("tokens", "kl_mean", "kl_mean_unc", "kl_median", "kl_p99", "kl_max", "same_top", "ppl_d", "ppl_p")
KEPT += ("ln_ppl_ratio", "ppl_ratio")


@contextmanager
def standing_in(layers, start: int, state: dict, as_tuple: bool):
    """Layers 0 … start − 1 return `state["h"]` (the cached dense input of layer `start`) instead of computing."""

    def forward(*_args, **_kwargs):
        return (state["h"],) if as_tuple else state["h"]

    saved = []
    try:
        for layer in list(layers)[:start]:
            saved.append((layer, layer.__dict__.get("forward")))  # accelerate's device hooks live there
            layer.forward = forward
        yield
    finally:
        for layer, old in saved:
            if old is None:
                del layer.forward
            else:
                layer.forward = old


def _sync(device) -> None:
    import torch

    if getattr(device, "type", None) == "cuda":
        torch.cuda.synchronize(device)


def row_of(unit, level, tokens: dict, window_of, seconds: float) -> dict:
    """A table row (engine.record.schema.SENSITIVITY) of a unit at a level from its per-token arrays."""
    from engine.kld.statistics import kl_mean_interval, summarize

    s = summarize(tokens)
    row = {
        "unit": unit.name,
        "layer": unit.layer,
        "sublayer": unit.sublayer,
        "matrix": unit.matrix,
        "level": str(level),
        "sparsity": level.target_sparsity,
        "weights": unit.weights,
    }
    row.update({k: s[k] for k in KEPT})
    row.update(kl_mean_interval(tokens["kl"], window_of))
    row["ppl_delta"] = s["ppl_p"] - s["ppl_d"]
    row["seconds"] = seconds
    return row


def measure_level(
    dense,
    perturbed,
    level,
    units: list,
    done: set,
    on_row: Callable[[dict], None],
    on_tokens: Callable | None = None,
    progress=None,
) -> None:
    """Score every unit of `units` not in `done` ({(unit name, level string)}) at `level`, whose whole perturbed
    model is `perturbed`; `on_row(row)` as each layer's units finish (in the order of `units`), `on_tokens(unit,
    tokens)` with their per-token arrays where given. `dense`: the run's DenseSide (restarted here)."""
    from engine.anatomy.linears import decoder_layers

    say = progress or (lambda *_: None)
    todo = [u for u in units if (u.name, str(level)) not in done]
    if not todo:
        return
    perturbed_layers = decoder_layers(perturbed)
    dense.restart()
    stage = f"sensitivity {level}"
    finished = len(units) - len(todo)
    say(stage, finished, len(units))
    last = max(u.layer for u in todo)
    for index in range(last + 1):
        mine = [u for u in todo if u.layer == index]
        if mine:
            for unit, tokens, seconds in _layer(dense, perturbed_layers[index], index, mine):
                if on_tokens is not None:
                    on_tokens(unit, tokens)
                on_row(row_of(unit, level, tokens, dense.run.window_of, seconds))
                finished += 1
                say(stage, finished, len(units))
        if index < last:
            dense.advance()


def _layer(dense, perturbed_layer, index: int, units: list):
    """[(unit, per-token arrays, seconds)] of the units of decoder layer `index` (dense.layer == index)."""
    import torch

    from engine.anatomy.linears import weight_views
    from engine.kld.window import chunks, forward, pair_metrics
    from engine.sensitivity.swap import swapped

    assert dense.layer == index
    layer = dense.layers[index]
    views = weight_views(layer, index)
    device = dense.ids.device
    seconds = [0.0 for _ in units]
    state: dict = {}
    # unit by unit over every window (a unit's tensors are made once: a partial 3-D experts parameter is a copy),
    # keeping each window's head inputs (m × hidden); then window by window, the dense side once for all units
    found: list[list] = []
    with standing_in(dense.layers, index, state, dense.tuple_out):
        for j, unit in enumerate(units):
            started = time.perf_counter()
            windows = []
            with swapped(layer, perturbed_layer, views, unit.views):
                for w in range(dense.windows):
                    state["h"] = dense.hidden[w]
                    window = forward(dense.model, dense.ids[w : w + 1], dense.m, dense.head)
                    if window.head is None:
                        raise HieruiError(
                            f"{unit.name}: the perturbed model's logits are not its head applied to its last hidden "
                            "state"
                        )
                    windows.append(window)
            found.append(windows)
            _sync(device)
            seconds[j] += time.perf_counter() - started
    collected: list[dict[str, list]] = [{} for _ in units]
    started = time.perf_counter()
    for w in range(dense.windows):
        targets = dense.targets[w]
        parts: list[dict[str, list]] = [{} for _ in units]
        for lo, hi in chunks(dense.m, dense.head.vocab):
            t = targets[lo:hi]
            d = dense.side(w, lo, hi)
            for j in range(len(units)):
                for name, value in pair_metrics(d, found[j][w].logits_at(lo, hi), t).items():
                    parts[j].setdefault(name, []).append(value)
        for j in range(len(units)):
            for name, values in parts[j].items():
                collected[j].setdefault(name, []).append(torch.cat(values).cpu())
    _sync(device)
    share = (time.perf_counter() - started) / len(units)  # the dense side serves them all: an equal share each
    for j in range(len(units)):
        seconds[j] += share
    out = []
    for j, unit in enumerate(units):
        tokens = {name: torch.cat(parts).numpy() for name, parts in collected[j].items()}
        out.append((unit, tokens, seconds[j]))
    return out
