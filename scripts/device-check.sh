#!/usr/bin/env bash
# The GPU check (issue 22): on a machine with an NVIDIA GPU and no Rust toolchain, run the test
# groups that matter with the device selected (ROPO_TEST_DEVICE=cuda), then short real training
# runs in bf16 and f32 at 8 pairs x 512 tokens, printing tokens/s and GPU memory. About 5
# minutes on an H200.
#
# 1. On the build machine (this repository, beside ../shared):
#
#        bash scripts/build-cuda.sh --bins --test gradcheck --test forward_parity --test train
#        bash scripts/device-check.sh --stage        # dist/: what travels, with its sizes
#
#    --stage writes dist/cuda/ (the stripped, xz-compressed binaries: ropo and the test
#    executables of $groups), dist/shared/ (a transport copy of the two ../shared files the
#    tests read: the golden values and orca_dpo_pairs; dist/ is ignored by git) and
#    dist/model/part-* (the 98 MB model in pieces, each small enough for one transfer).
#
# 2. On the GPU machine, from the repository root, with dist/ carried along. A transfer there
#    holds 64 MiB with the working tree (~8 MB), so dist/ (~146 MB) goes in three, back to back
#    while the machine stays warm; `--keep` copies what a transfer brought to $ROPO_DIST_CACHE
#    (default /tmp/ropo-dist), which outlives the call:
#
#        carry dist/model/part-00:          bash scripts/device-check.sh --keep
#        carry dist/model/part-01:          bash scripts/device-check.sh --keep
#        carry dist/cuda and dist/shared:   bash scripts/device-check.sh
#
# The CUDA libraries come from the GPU machine's PyTorch environment (site-packages/nvidia/
# cu13/lib: cuBLAS, cuRAND, NVRTC; or $ROPO_CUDA_LIBS); the driver's libcuda.so.1 from the
# system. Exit status 0 only when every group ran and passed.
set -uo pipefail
cd "$(dirname "$0")/.."

# test executable : the tests of it that run (a cargo test filter; empty = all)
groups=("gradcheck:" "forward_parity:" "train:step0_losses_rewards_and_golden_logps")
keep="${ROPO_DIST_CACHE:-/tmp/ropo-dist}"
model_name=SmolLM2-135M-Instruct.Q4_1.gguf

