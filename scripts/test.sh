#!/usr/bin/env bash
# Runs every test of the workspace: unit, integration (parity with the reference fixtures, the
# CLI end to end), benches in test mode, examples, then the doc tests.
#
# The pretrained MiniLM model is fetched first (scripts/fetch-minilm.sh, cached) and its folder
# exported as TRANSFUSE_MINILM_DIR; an already exported TRANSFUSE_MINILM_DIR is used as is.
# If the fetch fails, the MiniLM tests skip, unless TRANSFUSE_REQUIRE (comma-separated,
# e.g. `minilm`) names `minilm`, in which case this script fails.
#
#     scripts/test.sh                        # everything available
#     TRANSFUSE_REQUIRE=minilm scripts/test.sh   # as CI runs it (.ci/run)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# rustup's default install puts cargo in ~/.cargo/bin, which a fresh login may not have on PATH.
if ! command -v cargo >/dev/null 2>&1 && [[ -f "${HOME:-}/.cargo/env" ]]; then
    # shellcheck source=/dev/null
    source "$HOME/.cargo/env"
fi
command -v cargo >/dev/null 2>&1 || { echo "test.sh: error: cargo not found (install Rust with rustup)" >&2; exit 1; }

# requires WHAT: true when TRANSFUSE_REQUIRE (comma-separated, spaces ignored) names WHAT.
requires() {
    local list=",${TRANSFUSE_REQUIRE:-},"
    [[ "${list// /}" == *",$1,"* ]]
}

start=$SECONDS
summary=()

print_summary() {
    echo
    echo "== test.sh summary ($((SECONDS - start))s) =="
    printf '  %s\n' "${summary[@]}"
}

# step NAME COMMAND...: runs COMMAND, records the outcome; on failure prints the summary and exits.
step() {
    local name="$1" t0=$SECONDS rc
    shift
    echo "== $name: $*" >&2
    if "$@"; then
        summary+=("ok    $name ($((SECONDS - t0))s)")
    else
        rc=$?
        summary+=("FAIL  $name ($((SECONDS - t0))s, exit $rc)")
        print_summary
        exit "$rc"
    fi
}

# --- MiniLM ---------------------------------------------------------------------------------
if [[ -n "${TRANSFUSE_MINILM_DIR:-}" ]]; then
    summary+=("ok    minilm: TRANSFUSE_MINILM_DIR=$TRANSFUSE_MINILM_DIR (preset)")
elif fetched="$(bash scripts/fetch-minilm.sh)" && [[ -n "$fetched" ]]; then
    export TRANSFUSE_MINILM_DIR="${fetched##*$'\n'}" # the last line of stdout
    summary+=("ok    minilm: $TRANSFUSE_MINILM_DIR")
elif requires minilm; then
    summary+=("FAIL  minilm: fetch failed and TRANSFUSE_REQUIRE names minilm")
    print_summary
    exit 1
else
    echo "test.sh: warning: could not fetch MiniLM; its tests will be skipped" >&2
    summary+=("skip  minilm: fetch failed, MiniLM tests skipped")
fi

# --- Tests ----------------------------------------------------------------------------------
step "cargo test (all targets)" cargo test --workspace --all-targets
step "cargo test (doc tests)" cargo test --workspace --doc

print_summary
