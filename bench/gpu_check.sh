#!/usr/bin/env bash
# One short check of the GPU path, for a machine with a CUDA GPU (also runs end to end on a CPU):
#   bench/gpu_check.sh [cuda|cpu]
# The pair on the device in its default dtype (bfloat16 on CUDA) with tiny-random and, when it is in the
# cache, the embedded default; int8 and nf4 through bitsandbytes; a short `hierui batch`; the step overhead and
# batch throughput ratios; then scale (bench/scale_check.py): random:llama-7b (random weights, bfloat16) pruned
# with wanda:0.5 and stepped 64 tokens × 16 prompts in shared and free mode against the bandwidth floor, peak
# CUDA memory, int8/nf4 of the same model. On cpu the scale part uses random:smollm2-135m with fewer steps.
# Last, the pair over several devices against one (bench/multi_device_check.py).
# Prints figures only; never part of the tests.
#
# Environment: PYTHON (default .venv/bin/python), HIERUI (default .venv/bin/hierui where it exists, else
# "$PYTHON -m hierui"), SCALE_MODEL, SCALE_STEPS, SCALE_BATCH, SCALE_QUANT_STEPS, SCALE_CALIB (NxL) to change the
# scale part; SKIP_BASIC=1 runs the scale part alone. Needs no network: where the embedded model's tokenizer is
# not in the models folder, .gpu/models/smollm2-135m (its tokenizer files only) is used when it is there.
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE="${1:-cuda}"
PY="${PYTHON:-.venv/bin/python}"
if [ -z "${HIERUI:-}" ]; then
    if [ -x .venv/bin/hierui ]; then HIERUI=.venv/bin/hierui; else HIERUI="$PY -m hierui"; fi
fi
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
# the models folder to read (the embedded model, or only its tokenizer in .gpu/models), then a fresh HIERUI_HOME
# so that no cache of an earlier run is reused and nothing is left behind
HIERUI_MODELS="$("$PY" -c "
from pathlib import Path
from engine.models.embedded import embedded_dir
from engine.record.paths import models_dir
spare = Path('.gpu/models').resolve()
use_spare = not (embedded_dir() / 'tokenizer.json').is_file() and (spare / 'smollm2-135m' / 'tokenizer.json').is_file()
print(spare if use_spare else models_dir())")"
export HIERUI_MODELS HIERUI_HOME="$OUT/home"
if [ "$DEVICE" = cpu ]; then
    SCALE_DEFAULTS=(--model "${SCALE_MODEL:-random:smollm2-135m}" --steps "${SCALE_STEPS:-8}" --batch "${SCALE_BATCH:-4}"
        --quant-steps "${SCALE_QUANT_STEPS:-4}" --calib "${SCALE_CALIB:-8x32}")
else
    SCALE_DEFAULTS=(--model "${SCALE_MODEL:-random:llama-7b}" --steps "${SCALE_STEPS:-64}" --batch "${SCALE_BATCH:-16}"
        --quant-steps "${SCALE_QUANT_STEPS:-16}" --calib "${SCALE_CALIB:-64x128}")
fi

if [ -z "${SKIP_BASIC:-}" ]; then
"$PY" - "$DEVICE" <<'PY'
import sys, time, torch
from engine.models.embedded import embedded_dir
from engine.models.loading import load
from engine.perturb import perturb
from engine.run.stepper import Stepper, StepSettings

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
        stepper.batch.eos = set()  # every run makes its 16 steps
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
# the CLI (progress lines on stderr kept aside; a failure is reported and the check goes on)
if $HIERUI batch -m tiny-random --prompts "$OUT/prompts.txt" -p wanda:0.5 -p int8 --mode shared --mode free \
    --max-new-tokens 8 --calib-samples 8 --calib-len 32 --device "$DEVICE" --out "$OUT/batch" \
    >"$OUT/batch.out" 2>"$OUT/batch.err"; then
    grep -E '^[0-9]+ runs' "$OUT/batch.out" || tail -n 1 "$OUT/batch.out"
else
    echo "hierui batch: FAILED: $(grep -v '^[[:space:]]*$' "$OUT/batch.err" | tail -n 1)"
fi

BENCH_MODEL=tiny-random
if "$PY" -c "from engine.models.embedded import embedded_dir; import sys; sys.exit(0 if (embedded_dir() / 'model.safetensors').is_file() else 1)"; then
    BENCH_MODEL=smollm2-135m
fi
"$PY" bench/step_overhead.py --model "$BENCH_MODEL" --device "$DEVICE" --steps 32 --repeats 3 | tail -n 1
"$PY" bench/batch_throughput.py --model "$BENCH_MODEL" --device "$DEVICE" --batch 8 --tokens 32
fi

"$PY" bench/scale_check.py --device "$DEVICE" "${SCALE_DEFAULTS[@]}"

# several devices (bench/multi_device_check.py): every GPU when there are two or more, one GPU and the CPU when
# there is one, the hooked path alone on a CPU; against the same pair on one device. MULTI_MODEL, MULTI_STEPS
# change it; SKIP_MULTI=1 leaves it out.
if [ -z "${SKIP_MULTI:-}" ]; then
    if [ "$DEVICE" = cpu ]; then
        MULTI_DEFAULTS=(--model "${MULTI_MODEL:-${SCALE_MODEL:-random:smollm2-135m}}" --steps "${MULTI_STEPS:-2}"
            --batch 2 --calib "${SCALE_CALIB:-8x32}" --devices cpu)
    else
        MULTI_DEFAULTS=(--model "${MULTI_MODEL:-random:qwen2.5-0.5b}" --steps "${MULTI_STEPS:-8}" --batch 4
            --calib 16x64)
    fi
    "$PY" bench/multi_device_check.py "${MULTI_DEFAULTS[@]}"
fi
