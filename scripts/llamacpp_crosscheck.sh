#!/usr/bin/env bash
# hierui's corpus KLD checked against llama.cpp itself (issue 28): one side-by-side table.
#
#   scripts/llamacpp_crosscheck.sh            # from the repository root; .venv must hold hierui
#
# Builds llama-perplexity and llama-quantize, converts the embedded SmolLM2-135M with llama.cpp's own
# convert_hf_to_gguf.py to F32 (F16 if refused), quantizes it to Q8_0 and Q4_K_M, then scores both quants
# on the heldout suite (ctx 128) four ways: llama.cpp and hierui, each against its own base file and
# against the other's. Everything is cached under $HIERUI_LLAMACPP (default ~/.cache/hierui-llamacpp);
# a step whose output is there is skipped (FRESH=1 redoes the scoring).
#
# Environment:
#   HIERUI_LLAMACPP  cache folder
#   LLAMACPP_SRC     a llama.cpp source tree to use (default: llama-cpp-python==$LLAMACPP_PY's sdist, pip-downloaded)
#   LLAMACPP_BUILD   a cmake build folder to reuse (default: $HIERUI_LLAMACPP/build)
#   THREADS          llama.cpp's -t (default 2)
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
HIERUI=${HIERUI:-$ROOT/.venv/bin/hierui}
C=${HIERUI_LLAMACPP:-$HOME/.cache/hierui-llamacpp}
LLAMACPP_PY=${LLAMACPP_PY:-0.3.36}
THREADS=${THREADS:-2}
CTX=128
W=$C/work
mkdir -p "$C" "$W"
say() { printf '== %s\n' "$*" >&2; }
die() { printf 'llamacpp_crosscheck: %s\n' "$*" >&2; exit 1; }

# 1. sources and build ---------------------------------------------------------------------------------
if [[ -n ${LLAMACPP_SRC:-} ]]; then
  SRC=$LLAMACPP_SRC
else
  SRC=$C/src/llama_cpp_python-$LLAMACPP_PY/vendor/llama.cpp
  if [[ ! -f $SRC/CMakeLists.txt ]]; then
    say "downloading llama-cpp-python==$LLAMACPP_PY's sdist (llama.cpp's sources)"
    mkdir -p "$C/src"
    "$PY" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$LLAMACPP_PY" -d "$C/src" \
      || die "pip download llama-cpp-python==$LLAMACPP_PY failed"
    tar -xzf "$C/src/llama_cpp_python-$LLAMACPP_PY.tar.gz" -C "$C/src"
  fi
fi
[[ -f $SRC/CMakeLists.txt && -f $SRC/convert_hf_to_gguf.py ]] || die "$SRC is not a llama.cpp source tree"

BUILD=${LLAMACPP_BUILD:-$C/build}
if [[ ! -f $BUILD/CMakeCache.txt ]]; then
  say "configuring llama.cpp in $BUILD"
  cmake -S "$SRC" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
    -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_OPENSSL=OFF > "$C/cmake-configure.log" 2>&1 \
    || die "cmake configure failed: see $C/cmake-configure.log"
fi
say "building llama-perplexity and llama-quantize (log: $C/cmake-build.log)"
nice -n 10 cmake --build "$BUILD" --config Release -j "$(nproc)" --target llama-perplexity llama-quantize \
  > "$C/cmake-build.log" 2>&1 || die "build failed: see $C/cmake-build.log"
BIN=$BUILD/bin
[[ -x $BIN/llama-perplexity && -x $BIN/llama-quantize ]] || die "no llama-perplexity/llama-quantize in $BIN"

# 2. the embedded model, converted by llama.cpp's own converter ---------------------------------------
HF=$(cd "$ROOT" && "$PY" -c 'from engine.models.embedded import ensure_embedded; print(ensure_embedded())' | tail -n 1) \
  || die "hierui could not provide the embedded model's folder (engine.models.embedded.ensure_embedded)"
[[ -f $HF/config.json && -f $HF/model.safetensors ]] || die "$HF has no config.json + model.safetensors"
# convert_hf_to_gguf.py imports sentencepiece before it notices there is no tokenizer.model
if ! "$PY" -c 'import sentencepiece' 2>/dev/null; then
  if ! PYTHONPATH=$C/pydeps "$PY" -c 'import sentencepiece' 2>/dev/null; then
    say "installing sentencepiece (convert_hf_to_gguf.py imports it) into $C/pydeps"
    "$PY" -m pip install -q --target "$C/pydeps" sentencepiece > "$C/pip-sentencepiece.log" 2>&1 \
      || die "convert_hf_to_gguf.py needs sentencepiece and pip could not install it: see $C/pip-sentencepiece.log"
  fi
fi
export PYTHONPATH=$C/pydeps${PYTHONPATH:+:$PYTHONPATH}

