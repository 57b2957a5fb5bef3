"""Time `hierui kld`'s scoring loop (engine.kld.score): tokens scored per second, dense + one spec, on a device.

    .venv/bin/python bench/kld_speed.py [--model smollm2-135m] [--spec magnitude:0.5] [--ctx 512] [--device auto]

Uses the shipped heldout suite; magnitude pruning needs no calibration, so only the scoring is timed.
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--spec", default="magnitude:0.5")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()

    from engine import kld
    from engine.models import load
    from engine.perturb import perturb

    loaded = load(args.model, device=args.device, dtype=args.dtype)
    pair = perturb(loaded, args.spec, use_cache=False)
    text = kld.suite_text("heldout")
    kld.score(loaded, [pair], text, "heldout", ctx=args.ctx)  # warm-up
    started = time.perf_counter()
    run = kld.score(loaded, [pair], text, "heldout", ctx=args.ctx)
    took = time.perf_counter() - started
    n = len(run.positions)
    print(f"{args.model} {args.spec} ctx {args.ctx} on {loaded.device}: {run.windows} windows, {n} tokens scored")
    print(f"{took:.2f} s, {n / took:.0f} tokens/s, {took / run.windows * 1000:.0f} ms per window (dense + 1 spec)")


if __name__ == "__main__":
    main()
