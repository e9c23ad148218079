#!/bin/bash
# Usage: scripts/tune-bench.sh [OUTDIR] after `cargo build --release`; prints JSON lines and tables.
# One run, side by side: attention and MiniLM on wgpu (lavapipe) with the old fixed defaults,
# the shape-aware defaults and tuned kernels.
set -u
T=${TRANSFUSE:-target/release/transfuse}
M=${TRANSFUSE_MINILM_DIR:?set TRANSFUSE_MINILM_DIR (scripts/fetch-minilm.sh)}
export WGPU_BACKEND=vulkan XDG_RUNTIME_DIR=/tmp/xdg
OUT=${1:-/tmp/tunebench}; E=$OUT/empty; C=$OUT/cache
rm -rf $E $C; mkdir -p $E $C
A="bench attention --backend wgpu --seq 1024 --batch 1 --heads 12 --head-dim 64 --mask causal --dtype f32 --iters 5 --warmup 1 --variants fused,unfused --json"
echo "== attention, fixed defaults"; TRANSFUSE_FIXED_DEFAULTS=1 TRANSFUSE_CACHE_DIR=$E $T $A
echo "== attention, shape-aware defaults"; TRANSFUSE_CACHE_DIR=$E $T $A
echo "== attention, tuned (60 s per variant)"; TRANSFUSE_CACHE_DIR=$C $T $A --tune --tune-budget 60
echo "== attention, tuned again (cache warm)"; TRANSFUSE_CACHE_DIR=$C $T $A --tune --tune-budget 60
B="bench model --model $M --backend wgpu --batch 1 --seq 128 --iters 5 --warmup 1 --json"
echo "== minilm, fixed defaults"; TRANSFUSE_FIXED_DEFAULTS=1 TRANSFUSE_CACHE_DIR=$E $T $B
echo "== minilm, shape-aware defaults"; TRANSFUSE_CACHE_DIR=$E $T $B
echo "== minilm tune"; TRANSFUSE_CACHE_DIR=$C $T tune --model $M --backend wgpu --dims batch=1,seq=128 --budget 150 --kernel-budget 30
echo "== minilm, tuned"; TRANSFUSE_CACHE_DIR=$C $T $B -v
