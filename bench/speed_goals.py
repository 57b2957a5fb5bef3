"""Every speed goal of the sweep, explorer, kld and pruning paths (issue 26), measured in one run.

    .venv/bin/python bench/speed_goals.py [--model smollm2-135m] [--quick] [--only NAME ...] [--keep DIR]

Runs, one after the other and each in its own process so that none pays for another's memory:
  step_overhead     the stepper per lens mode ÷ two bare KV-cached forwards (and the lens alone)
  lens_behind       the explorer's stepping loop with the lens worker beside it ÷ two bare forwards
  batch_throughput  tokens/s at B=1 and B=8 per lens mode (sampled, all, off)
  sweep_specs       a 4-spec `hierui batch` against the four specs as separate commands
  kld_speed         `hierui kld` ÷ one dense forward (pair, exact base file) and its peak RSS at ctx 512…8,192
  prune_time        Wanda and SparseGPT ÷ one dense forward over the calibration tokens
showing each one's own output, then a table of every goal with the figure measured and whether it is met. Each
script reads its figures back through its --json option. --quick runs fewer repeats and steps (a check that
everything runs, not figures to quote). Takes about 15 minutes on 2 quiet cores; the ratios only mean something
on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# (script, its arguments, the arguments --quick uses instead)
RUNS = {
    "step_overhead": (["--steps", "32", "--repeats", "3"], ["--steps", "8", "--repeats", "1"]),
    "lens_behind": (["--steps", "32", "--repeats", "5"], ["--steps", "8", "--repeats", "1"]),
    "batch_throughput": (["--batch", "8", "--tokens", "32"], ["--batch", "8", "--tokens", "4"]),
    "sweep_specs": (["--repeats", "1"], ["--repeats", "1", "--prompts", "2", "--tokens", "2", "--lens", "default"]),
    "kld_speed": (["--repeats", "3"], ["--repeats", "1", "--long-ctx", "512", "1024"]),
    "prune_time": (["--repeats", "3"], ["--repeats", "1", "--calib-samples", "4"]),
}
SWEEP_MODEL = "random:smollm2-135m"  # sweep_specs runs the CLI on a random model: no calibration to wait for

# (figure, what it is, "≤" or "≥", goal); goal None: shown for information
GOALS = [
    ("explorer_behind", "explorer step, lens worker beside it ÷ two bare forwards", "≤", 1.35),
    ("explorer_later", "explorer stepping, lens left for later ÷ two bare forwards", "≤", 1.10),
    ("stepper_sampled", "batch stepping, lens sampled ÷ two bare forwards", "≤", None),
    ("batch_default_speedup", "batch, default lens: tokens/s B=8 ÷ B=1", "≥", 3.0),
    ("batch_default_vs_off", "batch, default lens ÷ lens off: tokens/s at B=8", "≥", 0.8),
    ("batch_off_speedup", "batch, lens off: tokens/s B=8 ÷ B=1", "≥", None),
    ("sweep_default", "4-spec sweep's speed-up over one spec at a time, default lens", "≥", 1.5),
    ("sweep_off", "4-spec sweep's speed-up over one spec at a time, lens off", "≥", 1.5),
    ("sweep_equal", "4-spec sweep's sessions equal one at a time's (1 = yes)", "≥", 1.0),
    ("kld_pair", "kld, dense + spec ÷ one dense forward", "≤", 2.2),
    ("kld_base", "kld against an exact base file ÷ one dense forward", "≤", 1.2),
    ("kld_peak_growth", "kld peak RSS at the longest ctx ÷ at the shortest", "≤", 1.5),
    ("wanda", "Wanda pruning ÷ one dense forward over the calibration", "≤", 1.5),
    ("sparsegpt", "SparseGPT pruning ÷ one dense forward over the calibration", "≤", 3.0),
]


def named_figures(by_script: dict[str, dict]) -> dict[str, float]:
    """The figures of GOALS out of each script's --json output (a figure whose script did not run is absent)."""
    out: dict[str, float] = {}
    if lens := by_script.get("lens_behind"):
        out["explorer_behind"] = lens["ratio_to_bare"]["behind"]
        out["explorer_later"] = lens["ratio_to_bare"]["later"]
    if step := by_script.get("step_overhead"):
        out["stepper_sampled"] = step["ratio_to_bare"]["sampled"]
    if batch := by_script.get("batch_throughput"):
        single, batched = batch["single_tokens_s"], batch["batched_tokens_s"]
        if "sampled" in batched:
            out["batch_default_speedup"] = batched["sampled"] / single["sampled"]
        if "off" in batched:
            out["batch_off_speedup"] = batched["off"] / single["off"]
            if "sampled" in batched:
                out["batch_default_vs_off"] = batched["sampled"] / batched["off"]
    if sweep := by_script.get("sweep_specs"):
        for lens, row in sweep.items():
            out[f"sweep_{lens}"] = row["speedup"]
        out["sweep_equal"] = float(all(row["equal"] for row in sweep.values()))
    if kld := by_script.get("kld_speed"):
        out.update({f"kld_{k}": v for k, v in kld.get("ratio_to_dense", {}).items() if k in ("pair", "base")})
        peaks = {int(k): v for k, v in kld.get("peak_mib_by_ctx", {}).items()}
        if peaks:
            out["kld_peak_growth"] = peaks[max(peaks)] / peaks[min(peaks)]
    for row in (by_script.get("prune_time") or {}).values():
        out[row["method"]] = row["judged"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="model of every script but sweep_specs")
    parser.add_argument("--quick", action="store_true", help="fewer repeats and steps: a check that all runs")
    parser.add_argument("--only", nargs="+", choices=list(RUNS), help="run only these scripts")
    parser.add_argument("--keep", type=Path, help="keep each script's output and figures in this folder")
    args = parser.parse_args()
    folder = args.keep or Path(tempfile.mkdtemp(prefix="hierui-speed-goals-"))
    folder.mkdir(parents=True, exist_ok=True)
    print(
        f"{platform.node()}: {os.cpu_count()} CPUs, {platform.machine()}, Python {platform.python_version()}, "
        f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
        flush=True,
    )
    figures: dict[str, dict] = {}
    failed = []
    for script in args.only or RUNS:
        full, quick = RUNS[script]
        model = SWEEP_MODEL if script == "sweep_specs" else args.model
        out = folder / f"{script}.json"
        command = [sys.executable, str(HERE / f"{script}.py"), "--model", model, *(quick if args.quick else full)]
        command += ["--json", str(out)]
        print(f"\n=== {script}: {' '.join(command[1:])}", flush=True)
        started = time.perf_counter()
        if subprocess.run(command).returncode or not out.exists():
            failed.append(script)
            print(f"=== {script} FAILED", flush=True)
            continue
        figures[script] = json.loads(out.read_text())
        print(f"=== {script}: {time.perf_counter() - started:.0f} s", flush=True)
    print(f"\nissue 26's goals (load average now {' '.join(f'{x:.2f}' for x in os.getloadavg())}):")
    measured = named_figures(figures)
    for name, what, way, goal in GOALS:
        if name not in measured:
            continue
        value = measured[name]
        if goal is None:
            print(f"  {what:66} {value:6.2f}")
            continue
        met = value <= goal if way == "≤" else value >= goal
        print(f"  {what:66} {value:6.2f}  goal {way} {goal:<4g} {'met' if met else 'NOT met'}")
    if failed:
        sys.exit(f"failed: {' '.join(failed)}")


if __name__ == "__main__":
    main()
