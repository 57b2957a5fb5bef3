#!/usr/bin/env bash
# One short check of the GPU path, for a machine with a CUDA GPU (also runs with --device cpu):
#   bench/gpu_check.sh [cuda|cpu]
# The pair on the device in its default dtype (bfloat16 on CUDA) with tiny-random and, when it is in the
# cache, the embedded default; int8 and nf4 through bitsandbytes; a short `hierui batch`; then the step
# overhead and batch throughput ratios. Prints figures only; never part of the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE="${1:-cuda}"
PY="${PYTHON:-.venv/bin/python}"
HIERUI="${HIERUI:-.venv/bin/hierui}"
OUT="$(mktemp -d)"
export TOKENIZERS_PARALLELISM=false

"$PY" - "$DEVICE" <<'PY'
import sys, time, torch
from engine.embedded import embedded_dir
from engine.models import load
from engine.perturb import perturb
from engine.stepper import Stepper, StepSettings

device = sys.argv[1]
print(f"torch {torch.__version__} · cuda available: {torch.cuda.is_available()}"
      + (f" · {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""))
models = ["tiny-random"] + (["smollm2-135m"] if (embedded_dir() / "model.safetensors").is_file() else [])
for name in models:
    loaded = load(name, device=device)
    for spec in ("wanda:0.5", "int8", "nf4", "attndrop:2"):
        started = time.perf_counter()
        try:
            pair = perturb(loaded, spec, calib_options={"samples": 16, "length": 64})
        except Exception as e:  # report and go on: this is a check, not a test
            print(f"{name:>13} {spec:>10}: FAILED {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            continue
        built = time.perf_counter() - started
        stepper = Stepper(pair, "Tell me about the moon.", StepSettings(max_new_tokens=16))
        stepper._eos = set()
        stepper.step()  # prefill + first step
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        records = stepper.run()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        per_step = (time.perf_counter() - t0) / max(len(records) - 1, 1)
        mem = f" · peak GPU {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB" if device.startswith("cuda") else ""
        print(f"{name:>13} {spec:>10}: {str(loaded.dtype).removeprefix('torch.')} on {loaded.device} · "
              f"built in {built:.1f} s · {per_step * 1000:.1f} ms/step · final KL {records[-1]['kl']:.4f}{mem}")
PY

printf '%s\n' "What is the capital of France?" "Write a haiku about the sea." "Why is the sky blue?" > "$OUT/prompts.txt"
"$HIERUI" batch -m tiny-random --prompts "$OUT/prompts.txt" -p wanda:0.5 -p int8 --mode shared --mode free \
    --max-new-tokens 8 --calib-samples 8 --calib-len 32 --device "$DEVICE" --out "$OUT/batch" | tail -n 3

BENCH_MODEL=tiny-random
if "$PY" -c "from engine.embedded import embedded_dir; import sys; sys.exit(0 if (embedded_dir() / 'model.safetensors').is_file() else 1)"; then
    BENCH_MODEL=smollm2-135m
fi
"$PY" bench/step_overhead.py --model "$BENCH_MODEL" --device "$DEVICE" --steps 32 --repeats 3 | tail -n 1
"$PY" bench/batch_throughput.py --model "$BENCH_MODEL" --device "$DEVICE" --batch 8 --tokens 32
rm -rf "$OUT"
