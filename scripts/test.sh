#!/usr/bin/env bash
# Runs every test of the workspace: unit, integration (parity with the reference fixtures, the
# CLI end to end), benches in test mode, examples, then the doc tests.
#
# The pretrained MiniLM model is fetched first (scripts/fetch-minilm.sh, cached) and its folder
# exported as TRANSFUSE_MINILM_DIR; an already exported TRANSFUSE_MINILM_DIR is used as is.
# NVRTC and the CUDA headers are fetched next (scripts/fetch-nvrtc.sh, cached): the library
# folder is prepended to LD_LIBRARY_PATH and exported as TRANSFUSE_NVRTC_LIB, the include
# folder as TRANSFUSE_CUDA_INCLUDE, so the CUDA C tests compile with NVRTC (no GPU needed).
# A Vulkan driver for the wgpu backend comes last (scripts/setup-vulkan.sh: Mesa's lavapipe,
# installed with apt when missing), with WGPU_BACKEND=vulkan exported (kept if already set).
# If a fetch or install fails, the tests that need it skip, unless TRANSFUSE_REQUIRE
# (comma-separated, e.g. `minilm,nvrtc,wgpu`) names it (`minilm`, `nvrtc`, `wgpu`), in which
# case this script fails. `cuda` (a CUDA driver and GPU) can be required too; nothing installs it.
#
#     scripts/test.sh                                    # everything available
#     TRANSFUSE_REQUIRE=minilm,nvrtc,wgpu scripts/test.sh   # as CI runs it (.ci/run)
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

# --- NVRTC (CUDA C -> PTX/SASS without a GPU) ------------------------------------------------
# Already exported TRANSFUSE_NVRTC_LIB and TRANSFUSE_CUDA_INCLUDE (e.g. a CUDA toolkit's lib64
# and include) are used as is. stdout of fetch-nvrtc.sh: the include folder, then the library
# folder (last line).
if [[ -n "${TRANSFUSE_NVRTC_LIB:-}" && -n "${TRANSFUSE_CUDA_INCLUDE:-}" ]]; then
    export LD_LIBRARY_PATH="$TRANSFUSE_NVRTC_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    summary+=("ok    nvrtc: TRANSFUSE_NVRTC_LIB=$TRANSFUSE_NVRTC_LIB (preset)")
elif fetched="$(bash scripts/fetch-nvrtc.sh)" && [[ "$fetched" == *$'\n'* ]]; then
    export TRANSFUSE_NVRTC_LIB="${fetched##*$'\n'}"
    fetched="${fetched%$'\n'*}"
    export TRANSFUSE_CUDA_INCLUDE="${fetched##*$'\n'}"
    export LD_LIBRARY_PATH="$TRANSFUSE_NVRTC_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    summary+=("ok    nvrtc: $TRANSFUSE_NVRTC_LIB (headers: $TRANSFUSE_CUDA_INCLUDE)")
elif requires nvrtc; then
    summary+=("FAIL  nvrtc: fetch failed and TRANSFUSE_REQUIRE names nvrtc")
    print_summary
    exit 1
else
    echo "test.sh: warning: could not fetch NVRTC; the CUDA compilation tests will be skipped" >&2
    summary+=("skip  nvrtc: fetch failed, CUDA compilation tests skipped")
fi

# --- Vulkan for wgpu (lavapipe on machines without a GPU) -------------------------------------
export WGPU_BACKEND="${WGPU_BACKEND:-vulkan}"
# Mesa warns on every device open when this is unset; any private writable folder will do.
if [[ -z "${XDG_RUNTIME_DIR:-}" ]]; then
    export XDG_RUNTIME_DIR="${TMPDIR:-/tmp}/transfuse-xdg-$(id -u)"
    mkdir -p "$XDG_RUNTIME_DIR" && chmod 700 "$XDG_RUNTIME_DIR"
fi
if bash scripts/setup-vulkan.sh; then
    summary+=("ok    wgpu: Vulkan driver present, WGPU_BACKEND=$WGPU_BACKEND")
elif requires wgpu; then
    summary+=("FAIL  wgpu: no Vulkan driver and TRANSFUSE_REQUIRE names wgpu")
    print_summary
    exit 1
else
    echo "test.sh: warning: no Vulkan driver; the wgpu tests will be skipped" >&2
    summary+=("skip  wgpu: no Vulkan driver, wgpu tests skipped")
fi

# --- Tests ----------------------------------------------------------------------------------
step "cargo test (all targets)" cargo test --workspace --all-targets
step "cargo test (doc tests)" cargo test --workspace --doc

print_summary
