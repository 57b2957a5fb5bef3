"""How costs grow with model size: pruning time, step time and peak memory of a pair, over random shapes.

    .venv/bin/python bench/scaling.py [--models random:smollm2-135m random:qwen2.5-0.5b random:qwen2.5-1.5b]
        [--specs magnitude:0.5 wanda:0.5 sparsegpt:0.5] [--skip random:qwen2.5-1.5b=sparsegpt:0.5]
        [--calib 4x64] [--steps 16] [--device cpu] [--dtype auto] [--threads N] [--json out.json]
        [--bandwidth-tbps 4.8] [--expect random:llama-7b ...]

Each case (model × spec) runs in a fresh process (this script with --case), as bench/plan_accuracy.py does:

1. load the model (engine.models.loading.load; a `random:` shape is built in place, engine.models.random_shapes)
   and time it;
2. the dense model alone, as bench/memory.py measures it: stepped --steps tokens against itself (one model's
   weights), then its peak (on a CPU VmHWM of /proc/self/status, on a GPU torch.cuda.max_memory_allocated);
3. prune (engine.perturb.perturb, nothing cached) with --calib random token ids (bench/scale_check.py's
   random_calibration: random weights make any text as good as any other) and time it; seconds per million
   parameters of the pruned matrices (every decoder WeightView, engine.run.plan's Geometry.changed);
4. step the pair --steps tokens, batch 1, shared mode, end of sequence off (engine.run.stepper.Stepper, after a
   4-step warm-up) with the logit lens on and off, and two bare KV-cached forwards (dense and perturbed) over
   the same tokens (bench/step_overhead.py's time_stepper and time_bare): ms per step and the ratios;
5. the pair's peak (the whole process: load, prune and step), against the dense peak and against
   `hierui plan`'s prediction (engine.run.plan.estimate with the same model, spec, dtype, device, calibration
   (random tokens: no self-generation), batch 1 and --steps tokens).

Then, for each shape, the expected step time of the pair on a GPU from the memory-bandwidth limit: a decode step
reads each model's weights once, so ≈ 2 × the bytes one step reads of one model (every parameter once, the
input embedding table only where it is also the head) in bfloat16 ÷ --bandwidth-tbps (default the H200's
datasheet 4.8 TB/s), also for the --expect shapes (default random:llama-7b; built on the meta device, not
measured; `--specs` with no spec prints only this). A floor, not a prediction: the GPU check measured 11–17×
it (README, GPU section).
Timing and memory only: the text of random weights means nothing. Compare ratios, not absolute times (the
machines here are shared and noisy); the machine and its load average are printed at the top.
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

ROOT = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
for _p in (str(ROOT), str(BENCH)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

CPU_MODELS = ["random:smollm2-135m", "random:qwen2.5-0.5b", "random:qwen2.5-1.5b"]
GPU_MODELS = [*CPU_MODELS, "random:llama-7b"]
SPECS = ["magnitude:0.5", "wanda:0.5", "sparsegpt:0.5"]
WARMUP_STEPS = 4
MiB = 2**20


# ---------------------------------------------------------------- one case, in its own process


def _peak(device) -> int:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
    return int(status["VmHWM"].split()[0]) * 1024


def run_case(case: dict) -> dict:
    """Load, measure the dense model alone, prune, step: what the module docstring lists, as a dict."""
    import torch
    from scale_check import random_calibration, sync
    from step_overhead import time_bare, time_stepper

    from engine.models.loading import load
    from engine.perturb import perturb
    from engine.perturb.pair import ModelPair
    from engine.perturb.spec import parse_spec

    steps = int(case["steps"])
    if case.get("threads"):
        torch.set_num_threads(int(case["threads"]))
    started = time.perf_counter()
    loaded = load(case["model"], device=case["device"], dtype=case["dtype"])
    device = loaded.device
    sync(device)
    out: dict = {"load_s": time.perf_counter() - started, "dtype": str(loaded.dtype).removeprefix("torch.")}
    out["threads"] = torch.get_num_threads()

    # the dense model alone, as bench/memory.py measures it: stepped against itself (one model's weights, two
    # KV caches, the metrics and the lens), the same stepping the pair gets below
    alone = ModelPair(loaded.model, loaded.model, loaded.tokenizer, parse_spec("none"), loaded=loaded)
    time_stepper(alone, steps)
    out["dense_peak"] = _peak(device)
    del alone

    spec = parse_spec(case["spec"])
    calib = None
    if spec.needs_calibration:
        calib = random_calibration(loaded.model.config.vocab_size, case["calib"][0], case["calib"][1])
    started = time.perf_counter()
    pair = perturb(loaded, spec, calibration=calib, use_cache=False)
    sync(device)
    out["perturb_s"] = time.perf_counter() - started  # with the clone and the sparsity count
    out["prune_s"] = pair.report.seconds
    out["sparsity"] = pair.report.measured_sparsity

    time_stepper(pair, WARMUP_STEPS)  # warm both paths up
    time_stepper(pair, WARMUP_STEPS, lens=False)
    t_on, fed, prompt_ids, _ = time_stepper(pair, steps)
    t_off, _, _, _ = time_stepper(pair, steps, lens=False)
    t_bare = time_bare(pair, prompt_ids.to(device), fed)
    out.update(step_ms=t_on / steps * 1000, step_off_ms=t_off / steps * 1000, bare_ms=t_bare / steps * 1000)
    out["pair_peak"] = _peak(device)
    return out


def measure(case: dict) -> dict:
    """run_case in a fresh process; {"error": last line of its stderr} where it fails."""
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_DISABLE_PROGRESS_BARS="1")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--case", json.dumps(case)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=str(ROOT), env=env, check=False)
    if out.returncode != 0:
        tail = (out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[-1]
        return {"error": tail}
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- the machine, the shapes


def machine() -> str:
    """'AMD EPYC 7B13 · 2 cores · torch 2.11.0 · load average 0.41 0.85 1.20' (and the GPU on CUDA)."""
    import torch

    cpu = platform.processor() or "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    parts = [cpu, f"{cores} cores", f"torch {torch.__version__}"]
    if torch.cuda.is_available():
        parts.append(f"GPU {torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})")
    return " · ".join(parts)


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def bytes_read_per_step(name: str, dtype) -> int:
    """What one decode step reads of one model `name` in `dtype`: every parameter and buffer once, except the
    input embedding table (only the fed tokens' rows) unless it is also the head. Built on the meta device (no
    weights); the same count as bench/scale_check.py's, by tensor identity since meta tensors have no address."""
    import torch
    from transformers import AutoModelForCausalLM

    from engine.run.plan.shape import config_object

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config_object(name), dtype=dtype)
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is embed
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen or (t is embed and not tied):
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total


