#!/usr/bin/env bash
# CPU time per MiniLM `bench model` iteration on wgpu (lavapipe): (CPU of a run with N + 1
# iterations − CPU of a run with 1) / N, every thread of the process (llvmpipe's workers
# included), for each LABEL=BIN, alternating ROUNDS times, each with an empty tuning cache
# (shape-aware defaults). CPU time is what to compare on a loaded machine, where wall time
# depends on what else runs; an iteration runs the forward twice (timed, inputs resident).
#
#     scripts/wgpu-cpu-per-forward.sh BATCH N ROUNDS LABEL=BIN [LABEL=BIN ...]
#     scripts/wgpu-cpu-per-forward.sh 1 15 2 before=/tmp/tf-base after=target/release/transfuse
#
# The subtraction cancels start-up (device, shader compiles) only on average: take N ≥ 15 at
# batch 1 (one iteration costs about as much as the start-up's spread).
set -euo pipefail
b=$1 n=$2 rounds=$3; shift 3
M=${TRANSFUSE_MINILM_DIR:-$HOME/.cache/transfuse/minilm/model}
export WGPU_BACKEND=vulkan XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp/xdg}"
mkdir -p "$XDG_RUNTIME_DIR"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
cpu() { # bin iters -> CPU seconds (user+sys) of the whole process
  local s; /usr/bin/time -o "$tmp/time.txt" -f "%U %S" "$1" bench model --model "$M" --backend wgpu --batch "$b" --iters "$2" --warmup 1 --json >/dev/null 2>/dev/null; s=$(tail -1 "$tmp/time.txt")
  python3 -c "import sys; u,s=map(float,sys.argv[1:]); print(u+s)" $s
}
for r in $(seq "$rounds"); do
  for lb in "$@"; do
    label=${lb%%=*} bin=${lb#*=}
    export TRANSFUSE_CACHE_DIR="$tmp/cache-$label"; rm -rf "$TRANSFUSE_CACHE_DIR"; mkdir -p "$TRANSFUSE_CACHE_DIR"
    # A discarded run first, so both measured ones find Mesa's shader cache warm.
    [[ $r == 1 ]] && cpu "$bin" 1 > /dev/null
    a=$(cpu "$bin" 1); z=$(cpu "$bin" $((n + 1)))
    python3 -c "import sys; a,z,n=float(sys.argv[1]),float(sys.argv[2]),int(sys.argv[3]); print(f'{sys.argv[4]} b$b round $r: {(z-a)/n*1e3:.1f} ms CPU per iteration')" "$a" "$z" "$n" "$label"
  done
done
