"""`hierui plan`'s predicted peak against the measured one, for random-weight shapes of three sizes.

    .venv/bin/python bench/plan_accuracy.py [--models random:smollm2-135m random:qwen2.5-0.5b ...]
        [--specs wanda:0.5 magnitude:0.5] [--calib 4x64] [--steps 8] [--device cpu] [--dtype auto]
        [--skip random:qwen2.5-1.5b=sparsegpt:0.5]

Each case runs in a fresh process: load the model, build the pair as `hierui prune` / `explore` do
(engine.perturb.perturb with a self-generated calibration of --calib, nothing cached), step it --steps tokens
(engine.run.stepper.Stepper, the logit lens on), then report its peak: on a CPU the peak resident set size
(VmHWM of /proc/self/status: every page the process ever had resident at once, file-backed ones included), on a
GPU torch.cuda.max_memory_allocated. The prediction is engine.run.plan.estimate with the same model, spec, dtype,
device, calibration, batch size 1 and token count, made before anything is loaded. Aim: within ±15%.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CASE = """
import json, sys, time
import torch
from engine.models.loading import load
from engine.perturb import perturb
from engine.run.stepper import Stepper, StepSettings

model, spec, device, dtype, samples, length, steps = sys.argv[1:8]
started = time.perf_counter()
loaded = load(model, device=device, dtype=dtype)
pair = perturb(loaded, spec, use_cache=False, calib_options={"samples": int(samples), "length": int(length)})
Stepper(pair, "Tell me about the moon.", StepSettings(max_new_tokens=int(steps))).run()
if loaded.device.type == "cuda":
    peak = torch.cuda.max_memory_allocated(loaded.device)
else:
    status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
    peak = int(status["VmHWM"].split()[0]) * 1024
print(json.dumps({"peak": peak, "seconds": time.perf_counter() - started}))
"""


def measure(model: str, spec: str, device: str, dtype: str, calib: tuple[int, int], steps: int) -> dict:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_DISABLE_PROGRESS_BARS="1")
    args = [model, spec, device, dtype, str(calib[0]), str(calib[1]), str(steps)]
    out = subprocess.run(
        [sys.executable, "-c", CASE, *args], capture_output=True, text=True, cwd=str(ROOT), env=env, check=False
    )
    if out.returncode != 0:
        tail = (out.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": tail}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", nargs="+", default=["random:smollm2-135m", "random:qwen2.5-0.5b", "random:qwen2.5-1.5b"]
    )
    parser.add_argument("--specs", nargs="+", default=["wanda:0.5", "magnitude:0.5", "sparsegpt:0.5", "nf4"])
    parser.add_argument("--skip", nargs="*", default=[], help="MODEL=SPEC cases not run (too slow here)")
    parser.add_argument("--calib", default="4x64", help="self-generated calibration: SAMPLESxLENGTH")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()
    samples, length = (int(x) for x in args.calib.lower().split("x"))
    os.environ.setdefault("HIERUI_HOME", tempfile.mkdtemp(prefix="hierui-plan-bench-"))

    from engine.run.plan import GiB, estimate

    print(
        f"plan accuracy: {args.device}, dtype {args.dtype}, calibration {samples}×{length} self-generated, "
        f"{args.steps} steps, batch 1"
    )
    print(f"{'model':<22} {'spec':<14} {'dtype':<9} {'predicted':>10} {'measured':>10} {'error':>8}  stage  time")
    errors = []
    for model in args.models:
        for spec in args.specs:
            if f"{model}={spec}" in args.skip:
                print(f"{model:<22} {spec:<14} skipped (--skip)")
                continue
            plan = estimate(
                model,
                [spec],
                device=args.device,
                dtype=args.dtype,
                batch_size=1,
                max_new_tokens=args.steps,
                calib=(samples, length),
            )
            got = measure(model, spec, args.device, args.dtype, (samples, length), args.steps)
            if "error" in got:
                print(f"{model:<22} {spec:<14} {plan.dtype:<9} {plan.peak / GiB:>9.2f}G {'failed':>10}  {got['error']}")
                continue
            error = (plan.peak - got["peak"]) / got["peak"]
            errors.append(abs(error))
            print(
                f"{model:<22} {spec:<14} {plan.dtype:<9} {plan.peak / GiB:>9.2f}G {got['peak'] / GiB:>9.2f}G "
                f"{error:>+8.1%}  {plan.peak_stage:<6} {got['seconds']:.0f} s",
                flush=True,
            )
    if errors:
        within = sum(e <= 0.15 for e in errors)
        print(f"{within} of {len(errors)} cases within ±15%; largest error {max(errors):.1%}")


if __name__ == "__main__":
    main()
