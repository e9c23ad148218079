#!/usr/bin/env bash
# Runs every cargo-fuzz target of fuzz/ for SECONDS each (default 10), one after another, at
# the lowest CPU priority, and prints each target's executions; a crash stops the script with
# libFuzzer's report and the input saved under fuzz/artifacts/TARGET/.
#
#   scripts/fuzz.sh 60                 # all targets, a minute each
#   scripts/fuzz.sh 60 optimize        # one target
#
# cargo-fuzz needs nightly flags; RUSTC_BOOTSTRAP=1 lets the stable toolchain accept them
# (`cargo install cargo-fuzz` once). The fuzz crate is its own workspace with its own target
# dir (fuzz/target), so the main build is untouched. Corpora grow in fuzz/corpus/TARGET
# (gitignored); seeds come from tests/fixtures where they exist.
set -euo pipefail

SECONDS_EACH="${1:-10}"
shift || true
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT/fuzz"
export RUSTC_BOOTSTRAP=1
command -v cargo-fuzz >/dev/null 2>&1 || { echo "fuzz.sh: cargo install cargo-fuzz" >&2; exit 1; }

ALL=(config_json safetensors inputs_json tokenizer plan_json optimize)
TARGETS=("$@")
[[ ${#TARGETS[@]} -gt 0 ]] || TARGETS=("${ALL[@]}")

# Seeds: the fixtures' files for the parsers.
seed() {
    local t="$1"
    mkdir -p "corpus/$t"
    case "$t" in
    config_json) for f in "$ROOT"/tests/fixtures/tiny_*/model/config.json; do
            cp "$f" "corpus/$t/$(basename "$(dirname "$(dirname "$f")")").json"
        done ;;
    inputs_json) for f in "$ROOT"/tests/fixtures/*/inputs.json; do
            [[ -f "$f" ]] && cp "$f" "corpus/$t/$(basename "$(dirname "$f")").json"
        done ;;
    esac
}

# -s none: safe Rust, so no sanitizer (several times more executions); -a: debug assertions and
# overflow checks on.
for t in "${TARGETS[@]}"; do
    nice -n 19 cargo fuzz build -s none -a --release "$t"
done

for t in "${TARGETS[@]}"; do
    seed "$t"
    log="$(mktemp)"
    set +e
    nice -n 19 cargo fuzz run -s none -a --release "$t" "corpus/$t" -- \
        -max_total_time="$SECONDS_EACH" -max_len=4096 -timeout=30 -rss_limit_mb=4096 \
        -print_final_stats=1 >"$log" 2>&1
    rc=$?
    set -e
    execs="$(grep -ho 'stat::number_of_executed_units: *[0-9]*' "$log" | awk '{s += $2} END {print s + 0}')"
    echo "$t: $execs executions in ${SECONDS_EACH}s (rc $rc)"
    if [[ $rc -ne 0 ]]; then
        grep -A40 -m1 -E 'panicked|ERROR: libFuzzer|SUMMARY' "$log" >&2 || tail -n 60 "$log" >&2
        rm -f "$log"
        exit "$rc"
    fi
    rm -f "$log"
done
