"""First start of the default explorer (`make run`: hierui explore --model smollm2-135m --prune wanda:0.5):
seconds per stage on a fresh HIERUI_HOME, and the total after the model is loaded.

    .venv/bin/python bench/first_start.py [--model smollm2-135m] [--prune wanda:0.5]
        [--calib-samples N] [--repeats 1] [--generation-batches 16 32 64]

The converted models are shared ($HIERUI_MODELS, else the models folder of your $HIERUI_HOME), so the model
is neither fetched nor converted; everything else (calibration, pruned weights) starts empty in a temporary
HIERUI_HOME, as on a first `make run`. The stages are the explorer's: load → calibrate (the calibration
engine.record.settings.default_calibration gives the method, the same in every command) → prune (including
storing the pruned weights in the cache) → first step. `--generation-batches` also times sampling the same
calibration set in batches of those sizes (tokens per second). The load average before and after says whether
the machine was busy.
"""

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path


def machine() -> str:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} CPUs ({cpu})"


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def first_start(args) -> dict:
    """One first start in a fresh HIERUI_HOME: seconds per stage."""
    from engine.models.loading import load
    from engine.perturb import perturb
    from engine.perturb.calibration import build_calibration
    from engine.perturb.spec import parse_spec
    from engine.record.settings import DEFAULT_PROMPT, StepSettings, calibration_for
    from engine.run.stepper import Stepper

    spec = parse_spec(args.prune)
    stages = {}
    with tempfile.TemporaryDirectory(prefix="hierui-first-start-") as home:
        os.environ["HIERUI_HOME"] = home
        start = time.perf_counter()
        loaded = load(args.model, device=args.device)
        stages["load"] = time.perf_counter() - start

        calibration = None
        settings = calibration_for(spec.method, samples=args.calib_samples)
        if spec.needs_calibration:
            start = time.perf_counter()
            calibration = build_calibration(loaded, **settings.to_dict())
            stages["calibrate"] = time.perf_counter() - start
            calibration.seconds = stages["calibrate"]

        start = time.perf_counter()
        pair = perturb(loaded, spec, calibration=calibration)
        stages["prune"] = time.perf_counter() - start

        start = time.perf_counter()
        Stepper(pair, DEFAULT_PROMPT, StepSettings()).step()
        stages["first step"] = time.perf_counter() - start
    stages["after load"] = sum(v for k, v in stages.items() if k != "load")
    stages["_calibration"] = f"{settings.samples}×{settings.length}" if spec.needs_calibration else "none"
    return stages


def generation_batches(args, sizes: list[int]) -> None:
    import engine.perturb.calibration as C
    from engine.models.loading import load
    from engine.perturb.spec import parse_spec
    from engine.record.settings import calibration_for

    settings = calibration_for(parse_spec(args.prune).method, samples=args.calib_samples)
    loaded = load(args.model, device=args.device)
    kept = C.GENERATION_BATCH
    try:
        for size in sizes:
            C.GENERATION_BATCH = size
            start = time.perf_counter()
            C.sample_from_model(loaded.model, loaded.tokenizer, settings.samples, settings.length, settings.seed)
            took = time.perf_counter() - start
            tokens = settings.samples * (settings.length - 1)
            print(
                f"sampling {settings.samples}×{settings.length} in batches of {size:>3}: {took:6.1f} s, "
                f"{tokens / took:5.0f} tokens/s"
            )
    finally:
        C.GENERATION_BATCH = kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prune", default="wanda:0.5")
    parser.add_argument("--calib-samples", type=int, default=None, help="instead of the method's default")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--generation-batches", type=int, nargs="*", default=[])
    args = parser.parse_args()

    from engine.record.paths import models_dir

    os.environ["HIERUI_MODELS"] = str(models_dir())  # shared by the fresh homes: no fetching, no converting
    if not (models_dir() / "smollm2-135m" / "model.safetensors").is_file() and args.model == "smollm2-135m":
        print(f"note: {args.model} is not converted in {models_dir()}: the first load fetches and converts it")
    import torch

    print(f"machine: {machine()}, torch threads {torch.get_num_threads()}, load average {load_average()}")
    print(f"--model {args.model} --prune {args.prune}, with the method's default calibration")
    runs = []
    for n in range(args.repeats):
        stages = first_start(args)
        runs.append(stages)
        shown = " · ".join(f"{k} {v:.1f} s" for k, v in stages.items() if not k.startswith("_"))
        print(f"run {n + 1}: calibration {stages['_calibration']} · {shown}")
    if args.repeats > 1:
        median = {k: statistics.median(r[k] for r in runs) for k in runs[0] if not k.startswith("_")}
        print("median: " + " · ".join(f"{k} {v:.1f} s" for k, v in median.items()))
    if args.generation_batches:
        generation_batches(args, args.generation_batches)
    print(f"load average after: {load_average()}")


if __name__ == "__main__":
    main()
