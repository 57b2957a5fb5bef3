"""Cost of `hierui sensitivity` against one dense forward over the same windows of the corpus.

    .venv/bin/python bench/sensitivity_cost.py [--model smollm2-135m] [--spec magnitude:0.5] [--unit layer]
        [--ctx 512] [--device auto] [--dtype float32] [--text FILE]

Prints, on the heldout suite (or --text), in this process:
  dense        one dense forward per window (the model's own logits of the scored half): the unit of cost
  dense side   engine.sensitivity.dense.DenseSide: the dense head inputs, layer 0's inputs and (where they fit) the
               dense log-probabilities, once per run
  perturb      the whole model perturbed once (the level; magnitude needs no calibration), not counted below
  units        every unit scored from the cached dense input of its layer (engine.sensitivity.measure)
  total        dense side + units, as a multiple of dense, and per unit
and the floor the design aims at: a unit of layer ℓ costs the forward from ℓ to the head, (L − ℓ)/L of a dense
forward in its decoder layers, so the units of a model cost Σ (L − ℓ)/L dense forwards, plus one per level to step
the dense layers' inputs along and the dense side once. On top of that floor each unit pays a fixed cost that does not
shrink with ℓ: its own head at the scored positions and its metrics (a log-softmax over the vocabulary), which the
per-layer lines show as the last layer's figure minus 1/L (a `hierui kld` pair pays the same)."""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--spec", default="magnitude:0.5")
    ap.add_argument("--unit", default="layer", choices=("layer", "sublayer", "matrix"))
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--text", type=Path, help="a text file (default: the shipped heldout suite)")
    args = ap.parse_args()

    import torch

    from engine.kld import corpus as kld
    from engine.kld.window import window_logits
    from engine.models.loading import load
    from engine.perturb import perturb
    from engine.perturb.spec import parse_spec
    from engine.sensitivity import folder
    from engine.sensitivity.dense import DenseSide
    from engine.sensitivity.measure import measure_level
    from engine.sensitivity.units import units as units_of

    loaded = load(args.model, device=args.device, dtype=args.dtype)
    text = args.text.read_text(encoding="utf-8") if args.text else kld.suite_text("heldout")
    run = kld.frame(loaded.tokenizer, text, "bench", args.model, args.ctx, None)
    m = run.positions.size // run.windows
    windows = []
    for start in run.starts:
        window = list(run.ids[start : start + args.ctx])
        if run.bos is not None:
            window[0] = run.bos
        windows.append(torch.tensor([window], device=loaded.device))

    def sync():
        if loaded.device.type == "cuda":
            torch.cuda.synchronize()

    def dense():
        for x in windows:
            window_logits(loaded.model, x, m + 1, hidden=False)
        sync()

    def timed(fn):
        """(wall seconds, CPU seconds of this process, fn's value): on a shared machine the CPU time is what a quiet
        one would take, near enough (the wall time also waits for the other processes)."""
        wall, cpu = time.perf_counter(), time.process_time()
        value = fn()
        sync()
        return time.perf_counter() - wall, time.process_time() - cpu, value

    dense()  # warm-up
    runs = [timed(dense)[:2] for _ in range(3)]
    one = statistics.median(w for w, _c in runs)
    one_cpu = statistics.median(c for _w, c in runs)

    spec = parse_spec(args.spec)
    perturbing, _cpu, pair = timed(lambda: perturb(loaded, spec, use_cache=False))
    side_wall, side_cpu, side = timed(lambda: DenseSide(loaded, run))
    units = units_of(loaded.model, args.unit)
    rows: list[dict] = []
    unit_wall, unit_cpu, _ = timed(lambda: measure_level(side, pair.perturbed, spec, units, set(), rows.append))
    layers = len(side.layers)
    floor = sum((layers - u.layer) / layers for u in units) + 1.0  # + the dense inputs stepped along once

    def both(wall: float, cpu: float) -> str:
        return f"wall {wall:7.2f} s = {wall / one:6.2f} × dense, CPU {cpu:7.2f} s = {cpu / one_cpu:6.2f} × dense"

    print(f"{args.model} {spec} --unit {args.unit} ctx {args.ctx} on {loaded.device} ({loaded.model.dtype}):")
    print(f"  {run.windows} windows, {run.positions.size} tokens scored, {len(units)} units over {layers} layers")
    print(f"  dense forward over the corpus: wall {one:.3f} s, CPU {one_cpu:.3f} s (median of 3)")
    print(f"  perturbing the whole model once: {perturbing:.2f} s (not counted below)")
    print(f"  dense side once : {both(side_wall, side_cpu)}")
    print(f"  units           : {both(unit_wall, unit_cpu)}")
    print(f"  per unit        : {both(unit_wall / len(units), unit_cpu / len(units))}")
    print(f"  total           : {both(side_wall + unit_wall, side_cpu + unit_cpu)}")
    print(f"  the floor Σ (L − ℓ)/L + 1 = {floor:.2f} × dense; the whole model perturbed per unit instead would take")
    print(f"  {len(units)} units × (its perturbed forward + the dense one) = {2 * len(units)} × dense")
    by_layer: dict[int, list[float]] = {}
    for row in rows:
        by_layer.setdefault(row["layer"], []).append(row["seconds"])
    print("  per unit, by layer (its wall seconds ÷ the dense forward's; the floor (L − ℓ)/L):")
    for layer, seconds in sorted(by_layer.items()):
        mean = statistics.mean(seconds) / one
        print(f"    layer {layer:3d}: {mean:.3f} × dense  (floor {(layers - layer) / layers:.3f})")
    with tempfile.TemporaryDirectory() as tmp:  # the table as the command writes it
        folder.write_tables(tmp, rows)


if __name__ == "__main__":
    main()