# ---------------------------------------------------------------- the table


def row(model: str, spec: str, params: int, pruned: int, got: dict, plan) -> str:
    head = f"{model.removeprefix('random:'):<14} {params / 1e6:>6.0f} {spec:<14}"
    if "error" in got:
        return f"{head} failed: {got['error']}"
    per_m = got["prune_s"] / (pruned / 1e6) if pruned else float("nan")
    predicted = plan.peak if plan is not None else None
    error = f"{(predicted - got['pair_peak']) / got['pair_peak']:>+7.1%}" if predicted else f"{'-':>7}"
    plan_text = f"{predicted / MiB:>8.0f}" if predicted else f"{'-':>8}"
    return (
        f"{head} {got['load_s']:>6.1f} {got['prune_s']:>8.1f} {per_m * 1000:>8.1f} "
        f"{got['step_ms']:>8.1f} {got['step_off_ms']:>8.1f} {got['bare_ms']:>8.1f} "
        f"{got['step_ms'] / got['bare_ms']:>5.2f} {got['step_off_ms'] / got['bare_ms']:>5.2f} "
        f"{got['dense_peak'] / MiB:>7.0f} {got['pair_peak'] / MiB:>7.0f} {got['pair_peak'] / got['dense_peak']:>5.2f} "
        f"{plan_text} {error}"
    )


