#!/usr/bin/env bash
# Issue 15 item 10's ranking check: for each model and backend, the optimizer's estimated cost
# (compile --json cost_after under the backend's profile) and the measured forward time
# (bench model) with and without the attention family (TRANSFUSE_EGRAPH_WITHOUT=attention),
# side by side in one run. Usage: scripts/rank-check.sh TRANSFUSE_BIN MODEL_DIR...
# Prints one line per (model, backend): estimated and measured unfused/fused ratios.
set -euo pipefail
bin="$1"; shift
export TRANSFUSE_CACHE_DIR="${TRANSFUSE_CACHE_DIR:-$(mktemp -d)}" # defaults, no tuning cache
for model in "$@"; do
    for backend in cpu wgpu; do
        profile=cpu; [[ $backend == wgpu ]] && profile=cpu-adapter
        est() { "$bin" compile --model "$model" --profile "$profile" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["cost_after"])'; }
        ms() { "$bin" bench model --model "$model" --backend "$backend" --batch 1 --seq 128 --iters 7 --decode-tokens 0 --json | python3 -c 'import json,sys; d=json.load(sys.stdin); print(d["forward_resident_ms_median"])'; }
        ef=$(est); eu=$(TRANSFUSE_EGRAPH_WITHOUT=attention est)
        mf=$(ms); mu=$(TRANSFUSE_EGRAPH_WITHOUT=attention ms); mf2=$(ms)
        python3 - "$model" "$backend" "$profile" "$ef" "$eu" "$mf" "$mu" "$mf2" <<'PY'
import sys
m, b, p, ef, eu, mf, mu, mf2 = sys.argv[1:]
ef, eu, mf, mu, mf2 = map(float, (ef, eu, mf, mu, mf2))
mfb = min(mf, mf2)
same = (eu > ef) == (mu > mfb)
print(f"{m}\t{b}\t{p}\test fused {ef*1e3:.3f} ms unfused {eu*1e3:.3f} ms ({eu/ef:.2f}x)\tmeasured fused {mfb:.2f} ms unfused {mu:.2f} ms ({mu/mfb:.2f}x)\tsame ranking: {same}")
PY
    done
done
