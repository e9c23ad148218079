#!/usr/bin/env bash
# The first-run check of the CUDA backend on a machine with an NVIDIA GPU and no Rust
# toolchain: runs the binaries scripts/gpu-pack.sh built elsewhere, and writes ONE report
# (every step's command, exit status, wall time and output tail) to
# $OUT/gpu-check-report.txt, with the full logs in $OUT/gpu-check-logs.tar.gz ($OUT defaults to
# ./gpu-check-out).
#
#   bash scripts/gpu-check.sh [PACK]        # from the repository root; PACK defaults to gpu-pack
#
# With this workplace's device tool: run scripts/gpu-pack.sh here, then one call with
# carry ["gpu-pack"], command `bash scripts/gpu-check.sh gpu-pack`, timeout_s 540; the report
# and the log archive come back from $OUT (2 files).
#
# Steps (each under its own `timeout`, all within GPU_CHECK_BUDGET seconds, default 470, so
# the whole run ends inside 8 minutes; a step that no longer fits is reported as skipped):
#   env          nvidia-smi, the libraries found, glibc here vs what the binaries need
#   test-cuda    runtime/tests/cuda.rs with TRANSFUSE_REQUIRE=cuda (device, launches, parity
#                with the CPU backend in f32/f16/bf16, event timing, the disk kernel cache)
#   test-nvrtc   runtime/tests/nvrtc.rs with TRANSFUSE_REQUIRE=nvrtc
#   model-*      `transfuse bench model --backend cuda` on tiny GPT-2 and tiny LLaMA
#   attn-*       `transfuse bench attention --backend cuda`, seq 1024..8192, head dims 64 and
#                128, f16 and bf16, causal and none (each case checked against f64 first)
#   test-nccl    the NCCL tests of runtime/tests/cuda.rs (`nccl_`) with TRANSFUSE_REQUIRE=cuda,nccl:
#                a world-size-1 communicator (all-reduce, all-gather, reduce-scatter, on host
#                slices and device buffers, then an abort), a world-size-1 DeviceSegments (a
#                CUDA rank's program running every collective with NCCL on its own buffers,
#                against the CPU backend); with 2+ GPUs also two ranks, an injected failure
#                ending the other rank and a timeout
#   tp-nccl      tests/gpu_parity.rs `nccl_tp::`: TP 1 over NCCL (and TP 2 on 2+ GPUs) against the
#                fixtures, every collective logged as run on device buffers (the device path,
#                no host copy of the activations), and more ranks than devices as a usage error
#   cli-tp-nccl  `transfuse generate --tp 1 --nnodes 1 --backend cuda` (TP 1 over NCCL) against
#                `--backend cpu`, greedy ids exact; with 2+ GPUs `--tp 2 --backend cuda`, and two
#                processes (`--nnodes 2`, one GPU each, a rendezvous file) doing the same
#   test-gpu_parity, test-codegen_nvrtc
#   tune         `transfuse tune` on tiny GPT-2, when the binary has that subcommand
#
# CUDA 13 libraries: NVRTC is looked for by transfuse itself (libnvrtc.so.13 or .so.12, see
# transfuse_runtime::nvrtc::library_candidates); this script also finds it (CUDA_HOME,
# /usr/local/cuda, the python3 NVIDIA wheels) and exports TRANSFUSE_NVRTC_LIB, the matching
# TRANSFUSE_CUDA_INCLUDE and LD_LIBRARY_PATH (with a private folder holding a `libnvrtc.so` link
# for loaders that only know that name). NCCL likewise: libnccl.so.2 is looked for in
# TRANSFUSE_NCCL_LIB, NCCL_HOME, the python3 wheels (PyTorch's nvidia/nccl/lib), CUDA's and the
# system's library folders and ldconfig's cache, and TRANSFUSE_NCCL_LIB is exported to the file
# found (transfuse searches much the same places itself, see
# transfuse_runtime::nccl::library_candidates). Without a GPU every step fails fast; the report
# is written all the same.
set -uo pipefail

pack="${1:-gpu-pack}"
out="${OUT:-$PWD/gpu-check-out}"
budget="${GPU_CHECK_BUDGET:-470}"
mkdir -p "$out"
work="$(mktemp -d /tmp/gpu-check.XXXXXX)"
mkdir -p "$work/bin" "$work/logs" "$work/lib" "$work/cache"
report="$out/gpu-check-report.txt"
start=$SECONDS
: >"$report"
say() { echo "$*" | tee -a "$report"; }

