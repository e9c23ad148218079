#!/usr/bin/env bash
# The README's benchmark tables, measured in one run (release): `transfuse bench model` on
# MiniLM (cpu 32×128 and 1×128, wgpu 1×128) and tiny GPT-2 (forward and decode, cpu and wgpu)
# into OUT/models.jsonl; `transfuse bench attention` on cpu and wgpu (causal and none, f32;
# f16 on wgpu; decode) into OUT/attention.jsonl with the plots as OUT/*.svg; then the PyTorch
# CPU peers (../shared/peers/torch_attention.py, torch_minilm.py) when a Python with torch is
# given, appended to the same files.
#
#     scripts/bench.sh OUT [SEQS] [TORCH_PYTHON]
#     scripts/bench.sh /tmp/bench 128,512,1024,2048 /tmp/oracle/venv/bin/python
#
# Nothing else should run meanwhile: every system uses both cores.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out="${1:?usage: scripts/bench.sh OUT [SEQS] [TORCH_PYTHON]}"
seqs="${2:-128,512,1024,2048}"
torch_py="${3:-}"
iters="${ITERS:-5}"
mkdir -p "$out"
export WGPU_BACKEND="${WGPU_BACKEND:-vulkan}"
if [[ -z "${XDG_RUNTIME_DIR:-}" ]]; then
    export XDG_RUNTIME_DIR="${TMPDIR:-/tmp}/transfuse-xdg-$(id -u)"
    mkdir -p "$XDG_RUNTIME_DIR" && chmod 700 "$XDG_RUNTIME_DIR"
fi
cargo build --release --quiet
bin=target/release/transfuse
: > "$out/attention.jsonl"
: > "$out/models.jsonl"
minilm="$(bash scripts/fetch-minilm.sh | tail -n 1)"
gpt2=tests/fixtures/tiny_gpt2/model
model() { # ARGS...: one bench model JSON object appended
    echo "== bench model $*" >&2
    "$bin" bench model "$@" --json | tee -a "$out/models.jsonl"
}
model --model "$minilm" --backend cpu --batch 32 --seq 128 --iters 3
model --model "$minilm" --backend cpu --batch 1 --seq 128 --iters 10
model --model "$minilm" --backend wgpu --batch 1 --seq 128 --iters 3
model --model "$gpt2" --backend cpu --batch 1 --seq 16 --iters 10 --decode-tokens 64
model --model "$gpt2" --backend wgpu --batch 1 --seq 16 --iters 10 --decode-tokens 64
run() { # NAME ARGS...: the JSON lines appended (and shown), the plot as NAME.svg
    local name="$1"
    shift
    echo "== $name: bench attention $*" >&2
    "$bin" bench attention "$@" --iters "$iters" --warmup 1 --json --plot "$out/$name.svg" |
        tee -a "$out/attention.jsonl"
}
run cpu_causal --backend cpu --mask causal --seq "$seqs" --variants fused,unfused,primitive
run cpu_none --backend cpu --mask none --seq "$seqs"
run wgpu_causal --backend wgpu --mask causal --seq "$seqs" --variants fused,unfused,primitive
run wgpu_none --backend wgpu --mask none --seq "$seqs"
run wgpu_causal_f16 --backend wgpu --mask causal --seq "$seqs" --dtype f16
run cpu_decode --backend cpu --decode --past 0,1,37,1024,4096
run wgpu_decode --backend wgpu --decode --past 0,1,37,1024,4096
if [[ -n "$torch_py" ]]; then
    echo "== pytorch-cpu peer" >&2
    "$torch_py" ../shared/peers/torch_attention.py --seqs "$seqs" --runs 10 | tee -a "$out/attention.jsonl"
    "$torch_py" ../shared/peers/torch_minilm.py --model "$minilm" --runs 5 | tee -a "$out/models.jsonl"
fi
echo "wrote $out" >&2
