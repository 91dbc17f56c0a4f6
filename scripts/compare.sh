#!/usr/bin/env bash
# RoPO vs LoRA-DPO vs full DPO on the same data, seed and budget (issue 9): the recipe.
#
#   bash scripts/compare.sh [VARIANTS] [STEPS]
#
#   VARIANTS  comma-separated names of configs/compare/*.toml (default ropo,lora,full)
#   STEPS     training.max_steps for every variant (default: the configs' one epoch)
#
# For each variant: `ropo train --config configs/compare/<v>.toml`, then `ropo eval --adapter`
# on the held-out pairs (the last 84 rows of orca_dpo_pairs, as the configs' eval_rows), their
# first $COMPARE_SAMPLES prompts (greedy + seeded sampling), MMLU ($COMPARE_SUBJECTS, zero-shot)
# and the hyperspherical energy of the adapted layers. The base model is evaluated once on the
# same inputs (what `ropo eval --compare-base` would measure again for every variant). Writes
# runs/compare/table.md and runs/compare/table.json and prints the table.
#
# Environment: ROPO_CACHE (model cache), COMPARE_SAMPLES (default 16), COMPARE_TOKENS (max new
# tokens, default 128), COMPARE_SUBJECTS (default 5 MMLU subjects of ~100 questions each).
set -euo pipefail
cd "$(dirname "$0")/.."

variants="${1:-ropo,lora,full}"
steps="${2:-}"
samples="${COMPARE_SAMPLES:-16}"
tokens="${COMPARE_TOKENS:-128}"
subjects="${COMPARE_SUBJECTS:-global_facts,medical_genetics,business_ethics,us_foreign_policy,computer_security}"
out=runs/compare
ropo=target/release/ropo
orca=../shared/data/orca_dpo_pairs/validation.jsonl
mmlu=../shared/data/mmlu/data

[ -f "$orca" ] || { echo "compare: $orca not found (run from a checkout next to ../shared)" >&2; exit 1; }
model="$(bash scripts/fetch-model.sh)"
cargo build --release --locked
mkdir -p "$out"
# The held-out pairs: the last 84 rows, exactly the configs' eval_rows = "-84:".
tail -n 84 "$orca" > "$out/eval.jsonl"

eval_args=(--model "$model" --prefs "$out/eval.jsonl" --max-length 256 --batch-size 2
           --prompts "$out/eval.jsonl" --samples "$samples" --max-new-tokens "$tokens"
           --mmlu "$mmlu" --subjects "$subjects" --shots 0)

# The base report is reused only when it was made with the same model and eval settings.
stamp="${eval_args[*]}"
if [ ! -f "$out/base/report.json" ] || [ "$(cat "$out/base/eval-args.txt" 2>/dev/null)" != "$stamp" ]; then
  echo "==> base model"
  "$ropo" eval "${eval_args[@]}" --out "$out/base/report.json" --generations "$out/base/generations.jsonl"
  printf '%s' "$stamp" > "$out/base/eval-args.txt"
else
  echo "==> base model: reusing $out/base/report.json (same eval settings)"
fi

IFS=',' read -ra names <<< "$variants"
for v in "${names[@]}"; do
  cfg="configs/compare/$v.toml"
  [ -f "$cfg" ] || { echo "compare: no config $cfg" >&2; exit 1; }
  mkdir -p "$out/$v"
  echo "==> $v: train ($cfg)"
  sets=(--set model.path_or_id="\"$model\"" --set training.output_dir="\"$out/$v/train\"")
  [ -n "$steps" ] && sets+=(--set training.max_steps="$steps")
  "$ropo" train --config "$cfg" "${sets[@]}" --overwrite 2>&1 | tee "$out/$v/train.log"
  echo "==> $v: eval"
  "$ropo" eval "${eval_args[@]}" --adapter "$out/$v/train" --energy \
    --out "$out/$v/report.json" --generations "$out/$v/generations.jsonl"
done

python3 scripts/compare_table.py "$out" "$variants"
