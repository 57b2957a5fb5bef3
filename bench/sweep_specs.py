"""A sweep of several specs against the same specs run one at a time: how much the dense side computed once saves.

    .venv/bin/python bench/sweep_specs.py [--model random:smollm2-135m] [--prompts 8] [--tokens 16] [--repeats 2]

For each lens setting (the default, and --no-lens), `--repeats` times in one run, the order rotated each time:
  A   one `hierui batch --prune S1 … --prune S4` (the dense model runs once per chunk of prompts and mode:
      engine.run.trajectory);
  B   the same four specs as four separate `hierui batch --prune Si` commands (each loads the model and runs the
      dense side itself);
  A0  (`--old`) the command of A with the dense side recomputed for every spec, as before engine.run.trajectory
      (the store patched to keep nothing, in that subprocess only).
Same prompts, greedy, shared mode. Prints the wall times and the ratios B ÷ A (goal ≥ 1.5×) and A0 ÷ A, and checks
that A's sessions equal B's (every metric of every step, to 1e-5). HIERUI_HOME is a temporary folder unless set;
HIERUI_MODELS is the user's (the embedded model converted once). On a shared machine OMP_NUM_THREADS=1 steadies the
figures (the subprocesses inherit it).
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from batch_throughput import PROMPTS  # bench/ is on the path when a bench script runs

SPECS = ["magnitude:0.3", "magnitude:0.5", "magnitude:0.7", "int8"]


# `hierui batch` with the dense trajectories never kept: every spec runs the dense model (the path before them)
OLD = (
    "import sys; from engine.run import trajectory; trajectory.DenseStore.take = lambda self, key: None; "
    "from hierui.cli import main; sys.argv[0] = 'hierui'; sys.exit(main())"
)


def batch(args, prompts: Path, specs: list[str], out: Path, lens: list[str], old: bool = False, tokens=None) -> float:
    """Wall seconds of one `hierui batch` command (`old`: with the dense side recomputed for every spec)."""
    hierui = [sys.executable, "-c", OLD] if old else [str(Path(sys.executable).parent / "hierui")]
    command = [*hierui, "batch", "--prompts", str(prompts), "--model", args.model]
    command += [x for s in specs for x in ("--prune", s)]
    command += ["--out", str(out), "--max-new-tokens", str(tokens or args.tokens), "--device", args.device, *lens]
    command += ["--batch-size", str(args.batch_size)]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    took = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return took


def steps(folder: Path) -> dict[str, list[dict]]:
    """Every session of an output folder: run id → its step records."""
    runs = {}
    for path in sorted((folder / "sessions").glob("*.jsonl")):
        lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        runs[path.stem] = [x for x in lines if isinstance(x, dict) and "step" in x and "kl" in x]
    return runs


def close(a, b, tol: float = 1e-5) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k], tol) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(close(x, y, tol) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= tol * max(1.0, abs(a), abs(b))
    return a == b


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="random:smollm2-135m")
    parser.add_argument("--specs", nargs="+", default=SPECS)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--lens", nargs="+", default=["default", "off"], choices=["default", "off"])
    parser.add_argument("--old", action="store_true", help="also time A0, the sweep without the dense side once")
    parser.add_argument("--json", type=Path, help="also write the figures to this file (bench/speed_goals.py reads it)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="hierui-bench-sweep-"))
    os.environ.setdefault("HIERUI_HOME", str(work / "home"))
    prompts = work / "prompts.txt"
    prompts.write_text("\n".join((PROMPTS * (args.prompts // len(PROMPTS) + 1))[: args.prompts]) + "\n")
    print(
        f"{args.model}, {len(args.specs)} specs ({' '.join(args.specs)}), {args.prompts} prompts × {args.tokens} "
        f"tokens, batch size {args.batch_size}, load average {os.getloadavg()[0]:.2f}"
    )
    # the model converted and every spec's pruned weights in the cache: no variant pays the pruning for the others
    batch(args, prompts, args.specs, work / "warm", [], tokens=1)
    figures: dict[str, dict] = {}
    for lens in args.lens:
        flags = [] if lens == "default" else ["--no-lens"]
        ratios, olds = [], []
        kinds = ["A", "B"] + (["A0"] if args.old else [])
        for i in range(args.repeats):
            a_out, b_out = work / f"a-{lens}-{i}", work / f"b-{lens}-{i}"
            order = kinds[i % len(kinds) :] + kinds[: i % len(kinds)]  # rotate which goes first
            took = {}
            for which in order:
                if which == "A":
                    took["A"] = batch(args, prompts, args.specs, a_out, flags)
                elif which == "A0":
                    took["A0"] = batch(args, prompts, args.specs, work / f"a0-{lens}-{i}", flags, old=True)
                else:
                    took["B"] = sum(batch(args, prompts, [s], b_out / str(n), flags) for n, s in enumerate(args.specs))
            ratios.append(took["B"] / took["A"])
            old = ""
            if "A0" in took:
                olds.append(took["A0"] / took["A"])
                old = f" · sweep recomputing the dense side {took['A0']:6.1f} s ({olds[-1]:.2f}×)"
            print(
                f"  lens {lens:7} #{i + 1}: sweep {took['A']:6.1f} s · one at a time {took['B']:6.1f} s "
                f"({ratios[-1]:.2f}×){old}  (load {os.getloadavg()[0]:.2f})",
                flush=True,
            )
            a_runs = steps(a_out)
            b_runs = {k: v for n in range(len(args.specs)) for k, v in steps(b_out / str(n)).items()}
            same = a_runs.keys() == b_runs.keys() and all(close(a_runs[k], b_runs[k]) for k in a_runs)
            print(f"  the sweep's sessions {'equal' if same else 'DIFFER FROM'} the runs one at a time (1e-5)")
            figures.setdefault(lens, {"equal": True})["equal"] &= same
        figures[lens]["speedup"] = statistics.median(ratios)
        print(
            f"lens {lens}: {len(args.specs)}-spec sweep vs one at a time: median {statistics.median(ratios):.2f}× "
            "(goal ≥ 1.5×)" + (f"; vs recomputing the dense side: {statistics.median(olds):.2f}×" if olds else ""),
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
    main()