stage() {
  local model
  model="$(bash scripts/fetch-model.sh)" || exit 1
  rm -rf dist && mkdir -p dist/cuda dist/shared/golden dist/shared/data/orca_dpo_pairs dist/model
  [ -x target/cuda/release/ropo ] || { echo "device-check: build first (see the header)" >&2; exit 1; }
  cp target/cuda/release/ropo dist/cuda/ropo
  for g in "${groups[@]}"; do
    local name="${g%%:*}" exe
    exe="$(ls -t target/cuda/release/deps/"$name"-* 2>/dev/null | grep -v '\.d$' | head -1)"
    [ -n "$exe" ] || { echo "device-check: no test executable for $name (build it: see the header)" >&2; exit 1; }
    cp "$exe" "dist/cuda/test-$name"
  done
  strip dist/cuda/* && xz -T0 -6 dist/cuda/*
  cp ../shared/golden/smollm2_golden.json dist/shared/golden/
  cp ../shared/data/orca_dpo_pairs/validation.jsonl dist/shared/data/orca_dpo_pairs/
  split -b 50M -d "$model" dist/model/part-
  du -sh dist/cuda/* dist/shared dist/model/* | sed 's/^/  /'
  echo "device-check: staged; total $(du -sh dist | cut -f1)"
}

# copy whatever part of dist/ this transfer brought into the cache that outlives the call
keep_dist() {
  mkdir -p "$keep"
  [ -d dist ] && cp -r dist/. "$keep"/
  ls -la "$keep" "$keep"/* | sed 's/^/  /'
}

case "${1:-}" in
  --stage) stage; exit 0 ;;
  --keep) keep_dist; exit 0 ;;
  "") ;;
  *) echo "usage: bash scripts/device-check.sh [--stage | --keep]" >&2; exit 2 ;;
esac

keep_dist >/dev/null
d="$keep"
bin="$(mktemp -d)"
for f in "$d"/cuda/*.xz; do xz -dc "$f" > "$bin/$(basename "$f" .xz)" && chmod +x "$bin/$(basename "$f" .xz)"; done
[ -x "$bin/ropo" ] || { echo "device-check: no ropo binary in $d/cuda (stage it on the build machine)" >&2; exit 1; }

# the model, from its pieces, where scripts/fetch-model.sh finds (and verifies) it
export ROPO_CACHE="$d/cache"
mkdir -p "$ROPO_CACHE/models"
if ls "$d"/model/part-* >/dev/null 2>&1; then cat "$d"/model/part-* > "$ROPO_CACHE/models/$model_name"; fi
model="$(bash scripts/fetch-model.sh 2>/dev/null)" || { echo "device-check: the model's pieces are missing or incomplete in $d/model" >&2; exit 1; }

# the CUDA libraries
if [ -z "${ROPO_CUDA_LIBS:-}" ]; then
  ROPO_CUDA_LIBS="$(python3 - <<'PY' 2>/dev/null
import glob, os, site
for s in site.getsitepackages():
    for p in glob.glob(os.path.join(s, "nvidia", "cu13", "lib")) + glob.glob(os.path.join(s, "nvidia", "cublas", "lib")):
        if glob.glob(os.path.join(p, "libcublas.so*")):
            print(p); raise SystemExit
PY
)"
fi
[ -n "$ROPO_CUDA_LIBS" ] && [ -d "$ROPO_CUDA_LIBS" ] || { echo "device-check: no CUDA 13 libraries found (set ROPO_CUDA_LIBS)" >&2; exit 1; }
export LD_LIBRARY_PATH="$ROPO_CUDA_LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export ROPO_TEST_DEVICE="${ROPO_TEST_DEVICE:-cuda}" ROPO_REPO_DIR="$PWD" ROPO_SHARED_DIR="$d/shared"
echo "== device $ROPO_TEST_DEVICE; CUDA libraries $ROPO_CUDA_LIBS; model $model"
nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader

fail=0
for g in "${groups[@]}"; do
  name="${g%%:*}" filter="${g#*:}"
  echo "== $name ${filter:+($filter)}"
  log="$bin/$name.log"
  timeout 240 "$bin/test-$name" $filter --test-threads 1 >"$log" 2>&1
  rc=$?
  grep -E '^test |test result|panicked|max \|' "$log"
  if [ "$rc" != 0 ]; then echo "== $name: FAILED (exit $rc)"; tail -20 "$log"; fail=1; fi
done

# real training runs: orca, 8 pairs x 512 tokens, 10 steps, reference forward every step
for dtype in bf16 f32; do
  echo "== ropo train configs/orca.toml --device $ROPO_TEST_DEVICE, model.dtype $dtype, 8 pairs x 512 tokens, 10 steps"
  out="$bin/train-$dtype"
  timeout 150 "$bin/ropo" train --config configs/orca.toml --device "$ROPO_TEST_DEVICE" \
    --set "model.path_or_id=\"$model\"" --set "model.dtype=\"$dtype\"" \
    --set "data.train_files=[\"$d/shared/data/orca_dpo_pairs/validation.jsonl\"]" \
    --set data.max_length=512 --set training.per_device_train_batch_size=8 --set training.max_steps=10 \
    --set "training.output_dir=\"$out\"" >"$out.log" 2>&1 &
  pid=$!
  peak=0
  while kill -0 "$pid" 2>/dev/null; do
    m="$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits 2>/dev/null | head -1)"
    [[ "$m" =~ ^[0-9]+$ ]] && [ "$m" -gt "$peak" ] && peak="$m"
    sleep 1
  done
  wait "$pid"; rc=$?
  grep -E "tokens/s|loss|peak" "$out.log" | tail -6
  echo "   peak GPU memory (nvidia-smi, sampled each second): $peak MiB"
  if [ "$rc" != 0 ]; then echo "== train $dtype: FAILED (exit $rc)"; tail -20 "$out.log"; fail=1; fi
done
[ "$fail" = 0 ] && echo "device-check: PASSED" || echo "device-check: FAILED (see above)"
exit "$fail"