HEADER = (
    f"{'model':<14} {'params':>6} {'spec':<14} {'load':>6} {'prune':>8} {'ms/Mpar':>8} "
    f"{'step':>8} {'no lens':>8} {'bare':>8} {'ratio':>5} {'nolen':>5} "
    f"{'dense':>7} {'pair':>7} {'×':>5} {'plan':>8} {'error':>7}"
)
UNITS = (
    f"{'':<14} {'M':>6} {'':<14} {'s':>6} {'s':>8} {'':>8} "
    f"{'ms':>8} {'ms':>8} {'ms':>8} {'':>5} {'':>5} "
    f"{'MiB':>7} {'MiB':>7} {'':>5} {'MiB':>8} {'':>7}"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", help=f"default {' '.join(CPU_MODELS)} (on CUDA also random:llama-7b)")
    parser.add_argument("--specs", nargs="*", default=SPECS, help="none: only the GPU expectation")
    parser.add_argument(
        "--expect",
        nargs="*",
        default=["random:llama-7b"],
        help="more shapes for the GPU expectation only (not measured); default random:llama-7b",
    )
    parser.add_argument("--skip", nargs="*", default=[], help="MODEL=SPEC cases not run (too slow here)")
    parser.add_argument("--calib", default="4x64", help="random calibration token ids: SAMPLESxLENGTH")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto", help="auto: float32 on a CPU, bfloat16 on CUDA")
    parser.add_argument("--bandwidth-tbps", type=float, default=4.8, help="GPU memory bandwidth (H200: 4.8)")
    parser.add_argument("--threads", type=int, help="torch threads in each case (default: torch's own)")
    parser.add_argument("--json", type=Path, help="also write every case's figures to this file")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: one case, in this (fresh) process
    args = parser.parse_args()
    os.environ.setdefault("HIERUI_HOME", tempfile.mkdtemp(prefix="hierui-scaling-bench-"))
    if args.case:
        print(json.dumps(run_case(json.loads(args.case))), flush=True)
        return

    import torch

    from engine.models.devices import pick_device, pick_dtype
    from engine.run.plan import estimate, geometry

    samples, length = (int(x) for x in args.calib.lower().split("x"))
    dev = pick_device(args.device)
    dt = pick_dtype(args.dtype, dev)
    models = args.models or (GPU_MODELS if dev.type == "cuda" else CPU_MODELS)
    peak_kind = "max_memory_allocated" if dev.type == "cuda" else "VmHWM (peak RSS)"
    print(f"machine: {machine()}")
    print(f"load average at the start: {load_average()}")
    print(
        f"scaling: {dev.type}, {str(dt).removeprefix('torch.')}, calibration {samples}×{length} random token ids, "
        f"{args.steps} steps × batch 1 (shared mode, after a {WARMUP_STEPS}-step warm-up), peak = {peak_kind}"
    )
    print(
        "prune: seconds pruning (report.seconds); ms/Mpar: ms per million parameters of the pruned matrices; "
        "step / no lens / bare: ms per step of the stepper with the logit lens, without it, and of two bare "
        "KV-cached forwards; ratio, nolen: step ÷ bare, no lens ÷ bare; dense: the dense model's peak alone; "
        "pair: the whole run's peak; ×: pair ÷ dense; plan: hierui plan's predicted peak; error: (plan − pair) ÷ pair"
    )
    print(HEADER)
    print(UNITS.rstrip(), flush=True)
    results = []
    shapes: dict[str, dict] = {}
    for model in models:
        g = geometry(model, dt)
        shapes[model] = {"params": g.params, "pruned_params": g.changed, "hidden": g.hidden, "layers": g.layers}
        for spec in args.specs:
            if f"{model}={spec}" in args.skip:
                print(f"{model.removeprefix('random:'):<14} {g.params / 1e6:>6.0f} {spec:<14} skipped (--skip)")
                continue
            plan = estimate(
                model,
                [spec],
                device=args.device,
                dtype=args.dtype,
                batch_size=1,
                max_new_tokens=args.steps,
                calib=(samples, length),
                self_calibration=False,
                geom=g,
            )
            case = {
                "model": model,
                "spec": spec,
                "device": args.device,
                "dtype": args.dtype,
                "calib": [samples, length],
                "steps": args.steps,
                "threads": args.threads,
            }
            started = time.perf_counter()
            got = measure(case)
            got["wall_s"] = time.perf_counter() - started
            got["load_average_after"] = load_average()
            print(row(model, spec, g.params, g.changed, got, plan), flush=True)
            results.append({**case, **shapes[model], "plan_peak": plan.peak if plan else None, **got})
            if args.json:
                args.json.write_text(json.dumps({"machine": machine(), "cases": results}, indent=1) + "\n")
    print(f"load average at the end: {load_average()}")

    bandwidth = args.bandwidth_tbps * 1e12
    print(
        f"expected on a GPU from the bandwidth limit (a decode step of the pair reads both models' weights once): "
        f"2 × bytes one step reads of one model in bfloat16 ÷ {args.bandwidth_tbps:g} TB/s"
    )
    for model in [*models, *(m for m in args.expect if m not in models)]:
        if model not in shapes:
            shapes[model] = {"params": geometry(model, torch.bfloat16).params, "measured": False}
        read = bytes_read_per_step(model, torch.bfloat16)
        shapes[model]["bf16_bytes_per_step"] = read
        print(
            f"  {model.removeprefix('random:'):<14} {shapes[model]['params'] / 1e6:>6.0f} M parameters · "
            f"{read / 2**30:6.2f} GiB read per model · ≥ {2 * read / bandwidth * 1000:.3f} ms per step of the pair"
        )
    if args.json:
        summary = {"machine": machine(), "bandwidth_tbps": args.bandwidth_tbps, "shapes": shapes, "cases": results}
        args.json.write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
