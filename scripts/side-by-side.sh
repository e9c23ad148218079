#!/usr/bin/env bash
# The CPU acceptance protocol of issue 11, in one run: ROUNDS alternating rounds of the PyTorch
# CPU peers (../shared/peers, 2 threads) and each given transfuse binary (CPU backend,
# RAYON_NUM_THREADS=2), on MiniLM 32 × 128 and 1 × 128, causal attention b1 h12 d64 f32 at
# seq 1024 and 2048, and tiny GPT-2 decoding; then the minimum of the per-round medians on each
# side, as a Markdown table (OUT/table.md) with every raw line in OUT/raw.jsonl.
#
#     scripts/side-by-side.sh OUT ROUNDS TORCH_PYTHON LABEL=BIN [LABEL=BIN ...]
#     scripts/side-by-side.sh /tmp/sbs 5 /tmp/oracle/venv/bin/python before=/tmp/tf-base after=target/release/transfuse
#
# ONLY=decode runs just tiny GPT-2 decoding (prompt 16, 64 new tokens, greedy, KV cache): the
# PyTorch peer scripts/torch_decode.py (2 threads) and each binary's `bench model --seq 16
# --decode-tokens 64` on every backend of BACKENDS (default "cpu"; e.g. BACKENDS="cpu wgpu",
# wgpu with WGPU_BACKEND=vulkan on lavapipe), alternating, per-token ms:
#
#     ONLY=decode BACKENDS="cpu wgpu" scripts/side-by-side.sh /tmp/dsbs 5 /tmp/oracle/venv/bin/python before=/tmp/tf-base after=target/release/transfuse
#
# Nothing else should run meanwhile: every system uses both cores.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out="${1:?usage: scripts/side-by-side.sh OUT ROUNDS TORCH_PYTHON LABEL=BIN...}"
rounds="${2:?ROUNDS}"
py="${3:?TORCH_PYTHON}"
shift 3
[[ $# -ge 1 ]] || { echo "side-by-side.sh: give at least one LABEL=BIN" >&2; exit 2; }
peers="${PEERS_DIR:-../shared/peers}"
[[ -d "$peers" ]] || peers=/work/shared/peers
if [[ "${ONLY:-}" != decode ]]; then minilm="$(bash scripts/fetch-minilm.sh | tail -n 1)"; fi
gpt2=tests/fixtures/tiny_gpt2/model
mkdir -p "$out"
raw="$out/raw.jsonl"
: > "$raw"
export RAYON_NUM_THREADS=2

# tag ROUND SYSTEM: prefixes every JSON line of stdin with its round and system label.
tag() { sed -e "s/^{/{\"round\":$1,\"label\":\"$2\",/" >> "$raw"; }

backends="${BACKENDS:-cpu}"
# The decode case of backend $1 (the CPU one keeps its old name).
dcase() { if [[ "$1" == cpu ]]; then echo tiny_gpt2_decode_ms_per_token; else echo "tiny_gpt2_decode_ms_per_token_$1"; fi; }
if [[ "${ONLY:-}" == decode ]]; then
    export WGPU_BACKEND="${WGPU_BACKEND:-vulkan}" XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp/xdg}"
    mkdir -p "$XDG_RUNTIME_DIR"
    for r in $(seq 1 "$rounds"); do
        echo "== round $r/$rounds (decode)" >&2
        line="$("$py" scripts/torch_decode.py --model "$gpt2" --threads 2 --seq 16 --decode-tokens 64 --runs 5 2>/dev/null | grep '^{')"
        for be in $backends; do
            # PyTorch CPU is the peer of every backend's row.
            echo "$line" | sed -e "s/\"case\": \"[a-z0-9_]*\"/\"case\": \"$(dcase "$be")\"/" | tag "$r" pytorch
        done
        for lb in "$@"; do
            label="${lb%%=*}" bin="${lb#*=}"
            for be in $backends; do
                "$bin" bench model --model "$gpt2" --backend "$be" --seq 16 --iters 3 --decode-tokens 64 --json |
                    sed -e "s/^{/{\"case\":\"$(dcase "$be")\",/" | tag "$r" "$label"
            done
        done
    done
    rounds=0
fi

for r in $(seq 1 "$rounds"); do
    echo "== round $r/$rounds" >&2
    "$py" "$peers/torch_minilm.py" --model "$minilm" --runs 10 | grep '^{' | tag "$r" pytorch
    "$py" "$peers/torch_attention.py" --seqs 1024,2048 --runs 10 | grep '^{' | tag "$r" pytorch
    for lb in "$@"; do
        label="${lb%%=*}" bin="${lb#*=}"
        "$bin" bench model --model "$minilm" --backend cpu --batch 32 --iters 3 --decode-tokens 0 --json |
            sed -e 's/^{/{"case":"minilm_b32_s128",/' | tag "$r" "$label"
        "$bin" bench model --model "$minilm" --backend cpu --batch 1 --iters 10 --decode-tokens 0 --json |
            sed -e 's/^{/{"case":"minilm_b1_s128",/' | tag "$r" "$label"
        "$bin" bench attention --backend cpu --seq 1024,2048 --variants fused --iters 10 --json | tag "$r" "$label"
        "$bin" bench model --model "$gpt2" --backend cpu --seq 16 --iters 3 --decode-tokens 64 --json |
            sed -e 's/^{/{"case":"tiny_gpt2_decode_ms_per_token",/' | tag "$r" "$label"
    done
done

python3 - "$raw" "$@" > "$out/table.md" <<'EOF'
import json, sys
raw, labels = sys.argv[1], [a.split("=", 1)[0] for a in sys.argv[2:]]
best = {}  # (case, label) -> min over rounds of the round's median
for line in open(raw):
    d = json.loads(line)
    case = d.get("case") or ""
    if case.startswith("tiny_gpt2_decode_ms_per_token"):
        v = (d.get("decode") or {}).get("per_token_ms_median")
    elif d.get("system") == "pytorch-cpu" or "median_ms" in d:
        v = d.get("median_ms")
    else:
        v = d.get("forward_ms_median")
    if v is None or not case:
        continue
    key = (case, d["label"])
    best[key] = min(best.get(key, float("inf")), v)
cases = sorted({c for c, _ in best})
cols = ["pytorch"] + labels
print("| case (ms, min of per-round medians) | " + " | ".join(cols) + " | " +
      " | ".join(f"{l} vs PyTorch" for l in labels) + " |")
print("| --- " * (1 + len(cols) + len(labels)) + "|")
for c in cases:
    vals = [best.get((c, l)) for l in cols]
    cells = ["—" if v is None else f"{v:.3f}" if v < 1 else f"{v:.1f}" for v in vals]
    pt = vals[0]
    ratios = ["—" if (pt is None or v is None) else f"{pt / v:.2f}×" for v in vals[1:]]
    print(f"| {c} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
EOF
cat "$out/table.md"
