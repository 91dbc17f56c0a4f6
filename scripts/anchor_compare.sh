#!/usr/bin/env bash
# Side-by-side speed and memory against TRL DPOTrainer + PEFT on this machine (the issue's
# "measured side by side, same model, same data"): ../shared/anchors/trl_anchor.py (HRA r=8 and
# LoRA r=8 on q,k,v,o; f32 and bf16 autocast; reference forward each step and
# precompute_ref_log_probs) and `ropo train --config configs/bench/anchor.toml` (f32 and
# model.dtype = "bf16"; precomputed reference, and the reference forward in every step), one
# process each, interleaved for ROUNDS rounds, then a table (scripts/anchor_table.py): median
# real tokens/s of steps 2-6, peak RSS (/usr/bin/time -v), and each ropo mode's ratio against
# the fastest TRL configuration of the same reference mode; then the matrix-multiply peaks of
# the same hour (runs/bench/sgemm_peak.json: torch f32 and bf16, numpy; runs/bench/sgemm_ropo.txt:
# candle f32 and ropo's bf16 kernel).
#
# Sets up TRL once (a venv in $ANCHOR_WORK with torch, transformers, trl, peft from PyPI: ~6 GB)
# and the HF folder of the GGUF model (../shared/anchors/convert_gguf_to_hf.py).
#
#   ROUNDS        rounds (default 2)
#   ANCHOR_WORK   work folder (default ~/.cache/ropo/anchor)
#   TRL_CONFIGS   TRL configurations (default: every configuration of the speed targets,
#                 "lora_qkvo lora_qkvo_bf16 hra_qkvo hra_qkvo_bf16 lora_qkvo_pre lora_qkvo_pre_bf16")
#   ROPO_DTYPES   ropo's model.dtype values (default "f32 bf16")
set -euo pipefail
cd "$(dirname "$0")/.."
rounds="${ROUNDS:-2}"
work="${ANCHOR_WORK:-${XDG_CACHE_HOME:-$HOME/.cache}/ropo/anchor}"
shared="$(cd ../shared && pwd)"
venv="$work/venv"
trl_configs="${TRL_CONFIGS:-lora_qkvo lora_qkvo_bf16 hra_qkvo hra_qkvo_bf16 lora_qkvo_pre lora_qkvo_pre_bf16}"
ropo_dtypes="${ROPO_DTYPES:-f32 bf16}"
mkdir -p "$work" runs/bench
gguf="$(bash scripts/fetch-model.sh)"

if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import trl, peft" 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q torch==2.15.0 transformers==5.24.0 trl==1.16.0 peft==0.21.2 accelerate datasets gguf
fi
if [ ! -f "$work/smollm2-hf/model.safetensors" ]; then
  (cd "$work" \
    && "$venv/bin/python" -c "import sys; from transformers import AutoTokenizer; t = AutoTokenizer.from_pretrained(sys.argv[1], gguf_file=sys.argv[2]); t.backend_tokenizer.save('tokenizer_from_gguf.json')" "$(dirname "$gguf")" "$(basename "$gguf")" \
    && "$venv/bin/python" "$shared/anchors/convert_gguf_to_hf.py" "$gguf" smollm2-hf)
fi
command -v /usr/bin/time > /dev/null || { echo "anchor_compare: needs /usr/bin/time (Debian: apt-get install time)" >&2; exit 1; }
cargo build --release --locked --quiet

for round in $(seq 1 "$rounds"); do
  for cfg in $trl_configs; do
    echo "round $round: TRL $cfg" >&2
    (cd "$work" && SMOLLM2_HF=smollm2-hf ORCA="$shared/data/orca_dpo_pairs/validation.jsonl" OMP_NUM_THREADS=2 \
      /usr/bin/time -v -o "time_${cfg}_r$round.txt" "$venv/bin/python" "$shared/anchors/trl_anchor.py" "$cfg" "r$round" > "log_${cfg}_r$round.txt" 2>&1)
  done
  for dtype in $ropo_dtypes; do
    for pre in true false; do
      echo "round $round: ropo $dtype (precompute_ref_log_probs = $pre)" >&2
      out="runs/bench/anchor-$dtype-precompute-$pre-r$round"
      /usr/bin/time -v -o "$out.time.txt" ./target/release/ropo train --config configs/bench/anchor.toml \
        --set "model.path_or_id=\"$gguf\"" --set "model.dtype=\"$dtype\"" --set "training.precompute_ref_log_probs=$pre" \
        --set "training.output_dir=\"$out\"" --overwrite > "$out.log.txt" 2>&1
    done
  done
done
# the machine's matrix-multiply peaks, the same hour: torch f32 / bf16 and numpy (sgemm_peak.py),
# candle's f32 sgemm and ropo's bf16 kernel at 2048^3 (benches/sgemm.rs)
echo "matrix-multiply peaks" >&2
(cd "$work" && OMP_NUM_THREADS=2 "$venv/bin/python" "$shared/anchors/sgemm_peak.py") > runs/bench/sgemm_peak.json 2>&1 || true
RAYON_NUM_THREADS=2 cargo bench --locked --bench sgemm -- 2048 2>&1 | grep -E '^(sgemm|bf16_gemm)/|thrpt' > runs/bench/sgemm_ropo.txt || true
python3 scripts/anchor_table.py "$work" runs/bench "$rounds" "$trl_configs" "$ropo_dtypes" | tee runs/bench/anchor_table.md
