"""Cost of `hierui kld` against one dense forward over the same windows, with and without a base file.

    .venv/bin/python bench/kld_speed.py [--model smollm2-135m] [--spec magnitude:0.5] [--ctx 512] [--repeats 3]

On the shipped heldout suite, timed in this process (interleaved, median of --repeats):
  dense      one dense forward per window (logits of the scored half only): the unit
  pair       engine.kld.corpus.score with the dense model and one spec (two forwards, the hidden-state cosines)
  base       engine.kld.corpus.score against an exact base file (the perturbed forward and the dense head)
  base-k64   the same against a top-64 base file
and the goals of issue 14: pair ≤ 2.2 × dense, base ≤ 1.2 × dense. Then peak memory (VmHWM of a fresh process
each; ru_maxrss would also count this process, which it forks from): dense + spec scored together, and the
spec's saved model alone against the exact base file (`hierui prune --save DIR`, then
`hierui kld --model DIR --base FILE`).
Magnitude pruning needs no calibration, so only the scoring is timed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MEMORY = r"""
import json, sys
from engine.kld import corpus as kld
from engine.kld.base import BaseFile
from engine.models.loading import load
from engine.perturb import perturb
model, spec, ctx, base = sys.argv[1:5]
loaded = load(model, device="cpu", dtype="float32")
pair = perturb(loaded, spec, use_cache=False)
text = kld.suite_text("heldout")
kld.score(loaded, [pair], text, "heldout", ctx=int(ctx), base=BaseFile(base) if base != "-" else None)
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))  # this process's own peak
print(json.dumps({"peak_mib": int(hwm.split()[1]) / 1024}))
"""


def _time(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--spec", default="magnitude:0.5")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import torch

    from engine.kld import corpus as kld
    from engine.kld.base import BaseFile, BaseWriter
    from engine.models.loading import load
    from engine.perturb import perturb

    loaded = load(args.model, device=args.device, dtype=args.dtype)
    pair = perturb(loaded, args.spec, use_cache=False)
    text = kld.suite_text("heldout")
    ids, lay, bos = kld.prepare(loaded.tokenizer, text, args.ctx, None, None)
    m = lay.scored
    windows = []
    for start in lay.starts:
        window = list(ids[start : start + args.ctx])
        if bos is not None:
            window[0] = bos
        windows.append(torch.tensor([window], device=loaded.device))

    def dense():
        for x in windows:
            kld.window_logits(loaded.model, x, m + 1, hidden=False)

    tmp = Path(tempfile.mkdtemp())
    bases = {}
    for name, k in (("base", None), ("base-k64", 64)):
        writer = BaseWriter(tmp / f"{name}.st", k)
        kld.score(loaded, [], text, "heldout", ctx=args.ctx, save_base=writer)
        writer.write(loaded.tokenizer, text, lay, args.model)
        bases[name] = writer.path
    cases = {
        "dense": dense,
        "pair": lambda: kld.score(loaded, [pair], text, "heldout", ctx=args.ctx),
        **{
            name: (lambda p=path: kld.score(loaded, [pair], text, "heldout", ctx=args.ctx, base=BaseFile(p)))
            for name, path in bases.items()
        },
    }
    for fn in cases.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.repeats):
        for name, fn in cases.items():
            times[name].append(_time(fn))
    n = len(lay.starts) * m
    unit = statistics.median(times["dense"])
    print(f"{args.model} {args.spec} ctx {args.ctx} on {loaded.device}: {len(windows)} windows, {n} tokens scored")
    goals = {"pair": 2.2, "base": 1.2}
    for name, values in times.items():
        t = statistics.median(values)
        goal = f"  (goal ≤ {goals[name]}×)" if name in goals else ""
        print(f"{name:9s} {t:6.2f} s  {n / t:7.0f} tokens/s  {t / unit:5.2f} × dense{goal}")
    for name, path in bases.items():
        print(f"{name} file: {path.stat().st_size / 2**20:.1f} MiB")

    saved = tmp / "perturbed"  # what `hierui prune --save DIR` writes
    pair.perturbed.save_pretrained(saved)
    loaded.tokenizer.save_pretrained(saved)
    peaks = {}
    for name, model, spec, base in (("pair", args.model, args.spec, "-"), ("base", str(saved), "none", bases["base"])):
        out = subprocess.run(
            [sys.executable, "-c", MEMORY, model, spec, str(args.ctx), str(base)], capture_output=True, text=True
        )
        if out.returncode:
            sys.exit(out.stderr.strip().splitlines()[-1])
        peaks[name] = json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]
    print(f"peak RSS, dense + {args.spec} scored together: {peaks['pair']:.0f} MiB")
    print(f"peak RSS, the saved {args.spec} model alone against the exact base file: {peaks['base']:.0f} MiB")


if __name__ == "__main__":
    main()
