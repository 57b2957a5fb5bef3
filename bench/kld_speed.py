"""Cost of `hierui kld` against one dense forward over the same windows, with and without a base file, and its peak
memory by context length.

    .venv/bin/python bench/kld_speed.py [--model smollm2-135m] [--spec magnitude:0.5] [--ctx 512] [--repeats 3]
        [--long-ctx 512 2048 8192] [--no-timing] [--no-long]

On the shipped heldout suite, timed in this process (interleaved, median of --repeats):
  dense      one dense forward per window (the model's own logits of the scored half): the unit
  pair       engine.kld.corpus.score with the dense model and one spec (two forwards, the hidden-state cosines)
  base       engine.kld.corpus.score against an exact base file (the perturbed forward and the dense head)
  base-k64   the same against a top-64 base file
and the goals of issue 26: pair ≤ 2.2 × dense, base ≤ 1.2 × dense. Then peak memory (VmHWM of a fresh process
each; ru_maxrss would also count this process, which it forks from): dense + spec scored together, and the
spec's saved model alone against the exact base file (`hierui prune --save DIR`, then
`hierui kld --model DIR --base FILE`). Then long contexts: `hierui kld --prune SPEC --text T --ctx N` for each
--long-ctx N, each in a fresh process (its own peak RSS, os.wait4's ru_maxrss), T the heldout suite repeated to at
least 16,384 tokens; goal of issue 26: the peak at the largest N within 1.5× of the peak at the smallest.
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


LONG_TOKENS = 16_384  # the long-context text: the heldout suite repeated to at least this many tokens


def _time(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process): on a shared machine the CPU time is what a quiet one would
    take, near enough (the wall time waits for the other processes)."""
    started, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - started, time.process_time() - cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--spec", default="magnitude:0.5")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--long-ctx", type=int, nargs="+", default=[512, 2048, 8192])
    ap.add_argument("--no-timing", action="store_true", help="skip the timing and the ctx-512 peaks")
    ap.add_argument("--no-long", action="store_true", help="skip the long-context peaks")
    ap.add_argument("--json", type=Path, help="also write the figures to this file (bench/speed_goals.py reads it)")
    args = ap.parse_args()
    figures: dict[str, dict] = {}
    if not args.no_timing:
        figures["ratio_to_dense"] = timing(args)
    if not args.no_long:
        figures["peak_mib_by_ctx"] = long_contexts(args)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1) + "\n")


def timing(args) -> dict[str, float]:
    """Prints the figures; returns each case's wall-clock time ÷ the dense forward's."""
    import torch

    from engine.kld import corpus as kld
    from engine.kld.base import BaseFile, BaseWriter
    from engine.kld.window import window_logits
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
            window_logits(loaded.model, x, m + 1, hidden=False)

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
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
    before = _load()
    for _ in range(args.repeats):
        for name, fn in cases.items():
            times[name].append(_time(fn))
    n = len(lay.starts) * m
    wall = {name: statistics.median(t[0] for t in values) for name, values in times.items()}
    cpu = {name: statistics.median(t[1] for t in values) for name, values in times.items()}
    print(f"{args.model} {args.spec} ctx {args.ctx} on {loaded.device}: {len(windows)} windows, {n} tokens scored")
    print(f"load average before the timing: {before}, after: {_load()}; median of {args.repeats}, interleaved")
    goals = {"pair": 2.2, "base": 1.2}
    for name in times:
        goal = f"  (goal ≤ {goals[name]}×)" if name in goals else ""
        print(
            f"{name:9s} wall {wall[name]:6.2f} s = {wall[name] / wall['dense']:5.2f} × dense, "
            f"CPU {cpu[name]:6.2f} s = {cpu[name] / cpu['dense']:5.2f} × dense{goal}  ({n / wall[name]:.0f} tokens/s)"
        )
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
    return {name: wall[name] / wall["dense"] for name in times}


def long_contexts(args) -> dict[int, float]:
    """Peak RSS of `hierui kld` at each --long-ctx on the heldout suite repeated to LONG_TOKENS tokens, each in a
    fresh process."""
    import os

    from engine.kld import corpus as kld
    from engine.models.loading import load_tokenizer

    suite = kld.suite_text("heldout")
    tokenizer = load_tokenizer(args.model)
    text = suite
    while len(kld.tokenize(tokenizer, text)) < LONG_TOKENS:
        text += "\n\n" + suite
    tokens = len(kld.tokenize(tokenizer, text))
    tmp = Path(tempfile.mkdtemp())
    (tmp / "long.txt").write_text(text, encoding="utf-8")
    peaks = {}
    for ctx in args.long_ctx:
        command = [sys.executable, "-m", "hierui", "kld", "--model", args.model, "--prune", args.spec]
        command += ["--text", str(tmp / "long.txt"), "--ctx", str(ctx), "--out", str(tmp / f"out-{ctx}")]
        command += ["--device", args.device, "--dtype", args.dtype]
        started = time.perf_counter()
        with open(tmp / f"log-{ctx}.txt", "w") as log:
            child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
            _pid, status, usage = os.wait4(child.pid, 0)  # this child's own peak, not this process's
        if os.waitstatus_to_exitcode(status):
            sys.exit(f"hierui kld --ctx {ctx} failed: {(tmp / f'log-{ctx}.txt').read_text()[-2000:]}")
        peaks[ctx] = usage.ru_maxrss / 1024  # KiB on Linux
        print(f"hierui kld --ctx {ctx:5d}: peak RSS {peaks[ctx]:7.0f} MiB, {time.perf_counter() - started:6.1f} s")
    low, high = min(peaks), max(peaks)
    print(
        f"{tokens} tokens ({args.model}, {args.spec}): peak at ctx {high} = {peaks[high] / peaks[low]:.2f} × the "
        f"peak at ctx {low} (goal ≤ 1.5×)"
    )
    return peaks


def _load() -> str:
    import os

    return " ".join(f"{x:.2f}" for x in os.getloadavg())


if __name__ == "__main__":
    main()