DENSE=$C/smollm2-135m-f32.gguf
if [[ ! -f $DENSE && ! -f $C/smollm2-135m-f16.gguf ]]; then
  say "converting $HF to F32 with $SRC/convert_hf_to_gguf.py"
  if ! "$PY" "$SRC/convert_hf_to_gguf.py" "$HF" --outtype f32 --outfile "$DENSE.tmp" > "$C/convert.log" 2>&1; then
    say "F32 refused ($(grep -m1 -E 'Error|error' "$C/convert.log" || true)); trying F16"
    DENSE=$C/smollm2-135m-f16.gguf
    "$PY" "$SRC/convert_hf_to_gguf.py" "$HF" --outtype f16 --outfile "$DENSE.tmp" > "$C/convert.log" 2>&1 \
      || die "convert_hf_to_gguf.py cannot run: $(grep -E 'Error' "$C/convert.log" | tail -1) (full log: $C/convert.log)"
  fi
  mv "$DENSE.tmp" "$DENSE"
fi
[[ -f $DENSE ]] || DENSE=$C/smollm2-135m-f16.gguf

# 3. quantized by llama-quantize ----------------------------------------------------------------------
QUANTS=(Q8_0 Q4_K_M)
for q in "${QUANTS[@]}"; do
  if [[ ! -f $C/smollm2-135m-$q.gguf ]]; then
    say "llama-quantize $q"
    "$BIN/llama-quantize" "$DENSE" "$C/smollm2-135m-$q.gguf.tmp" "$q" "$(nproc)" > "$C/quantize-$q.log" 2>&1 \
      || die "llama-quantize $q failed: see $C/quantize-$q.log"
    mv "$C/smollm2-135m-$q.gguf.tmp" "$C/smollm2-135m-$q.gguf"
  fi
done

# 4. scoring ------------------------------------------------------------------------------------------
TEXT=$W/heldout.txt
cp "$ROOT/engine/data/corpus/heldout.txt" "$TEXT"   # hierui kld --suite heldout's text
if [[ ${FRESH:-0} == 1 ]]; then rm -rf "$W"/lc_*.log "$W"/base-*.kld "$W"/hi_own "$W"/hi_lc; fi
LC=("$BIN/llama-perplexity" -t "$THREADS" -c "$CTX" -b "$CTX" -f "$TEXT")
run_lc() {  # LOG ARGS...: a llama.cpp run whose log is kept only when it succeeded
  local log=$1; shift
  [[ -f $log ]] && return 0
  say "llama-perplexity $(basename "$log" .log)"
  "${LC[@]}" "$@" > "$log.tmp" 2>&1 || die "llama-perplexity failed: see $log.tmp"
  mv "$log.tmp" "$log"
}
SPECS=()
for q in "${QUANTS[@]}"; do SPECS+=(-p "checkpoint:$C/smollm2-135m-$q.gguf"); done

# a. llama.cpp: its base file from the dense model, then each quant against it
run_lc "$W/lc_base.log" -m "$DENSE" --kl-divergence-base "$W/base-lc.kld"
for q in "${QUANTS[@]}"; do
  run_lc "$W/lc_${q}_lc.log" -m "$C/smollm2-135m-$q.gguf" --kl-divergence-base "$W/base-lc.kld" --kl-divergence
done
# b. hierui: dense and both quants in one run, writing a llama.cpp base file
if [[ ! -f $W/hi_own/kld_summary.parquet || ! -f $W/base-hi.kld ]]; then
  say "hierui kld (own dense run, --save-base base-hi.kld --base-format llama.cpp)"
  rm -rf "$W/hi_own" "$W/base-hi.kld"
  "$HIERUI" kld --model "$DENSE" --text "$TEXT" --ctx "$CTX" --save-base "$W/base-hi.kld" --base-format llama.cpp \
    "${SPECS[@]}" --out "$W/hi_own" > "$W/hi_own.log" 2>&1 || die "hierui kld failed: see $W/hi_own.log"
fi
# c. cross reads: llama.cpp against hierui's base file, hierui against llama.cpp's
for q in "${QUANTS[@]}"; do
  run_lc "$W/lc_${q}_hi.log" -m "$C/smollm2-135m-$q.gguf" --kl-divergence-base "$W/base-hi.kld" --kl-divergence
done
if [[ ! -f $W/hi_lc/kld_summary.parquet ]]; then
  say "hierui kld --base base-lc.kld"
  "$HIERUI" kld --model "$DENSE" --text "$TEXT" --base "$W/base-lc.kld" "${SPECS[@]}" --out "$W/hi_lc" \
    > "$W/hi_lc.log" 2>&1 || die "hierui kld --base failed: see $W/hi_lc.log"
fi

# 5. the table ----------------------------------------------------------------------------------------
echo
echo "SmolLM2-135M-Instruct, heldout suite, ctx $CTX (llama.cpp: -t $THREADS -c $CTX -b $CTX); dense = $(basename "$DENSE") from convert_hf_to_gguf.py"
echo
"$PY" "$ROOT/scripts/llamacpp_table.py" "$W"
cat <<'EOF'

hierui scores a quant as its weights de-quantized to float (no activation quantization; a llama.cpp
runtime for hierui is not built yet), while llama.cpp's matmuls quantize the activations too (Q8_0/Q8_K
for these types): hierui's quant KLD is expected to read lower than llama.cpp's. The dense PPLs and the
base files read both ways should agree.
EOF
