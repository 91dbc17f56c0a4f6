#!/usr/bin/env bash
# Build ropo with `--features cuda` (candle's CUDA backend) on a machine without the CUDA
# toolkit, from PyPI packages alone:
#
#     bash scripts/build-cuda.sh                 # cargo build --release --locked --features cuda,
#                                                # into target/cuda (the binary: target/cuda/release/ropo)
#     bash scripts/build-cuda.sh --tests         # extra arguments go to cargo build
#     CUDA_COMPUTE_CAP=80 bash scripts/build-cuda.sh   # another GPU generation (default 90: H100/H200)
#
# NVIDIA publishes nvcc, the CUDA headers and the CUDA libraries as wheels (nvidia-cuda-nvcc,
# nvidia-cuda-runtime, nvidia-cuda-crt, nvidia-cuda-cccl, nvidia-nvvm, nvidia-cublas,
# nvidia-curand, nvidia-cuda-nvrtc). They are downloaded once (pip download, ~700 MB) and unpacked
# into one toolkit folder, $ROPO_CUDA_HOME (default ~/.cache/ropo/cuda/13.0): CUDA 13.0, the
# version of the device machine's driver.
#
# The driver library (libcuda.so.1) is part of the GPU driver, not of any wheel. candle links
# against it (cudarc's `dynamic-linking`), so this script writes a link-time stub in
# $ROPO_CUDA_HOME/lib/stubs: every driver entry point cudarc declares, each returning
# CUDA_ERROR_NO_DEVICE. The binary records `libcuda.so.1` and, on a GPU machine, the driver's own
# library is the one that loads. On a machine without a driver, put the stub folder on
# LD_LIBRARY_PATH to run the binary: `--device cuda` then fails with a clear "no CUDA device"
# error, and `--device cpu` works as in the default build.
#
# At run time the binary needs libcublas.so.13, libcublasLt.so.13, libcurand.so.10 and
# libnvrtc.so.13: $ROPO_CUDA_HOME/lib has them, and so has any PyTorch CUDA 13 environment
# (site-packages/nvidia/cu13/lib); point LD_LIBRARY_PATH at one of them (scripts/device-check.sh
# does).
set -euo pipefail
cd "$(dirname "$0")/.."

home="${ROPO_CUDA_HOME:-$HOME/.cache/ropo/cuda/13.0}"
# wheel versions of CUDA 13.0 (the device machine's driver is CUDA 13.0)
wheels=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-cuda-runtime==13.0.96
  nvidia-cuda-crt==13.0.88
  nvidia-cuda-cccl==13.0.85
  nvidia-nvvm==13.0.88
  nvidia-cuda-nvrtc==13.0.88
  nvidia-cublas==13.0.2.14
  nvidia-curand==10.4.5.25
)

if [ ! -x "$home/bin/nvcc" ] || [ ! -e "$home/lib/libcublas.so" ]; then
  command -v python3 >/dev/null || { echo "build-cuda: python3 with pip is required" >&2; exit 1; }
  tmp="$(mktemp -d)"
  echo "build-cuda: fetching the CUDA 13.0 toolkit wheels from PyPI into $home ..." >&2
  python3 -m pip download --no-deps --quiet --dest "$tmp/wheels" "${wheels[@]}"
  for w in "$tmp"/wheels/*.whl; do
    python3 -m zipfile -e "$w" "$tmp/x"
  done
  mkdir -p "$(dirname "$home")"
  rm -rf "$home.partial"
  mv "$tmp/x/nvidia/cu13" "$home.partial"
  chmod +x "$home.partial"/bin/* "$home.partial"/nvvm/bin/* 2>/dev/null || true
  # the link-time names (the wheels hold the versioned sonames only)
  for so in "$home.partial"/lib/lib*.so.*; do
    [ -e "$so" ] || continue
    base="${so%%.so.*}.so"
    [ -e "$base" ] || ln -s "$(basename "$so")" "$base"
  done
  rm -rf "$home"
  mv "$home.partial" "$home"
  rm -rf "$tmp"
fi

# the driver stub (see above), from the entry points of the cudarc version in Cargo.lock
cudarc_version="$(awk '/^name = "cudarc"/{getline; sub(/^version = "/, ""); sub(/"$/, ""); print; exit}' Cargo.lock)"
[ -n "$cudarc_version" ] || { echo "build-cuda: cudarc is not in Cargo.lock" >&2; exit 1; }
if [ ! -e "$home/lib/stubs/libcuda.so" ] || [ "$(cat "$home/lib/stubs/cudarc-version" 2>/dev/null)" != "$cudarc_version" ]; then
  cargo fetch --locked >/dev/null
  src="$( (ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-"$cudarc_version" 2>/dev/null || true) | head -1)/src/driver/sys/mod.rs"
  [ -f "$src" ] || { echo "build-cuda: cannot find cudarc $cudarc_version's driver bindings ($src)" >&2; exit 1; }
  mkdir -p "$home/lib/stubs"
  grep -o 'pub unsafe fn cu[A-Za-z0-9_]*(' "$src" | sed 's/pub unsafe fn \(.*\)(/int \1(void) { return 100; }/' | sort -u > "$home/lib/stubs/libcuda_stub.c"
  cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$home/lib/stubs/libcuda.so" "$home/lib/stubs/libcuda_stub.c"
  ln -sf libcuda.so "$home/lib/stubs/libcuda.so.1"
  echo "$cudarc_version" > "$home/lib/stubs/cudarc-version"
fi

export PATH="$home/bin:$PATH"
export CUDA_HOME="$home" CUDA_PATH="$home" CUDA_ROOT="$home"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
export LIBRARY_PATH="$home/lib:$home/lib/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}"
echo "build-cuda: nvcc $(nvcc --version | sed -n 's/.*release \([0-9.]*\).*/\1/p'), compute capability $CUDA_COMPUTE_CAP" >&2
# its own target folder: the default build's target/release/ropo stays the CPU binary
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target/cuda}"
exec cargo build --release --locked --features cuda "$@"
