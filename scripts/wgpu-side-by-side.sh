#!/usr/bin/env bash
# The wgpu (lavapipe) acceptance runs of issue 10, in one run: ROUNDS alternating rounds of
# burn's attention peer (PEER_ATTENTION, default /tmp/peerbin/peer-attention), each given
# transfuse binary's `bench attention` (causal b1 h12 d64 f32, seq 1024, fused and unfused),
# PyTorch CPU's MiniLM peer (2 threads) and each binary's `bench model` on MiniLM 1 × 128
# (and 32 × 128 with B32=1); then the minimum of the per-round medians of every case.
# Each binary gets its own tuning cache: empty (shape-aware defaults), or filled first by
# `bench attention --tune` and `transfuse tune` on MiniLM when TUNE=SECONDS is set.
#
#     scripts/wgpu-side-by-side.sh OUT ROUNDS TORCH_PYTHON LABEL=BIN [LABEL=BIN ...]
#     TUNE=60 scripts/wgpu-side-by-side.sh /tmp/wsbs 3 /tmp/oracle/venv/bin/python before=/tmp/tf-base after=target/release/transfuse
#
# Nothing else should run meanwhile: every system uses both cores.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out="${1:?usage: scripts/wgpu-side-by-side.sh OUT ROUNDS TORCH_PYTHON LABEL=BIN...}"
rounds="${2:?ROUNDS}"
py="${3:?TORCH_PYTHON}"
shift 3
[[ $# -ge 1 ]] || { echo "wgpu-side-by-side.sh: give at least one LABEL=BIN" >&2; exit 2; }
peers="${PEERS_DIR:-../shared/peers}"
[[ -d "$peers" ]] || peers=/work/shared/peers
peer_attention="$(realpath "${PEER_ATTENTION:-/tmp/peerbin/peer-attention}")"
minilm="$(bash scripts/fetch-minilm.sh | tail -n 1)"
export WGPU_BACKEND=vulkan XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp/xdg}"
mkdir -p "$out" "$XDG_RUNTIME_DIR"
raw="$out/raw.txt"
: > "$raw"
for lb in "$@"; do
    label="${lb%%=*}" bin="$(realpath "${lb#*=}")"
    rm -rf "$out/cache-$label" && mkdir -p "$out/cache-$label"
    if [[ -n "${TUNE:-}" ]]; then
        TRANSFUSE_CACHE_DIR="$out/cache-$label" "$bin" bench attention --backend wgpu --seq 1024 \
            --variants fused,unfused --tune --tune-budget "$TUNE" --iters 1 > /dev/null
        TRANSFUSE_CACHE_DIR="$out/cache-$label" "$bin" tune --model "$minilm" --backend wgpu \
            --dims batch=1,seq=128 --budget "$((TUNE * 3))" > /dev/null
    fi
done
for r in $(seq "$rounds"); do
    (cd /tmp && "$peer_attention" --seqs 1024 --runs 10 2>/dev/null) |
        python3 -c 'import json,sys
for l in sys.stdin: j=json.loads(l); print("burn", j["variant"], j["median_ms"])' >> "$raw"
    "$py" "$peers/torch_minilm.py" --model "$minilm" --runs 5 2>/dev/null |
        python3 -c 'import json,sys
for l in sys.stdin: j=json.loads(l); print("pytorch", j["case"], j["median_ms"])' >> "$raw"
    for lb in "$@"; do
        label="${lb%%=*}" bin="$(realpath "${lb#*=}")"
        export TRANSFUSE_CACHE_DIR="$out/cache-$label"
        "$bin" bench attention --backend wgpu --seq 1024 --variants fused,unfused --json 2>/dev/null |
            python3 -c 'import json,sys
for l in sys.stdin: j=json.loads(l); print(sys.argv[1], "attention_" + j["variant"], j["median_ms"])' "$label" >> "$raw"
        for b in 1 ${B32:+32}; do
            "$bin" bench model --model "$minilm" --backend wgpu --batch "$b" --iters $((b == 1 ? 5 : 2)) --json 2>/dev/null |
                python3 -c 'import json,sys
j=json.load(sys.stdin); print(sys.argv[1], "minilm_b" + sys.argv[2], j["forward_ms_median"])' "$label" "$b" >> "$raw"
        done
    done
done
python3 - "$raw" <<'EOF' | tee "$out/summary.txt"
import sys, collections
best = collections.OrderedDict()
for line in open(sys.argv[1]):
    who, case, ms = line.split()
    if ms == "None":
        continue
    k = (who, case)
    best[k] = min(best.get(k, float("inf")), float(ms))
for (who, case), ms in best.items():
    print(f"{who:<12} {case:<22} {ms:10.2f} ms (min of per-round medians)")
EOF
