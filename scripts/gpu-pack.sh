#!/usr/bin/env bash
# Build, here, what scripts/gpu-check.sh runs on a GPU machine that has no Rust toolchain:
# the `transfuse` CLI and the CUDA test binaries, stripped and xz-compressed, into one folder
# (default: gpu-pack/ in the repository root, ignored by git through .git/info/exclude), with
# a MANIFEST (what was built, from which commit, the newest glibc symbol version each binary
# needs, its NEEDED libraries) and the sizes. Then carry that folder to the GPU machine (with
# the device tool: carry ["gpu-pack"]) and run `bash scripts/gpu-check.sh` there from the
# repository root.
#
#   scripts/gpu-pack.sh [--release] [--fixtures] [DEST]
#
# --release   build with the release profile (slow on a small machine; the default is the dev
#             profile, whose dependencies are built at opt-level 2 and ours at 1: the GPU
#             kernels are NVRTC's either way, only host-side code is slower)
# --fixtures  also copy tests/fixtures (only needed where the repository's tracked files do
#             not travel with the pack; gpu-check.sh uses DEST/fixtures when present, else
#             tests/fixtures)
#
# Fails when the pack (plus the tracked tree, which travels with it) is over 64 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."

profile_flag=()
profile_dir=debug
fixtures=0
dest=gpu-pack
for a in "$@"; do
    case "$a" in
    --release) profile_flag=(--release); profile_dir=release ;;
    --fixtures) fixtures=1 ;;
    -h | --help) sed -n '2,22p' "$0"; exit 0 ;;
    -*) echo "gpu-pack: unknown option $a" >&2; exit 2 ;;
    *) dest="$a" ;;
    esac
done
log() { echo "gpu-pack: $*" >&2; }
limit=$((64 * 1024 * 1024))

# Keep the pack out of git (the device tool carries ignored paths named in `carry`).
if [[ -d .git || -f .git ]]; then
    exclude="$(git rev-parse --git-path info/exclude)"
    mkdir -p "$(dirname "$exclude")"
    grep -qxF "/$dest/" "$exclude" 2>/dev/null || echo "/$dest/" >>"$exclude"
fi

# The test binaries: (package, test file) pairs. cuda and nvrtc are the runtime's device tests;
# gpu_parity runs the model fixtures on the device backends (CUDA included when present).
tests=("transfuse-runtime:cuda" "transfuse-runtime:nvrtc" "transfuse:gpu_parity" "transfuse:codegen_nvrtc")

log "building the CLI (${profile_dir})"
cargo build "${profile_flag[@]}" -p transfuse --bin transfuse >&2
msgs="$(mktemp)"
trap 'rm -f "$msgs"' EXIT
for t in "${tests[@]}"; do
    log "building test ${t#*:} of ${t%%:*}"
    cargo test "${profile_flag[@]}" -p "${t%%:*}" --test "${t#*:}" --no-run \
        --message-format=json-render-diagnostics >>"$msgs"
done

rm -rf "$dest"
mkdir -p "$dest/bin"
# Locate each test executable from cargo's JSON (its file name carries a hash).
python3 - "$msgs" "$dest" "${tests[@]}" <<'PY'
import json, shutil, sys
msgs, dest, wanted = sys.argv[1], sys.argv[2], [t.split(":")[1] for t in sys.argv[3:]]
found = {}
for line in open(msgs):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and "test" in m["target"]["kind"]:
        found[m["target"]["name"]] = m["executable"]
missing = [w for w in wanted if w not in found]
if missing:
    sys.exit(f"gpu-pack: cargo reported no executable for {missing}")
for w in wanted:
    shutil.copy(found[w], f"{dest}/bin/test-{w}")
PY
cp "target/$profile_dir/transfuse" "$dest/bin/transfuse"

{
    echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (+ uncommitted changes)')"
    echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -m), $(ldd --version 2>&1 | head -n1)"
    echo "profile: $profile_dir"
} >"$dest/MANIFEST"
for f in "$dest"/bin/*; do
    strip "$f"
    glibc="$(objdump -T "$f" | grep -o 'GLIBC_[0-9.]*' | sort -uV | tail -n1)"
    needed="$(readelf -d "$f" | sed -n 's/.*Shared library: \[\(.*\)\]/\1/p' | tr '\n' ' ')"
    echo "$(basename "$f"): $(stat -c %s "$f") bytes stripped, needs $glibc; NEEDED: $needed" >>"$dest/MANIFEST"
    xz -T0 -6 "$f"
done
if [[ $fixtures == 1 ]]; then
    tar -C tests -cJf "$dest/fixtures.tar.xz" fixtures
fi

pack=$(du -sb "$dest" | cut -f1)
tree=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -n1 | cut -f1)
echo "pack: $pack bytes; tracked tree: $tree bytes; together $((pack + tree)) of $limit" >>"$dest/MANIFEST"
cat "$dest/MANIFEST" >&2
if ((pack + tree > limit)); then
    log "error: the pack and the tree are over 64 MiB"
    exit 1
fi
log "done: $dest ($(du -sh "$dest" | cut -f1)); on the GPU machine: bash scripts/gpu-check.sh $dest"
