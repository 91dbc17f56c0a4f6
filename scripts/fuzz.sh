#!/usr/bin/env bash
# Run each cargo-fuzz target under fuzz/ in turn, SECONDS each (default 600), one libFuzzer
# process (one job) at a time, at low priority; a summary line per target (executions, coverage, findings) at the end.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]
#
# Needs cargo-fuzz (`cargo install cargo-fuzz --locked`); runs on stable Rust through
# RUSTC_BOOTSTRAP=1, as the cargo-fuzz docs describe. The `pipeline` target reads SmolLM2's
# tokenizer from the GGUF that scripts/fetch-model.sh caches (or $ROPO_FUZZ_GGUF). Logs go to
# fuzz/logs/TARGET.log, crashing inputs to fuzz/artifacts/TARGET/, the corpus to
# fuzz/corpus/TARGET/. Not part of CI: each finding becomes a regression test in tests/.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-600}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(formats pipeline gguf adapter config)
fi
export RUSTC_BOOTSTRAP=1
if [ -z "${ROPO_FUZZ_GGUF:-}" ]; then
    ROPO_FUZZ_GGUF="$(bash scripts/fetch-model.sh)"
    export ROPO_FUZZ_GGUF
fi
command -v cargo-fuzz >/dev/null || { echo "fuzz.sh: cargo-fuzz is not installed (cargo install cargo-fuzz --locked)" >&2; exit 2; }
nice -n 19 cargo fuzz build
mkdir -p fuzz/logs
summary=()
# seeds for an empty corpus: rows of every format (the README's examples, the shipped data),
# the shipped configs; the binary targets build their own valid bases
seed() {
    local t="$1" dir="fuzz/corpus/$1"
    [ -n "$(ls -A "$dir" 2>/dev/null)" ] && return 0
    case "$t" in
        formats)
            local i=0
            while IFS= read -r line; do
                i=$((i + 1)); printf '%s\n' "$line" > "$dir/readme-$i.jsonl"
            done < <(grep '^{"' README.md)
            head -n 3 data/concise_prefs/train.jsonl > "$dir/concise.jsonl" ;;
        config)
            find configs -name '*.toml' | while read -r f; do cp "$f" "$dir/$(echo "$f" | tr / _)"; done ;;
    esac
}
dict() {
    case "$1" in
        formats) echo "-dict=fuzz/dicts/json.dict" ;;
        config) echo "-dict=fuzz/dicts/toml.dict" ;;
    esac
}
for t in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
    seed "$t"
    echo "fuzz.sh: $t for ${seconds}s" >&2
    status=0
    # -rss_limit_mb / -malloc_limit_mb: an allocation the input cannot justify is a finding
    nice -n 19 cargo fuzz run "$t" "fuzz/corpus/$t" -- -max_total_time="$seconds" \
        -rss_limit_mb=2048 -malloc_limit_mb=1024 -print_final_stats=1 $(dict "$t") \
        -artifact_prefix="fuzz/artifacts/$t/" > "fuzz/logs/$t.log" 2>&1 || status=$?
    last=$(grep -E '^#[0-9]+' "fuzz/logs/$t.log" | tail -1 || true)
    execs=$(grep -E '^stat::number_of_executed_units' "fuzz/logs/$t.log" | awk '{print $2}' || true)
    findings=$(find "fuzz/artifacts/$t" -type f | wc -l)
    summary+=("$t: exit $status, executions ${execs:-?}, last status: ${last:-none}, artifacts: $findings")
done
printf '%s\n' "${summary[@]}"