say "# transfuse gpu-check, $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname 2>/dev/null || echo '?')"
say "pack: $pack; budget: ${budget}s"
[[ -f "$pack/MANIFEST" ]] && { say "## MANIFEST"; cat "$pack/MANIFEST" >>"$report"; } || say "no $pack/MANIFEST: run scripts/gpu-pack.sh first (where cargo is)"

# --- unpack -------------------------------------------------------------------------------
for f in "$pack"/bin/*.xz; do
    [[ -e "$f" ]] || continue
    name="$(basename "$f" .xz)"
    if xz -dc "$f" >"$work/bin/$name"; then chmod +x "$work/bin/$name"; else say "could not unpack $f"; fi
done
say "binaries: $(ls "$work/bin" | tr '\n' ' ')"
fixtures="$PWD/tests/fixtures"
if [[ -f "$pack/fixtures.tar.xz" ]]; then
    tar -C "$work" -xJf "$pack/fixtures.tar.xz" && fixtures="$work/fixtures"
fi
export TRANSFUSE_FIXTURES_DIR="$fixtures"

# --- CUDA libraries (CUDA 13 or 12) ---------------------------------------------------------
site="$(timeout 20 python3 -c 'import site,sys; print("\n".join(site.getsitepackages()+[site.getusersitepackages()]))' 2>/dev/null || true)"
lib_dirs=()
for d in "${TRANSFUSE_NVRTC_LIB:-}" "${CUDA_HOME:+$CUDA_HOME/lib64}" "${CUDA_PATH:+$CUDA_PATH/lib64}" \
    /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
    [[ -n "$d" ]] && lib_dirs+=("$d")
done
while IFS= read -r sp; do
    [[ -n "$sp" ]] && lib_dirs+=("$sp/nvidia/cu13/lib" "$sp/nvidia/cuda_nvrtc/lib")
done <<<"$site"
nvrtc=""
for d in "${lib_dirs[@]}"; do
    for n in libnvrtc.so.13 libnvrtc.so.12; do
        if [[ -z "$nvrtc" && -e "$d/$n" ]]; then nvrtc="$d/$n"; fi
    done
done
if [[ -n "$nvrtc" ]]; then
    nvrtc_dir="$(dirname "$(readlink -f "$nvrtc")")"
    export TRANSFUSE_NVRTC_LIB="$nvrtc_dir"
    ln -sf "$(readlink -f "$nvrtc")" "$work/lib/libnvrtc.so"
    say "NVRTC: $nvrtc (folder $nvrtc_dir)"
else
    say "NVRTC: not found in ${lib_dirs[*]}"
fi
inc=""
for d in "${TRANSFUSE_CUDA_INCLUDE:-}" "${CUDA_HOME:+$CUDA_HOME/include}" /usr/local/cuda/include \
    $(while IFS= read -r sp; do [[ -n "$sp" ]] && echo "$sp/nvidia/cu13/include $sp/nvidia/cuda_runtime/include"; done <<<"$site"); do
    if [[ -z "$inc" && -n "$d" && -f "$d/cuda_fp16.h" ]]; then inc="$d"; fi
done
[[ -n "$inc" ]] && export TRANSFUSE_CUDA_INCLUDE="$inc"
say "CUDA headers: ${inc:-not found}"
nccl=""
for d in "${TRANSFUSE_NCCL_LIB:-}" "${NCCL_HOME:+$NCCL_HOME/lib}" \
    $(while IFS= read -r sp; do [[ -n "$sp" ]] && echo "$sp/nvidia/nccl/lib $sp/nvidia/cu13/lib"; done <<<"$site") \
    /usr/local/cuda/lib64 /usr/lib/x86_64-linux-gnu /usr/lib/aarch64-linux-gnu /usr/lib64 /usr/local/nccl/lib; do
    [[ -z "$nccl" && -n "$d" ]] || continue
    if [[ -f "$d" ]]; then nccl="$d"; elif [[ -e "$d/libnccl.so.2" ]]; then nccl="$d/libnccl.so.2"; fi
done
if [[ -z "$nccl" ]]; then
    nccl="$(ldconfig -p 2>/dev/null | sed -n 's/^[[:space:]]*libnccl\.so\.2 .*=> //p' | head -n1)"
fi
if [[ -n "$nccl" ]]; then
    export TRANSFUSE_NCCL_LIB="$(readlink -f "$nccl")"
    say "NCCL: $nccl (TRANSFUSE_NCCL_LIB=$TRANSFUSE_NCCL_LIB)"
else
    say "NCCL: libnccl.so.2 not found (the NCCL steps will fail)"
fi
driver_dirs=""
for d in /usr/local/nvidia/lib64 /usr/local/nvidia/lib /usr/lib/x86_64-linux-gnu /usr/lib64; do
    [[ -e "$d/libcuda.so.1" ]] && driver_dirs="$driver_dirs:$d"
done
export LD_LIBRARY_PATH="$work/lib${TRANSFUSE_NVRTC_LIB:+:$TRANSFUSE_NVRTC_LIB}$driver_dirs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
say "libcuda.so.1 in: ${driver_dirs#:}"
say "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
export TRANSFUSE_CACHE_DIR="$work/cache" # a fresh tuning + kernel cache
export RUST_BACKTRACE=0 # short failure tails in the report
unset TRANSFUSE_MINILM_DIR

# --- steps ----------------------------------------------------------------------------------
summary=()
# step NAME TIMEOUT COMMAND: runs COMMAND (bash) under timeout, within the remaining budget.
step() {
    local name="$1" limit="$2" cmd="$3"
    local left=$((budget - (SECONDS - start)))
    if ((left < 10)); then
        say ""
        say "## $name: skipped (budget spent)"
        summary+=("skip  $name")
        return
    fi
    ((limit > left)) && limit=$left
    local log="$work/logs/$name.log" t0=$SECONDS
    timeout -k 5 "$limit" bash -c "$cmd" >"$log" 2>&1 </dev/null
    local rc=$? wall=$((SECONDS - t0))
    local verdict=ok
    ((rc != 0)) && verdict=FAIL
    ((rc == 124 || rc == 137)) && verdict="TIMEOUT"
    summary+=("$(printf '%-7s %-22s rc=%-3s %4ss' "$verdict" "$name" "$rc" "$wall")")
    {
        echo ""
        echo "## $name: $verdict (rc=$rc, ${wall}s, limit ${limit}s)"
        echo "\$ $cmd"
        tail -n "${TAIL_LINES:-60}" "$log"
    } >>"$report"
    echo "gpu-check: $name: $verdict (rc=$rc, ${wall}s)" >&2
}
B="$work/bin"
T="$B/transfuse"
step env 30 "nvidia-smi; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv;
    uname -a; ldd --version | head -n1; grep -h 'needs GLIBC' '$pack/MANIFEST' 2>/dev/null;
    ldconfig -p | grep -E 'libcuda\\.so|libnvrtc' ; ls -la /usr/local/cuda/lib64/libnvrtc* 2>&1 | head;
    env | grep -E '^(TRANSFUSE|CUDA|LD_LIBRARY)' | sort"
step test-cuda 120 "TRANSFUSE_REQUIRE=cuda '$B/test-cuda' --nocapture"
step test-nvrtc 45 "TRANSFUSE_REQUIRE=nvrtc '$B/test-nvrtc'"
step model-gpt2 45 "'$T' bench model --model '$fixtures/tiny_gpt2/model' --backend cuda --seq 64 --iters 5 --decode-tokens 32 -v"
# NCCL: the communicator on its own, TP over it in the library, then through the CLI.
gpus="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
say ""
say "GPUs: ${gpus:-0}"
step test-nccl 90 "TRANSFUSE_REQUIRE=cuda,nccl TRANSFUSE_TP_TIMEOUT=60 '$B/test-cuda' nccl_ --nocapture"
step tp-nccl 90 "TRANSFUSE_REQUIRE=cuda,nccl '$B/test-gpu_parity' nccl_tp:: --nocapture"
cat >"$work/cli-tp-nccl.sh" <<'EOS'
# Arguments in the environment: T (transfuse), M (tiny GPT-2), W (a scratch folder), GPUS.
set -uo pipefail
gen() { "$T" generate --model "$M" --prompt-ids 1,2,3,4 --max-new-tokens 8 --json "$@"; }
ids() { grep -o '"ids":\[[^]]*\]'; }
want="$(gen --backend cpu | ids)"; echo "cpu:        $want"
[[ -n "$want" ]] || { echo "no ids from the cpu backend"; exit 1; }
rc=0
got="$(gen --backend cuda --tp 1 --nnodes 1 -v | ids)"; echo "tp 1 nccl:  $got"
[[ "$got" == "$want" ]] || { echo "MISMATCH at tp 1 over NCCL"; rc=1; }
if ((GPUS >= 2)); then
    got="$(gen --backend cuda --tp 2 -v | ids)"; echo "tp 2 nccl:  $got"
    [[ "$got" == "$want" ]] || { echo "MISMATCH at tp 2"; rc=1; }
    # Two processes, one GPU each, meeting through a rendezvous file.
    rm -f "$W/rdv"
    CUDA_VISIBLE_DEVICES=0 gen --backend cuda --tp 2 --nnodes 2 --node-rank 0 --rendezvous "$W/rdv" >"$W/n0.json" 2>"$W/n0.err" &
    p0=$!
    CUDA_VISIBLE_DEVICES=1 gen --backend cuda --tp 2 --nnodes 2 --node-rank 1 --rendezvous "$W/rdv" >"$W/n1.json" 2>"$W/n1.err"
    r1=$?
    wait "$p0"
    r0=$?
    cat "$W/n0.err" "$W/n1.err"
    for n in 0 1; do
        got="$(ids <"$W/n$n.json")"; echo "2 processes, node $n: $got"
        [[ "$got" == "$want" ]] || { echo "MISMATCH on node $n (exit $r0 / $r1)"; rc=1; }
    done
    [[ -e "$W/rdv" ]] && { echo "the rendezvous file was not removed"; rc=1; }
else
    echo "one GPU: TP 2 and the two-process run need two (not run)"
fi
if ((GPUS < 4)); then
    # More ranks than devices: one clean error naming --tp, exit 2.
    gen --backend cuda --tp 4 2>&1 | tail -n1
    e=${PIPESTATUS[0]}
    echo "tp 4 on $GPUS GPUs: exit $e"
    ((e == 2)) || rc=1
fi
exit $rc
EOS
step cli-tp-nccl 90 "T='$T' M='$fixtures/tiny_gpt2/model' W='$work' GPUS='${gpus:-0}' bash '$work/cli-tp-nccl.sh'"
seqs=1024,2048,4096,8192
attn() { step "attn-$1-d$2-$3" 45 "'$T' bench attention --backend cuda --seq $seqs --head-dim $2 --dtype $1 --mask $3 --iters 5 --warmup 1"; }
attn f16 64 causal
attn bf16 128 causal
attn f16 64 none
attn bf16 128 none
step test-gpu_parity 120 "TRANSFUSE_REQUIRE=cuda '$B/test-gpu_parity' cuda::"
step model-llama 45 "'$T' bench model --model '$fixtures/tiny_llama/model' --backend cuda --seq 64 --iters 5 --decode-tokens 32 -v"
step model-bert 30 "'$T' bench model --model '$fixtures/tiny_bert/model' --backend cuda --batch 4 --seq 64 --iters 5 -v"
if "$T" tune --help >/dev/null 2>&1; then
    step tune-gpt2 75 "'$T' tune --help | head -n 40; '$T' tune --model '$fixtures/tiny_gpt2/model' --backend cuda --budget 45"
else
    say ""
    say "## tune: this transfuse has no \`tune\` subcommand; skipped"
    summary+=("skip  tune (no subcommand)")
fi
attn f16 128 causal
attn bf16 64 causal
attn f16 128 none
attn bf16 64 none
step test-codegen_nvrtc 45 "TRANSFUSE_REQUIRE=nvrtc '$B/test-codegen_nvrtc'"

{
    echo ""
    echo "## summary ($((SECONDS - start))s of ${budget}s)"
    printf '%s\n' "${summary[@]}"
} >>"$report"
tar -C "$work" -czf "$out/gpu-check-logs.tar.gz" logs
printf '%s\n' "${summary[@]}" >&2
echo "gpu-check: report: $report (full logs: $out/gpu-check-logs.tar.gz)" >&2
rm -rf "$work"
# The exit status: 0 only when every step that ran passed.
! printf '%s\n' "${summary[@]}" | grep -qE '^(FAIL|TIMEOUT)'
