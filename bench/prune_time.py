"""Pruning cost on the embedded default, as ratios to one dense forward pass over the same calibration tokens.

    .venv/bin/python bench/prune_time.py [--model smollm2-135m] [--specs wanda:0.5 sparsegpt:0.5]

The default calibration (64 × 128 self-generated tokens) is built (or loaded from the cache) first and
not counted. Each spec is pruned with the pruned-weight cache off.
"""

import argparse
import time

import torch

from engine.models.loading import load
from engine.perturb import perturb
from engine.perturb.calibration import build_calibration


def dense_forward_seconds(model, ids, batch_size=8) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, ids.shape[0], batch_size):
            model(input_ids=ids[i : i + batch_size], use_cache=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--specs", nargs="+", default=["wanda:0.5", "sparsegpt:0.5"])
    args = parser.parse_args()
    loaded = load(args.model)
    calib = build_calibration(loaded)
    base = dense_forward_seconds(loaded.model, calib.ids)
    print(f"{args.model}: calibration {calib.samples}×{calib.length} tokens, dense forward {base:.2f} s")
    for spec in args.specs:
        pair = perturb(loaded, spec, calibration=calib, use_cache=False)
        secs = pair.report.seconds
        print(
            f"{spec:>14}: {secs:7.2f} s = {secs / base:5.2f}× one dense forward "
            f"(measured sparsity {pair.report.measured_sparsity:.4f})"
        )


if __name__ == "__main__":
    main()
