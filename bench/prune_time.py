"""Pruning cost on the embedded default, as ratios to one dense forward pass over the same calibration tokens.

    .venv/bin/python bench/prune_time.py [--model smollm2-135m] [--specs wanda:0.5 sparsegpt:0.5] [--repeats 3]
                                         [--threads N] [--calib-samples N]

Each spec is pruned with its method's default calibration (engine.record.settings: Wanda 32 × 128, SparseGPT
64 × 128 self-generated tokens), built (or loaded from the cache) first and not counted, and with the pruned-weight
cache off; `--calib-samples N` gives every spec N sequences instead (issue 26's figures before this work, 1.62× and
3.28×, were taken with 64 for both). Every repeat measures, for each spec in turn, one dense forward over that
calibration (in the batches pruning runs them in) right before pruning, and prints the ratio; the summary is the
median ratio per spec against its goal. The floor is two passes over the decoder layers (the layer-by-layer forward
that captures the inputs, and the forward of the pruned layer that feeds the next one), less the LM head, which
pruning never runs: the script prints the dense forward's split (decoder layers / the rest) so the floor can be
read off.

Two ratios per run: of wall-clock seconds, and of the process's CPU seconds. On a quiet machine they agree; on a
busy one the wall-clock ratio moves with the load (the load average is printed), and with several threads the
CPU seconds count threads spinning in wait; `--threads 1` makes the CPU-seconds ratio a steady measure of the work.
"""

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from engine.models.loading import load
from engine.perturb import perturb
from engine.perturb.calibration import build_calibration
from engine.perturb.spec import parse_spec
from engine.record.settings import calibration_for

GOALS = {"wanda": 1.5, "sparsegpt": 3.0}  # issue 26: times one dense forward over the calibration tokens
BATCH = 8  # calibration sequences per forward, as engine.perturb.layerwise runs them


def dense_forward_seconds(model, ids, batch_size=BATCH) -> tuple[float, float]:
    """(wall-clock, CPU) seconds of one dense forward over `ids`, in batches of `batch_size` sequences."""
    start, cpu = time.perf_counter(), time.process_time()
    with torch.no_grad():
        for i in range(0, ids.shape[0], batch_size):
            model(input_ids=ids[i : i + batch_size], use_cache=False)
    return time.perf_counter() - start, time.process_time() - cpu


def decoder_share(model, ids, batch_size=BATCH) -> float:
    """The fraction of a dense forward spent in the decoder layers (the rest: embeddings, final norm, LM head)."""
    from engine.anatomy.linears import decoder_layers

    spent = [0.0]
    started = {}

    def before(module, _args):
        started[id(module)] = time.perf_counter()

    def after(module, _args, _out):
        spent[0] += time.perf_counter() - started.pop(id(module))

    hooks = []
    for layer in decoder_layers(model):
        hooks += [layer.register_forward_pre_hook(before), layer.register_forward_hook(after)]
    try:
        total = dense_forward_seconds(model, ids, batch_size)[0]
    finally:
        for h in hooks:
            h.remove()
    return spent[0] / total


class PruningClock:
    """Wall-clock and CPU seconds of the pruning itself, read off perturb's progress calls: from ("pruning", 0, n)
    to ("pruning", n, n), the layer loop (the sharing clone before it and the count of zeros after are left out)."""

    def __init__(self):
        self.start: tuple[float, float] | None = None
        self.wall = self.cpu = 0.0

    def __call__(self, stage, done, total) -> None:
        if stage != "pruning":
            return
        now = time.perf_counter(), time.process_time()
        if done == 0:
            self.start = now
        elif done == total and self.start is not None:
            self.wall, self.cpu = now[0] - self.start[0], now[1] - self.start[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--specs", nargs="+", default=["wanda:0.5", "sparsegpt:0.5"])
    parser.add_argument("--repeats", type=int, default=3, help="runs of every spec, alternated (default 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--calib-samples", type=int, default=None, help="calibration sequences for every spec")
    parser.add_argument("--json", type=Path, help="also write the figures to this file (bench/speed_goals.py reads it)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load(args.model)
    specs = [parse_spec(s) for s in args.specs]
    calibs = {}
    for spec in specs:
        opts = calibration_for(spec.method, samples=args.calib_samples).to_dict()
        calibs[str(spec)] = build_calibration(loaded, **opts)
    model = loaded.model
    dense_forward_seconds(model, next(iter(calibs.values())).ids[:1])  # warm-up
    share = decoder_share(model, next(iter(calibs.values())).ids)
    print(
        f"{args.model} ({loaded.dtype}, {torch.get_num_threads()} threads): the decoder layers take {share:.0%} "
        f"of a dense forward, so two passes over them cost {2 * share:.2f}× one"
    )
    ratios: dict[str, list[tuple[float, float]]] = {str(s): [] for s in specs}
    for repeat in range(args.repeats):
        for spec in specs if repeat % 2 == 0 else specs[::-1]:
            calib = calibs[str(spec)]
            base, base_cpu = dense_forward_seconds(model, calib.ids)
            clock = PruningClock()
            pair = perturb(loaded, spec, calibration=calib, use_cache=False, progress=clock)
            secs, secs_cpu = clock.wall, clock.cpu
            ratios[str(spec)].append((secs / base, secs_cpu / base_cpu))
            print(
                f"  {str(spec):>14} on {calib.samples}×{calib.length}: wall {secs:7.2f} s / dense {base:6.2f} s "
                f"= {secs / base:5.2f}×, CPU {secs_cpu:7.2f} s / {base_cpu:6.2f} s = {secs_cpu / base_cpu:5.2f}×  "
                f"(sparsity {pair.report.measured_sparsity:.4f}, load {os.getloadavg()[0]:.1f})",
                flush=True,
            )
            del pair
    judged = "CPU seconds" if args.threads == 1 else "wall-clock"  # see the module's docstring
    print(f"median over the repeats (wall-clock / CPU seconds; the goals judged on {judged}):")
    figures = {}
    for spec in specs:
        wall = statistics.median(r[0] for r in ratios[str(spec)])
        cpu = statistics.median(r[1] for r in ratios[str(spec)])
        goal = GOALS.get(spec.method)
        ratio = cpu if args.threads == 1 else wall
        verdict = "" if goal is None else f"  goal ≤ {goal}×: {'met' if ratio <= goal else 'NOT met'}"
        print(f"  {str(spec):>14}: {wall:5.2f}× / {cpu:5.2f}× one dense forward{verdict}")
        figures[str(spec)] = {"method": spec.method, "judged": ratio, "wall": wall, "cpu": cpu}
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
    main()
