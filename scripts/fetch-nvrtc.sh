#!/usr/bin/env bash
# Fetch NVRTC (the CUDA run-time compiler) and the CUDA headers that generated kernels include
# (cuda_fp16.h, cuda_bf16.h, ...) into the transfuse cache, from pinned PyPI wheels:
#
#   nvidia-cuda-nvrtc-cu12==12.9.86    libnvrtc.so.12 (+ its builtins), under nvidia/cuda_nvrtc/lib
#   nvidia-cuda-runtime-cu12==12.9.79  the CUDA headers, under nvidia/cuda_runtime/include
#                                      (NVRTC 12.9 has no built-in cuda_fp16.h / cuda_bf16.h)
#
# Pinned with sha256 hashes: the unpinned nvrtc wheel is CUDA 13. No GPU or driver is needed.
# Idempotent: when both are already installed nothing is downloaded. Progress goes to stderr;
# stdout is two lines, the include folder and then, last, the library folder, so
#
#     export LD_LIBRARY_PATH="$(scripts/fetch-nvrtc.sh | tail -n1)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
#
# works (scripts/test.sh also exports TRANSFUSE_NVRTC_LIB and TRANSFUSE_CUDA_INCLUDE, which
# transfuse_runtime::nvrtc reads). The cache root is $TRANSFUSE_CACHE (default:
# ~/.cache/transfuse); the wheels land in $TRANSFUSE_CACHE/nvrtc.
set -euo pipefail

NVRTC_VERSION="12.9.86"
RUNTIME_VERSION="12.9.79"
# One hash per platform wheel on PyPI (Linux x86_64, Linux aarch64).
REQUIREMENTS="nvidia-cuda-nvrtc-cu12==$NVRTC_VERSION \\
    --hash=sha256:210cf05005a447e29214e9ce50851e83fc5f4358df8b453155d5e1918094dcb4 \\
    --hash=sha256:096d4de6bda726415dfaf3198d4f5c522b8e70139c97feef5cd2ca6d4cd9cead
nvidia-cuda-runtime-cu12==$RUNTIME_VERSION \\
    --hash=sha256:25bba2dfb01d48a9b59ca474a1ac43c6ebf7011f1b0b8cc44f54eb6ac48a96c3 \\
    --hash=sha256:83469a846206f2a733db0c42e223589ab62fd2fabac4432d2f8802de4bded0a4
"

CACHE_ROOT="${TRANSFUSE_CACHE:-$HOME/.cache/transfuse}"
DEST="$CACHE_ROOT/nvrtc"
LIB_DIR="$DEST/nvidia/cuda_nvrtc/lib"
INCLUDE_DIR="$DEST/nvidia/cuda_runtime/include"

log() { echo "fetch-nvrtc: $*" >&2; }
die() { echo "fetch-nvrtc: error: $*" >&2; exit 1; }

# installed ROOT: true when ROOT holds both pinned wheels, complete.
installed() {
    [[ -f "$1/nvidia/cuda_nvrtc/lib/libnvrtc.so.12" ]] &&
        [[ -f "$1/nvidia/cuda_runtime/include/cuda_fp16.h" ]] &&
        [[ -f "$1/nvidia/cuda_runtime/include/cuda_bf16.h" ]] &&
        [[ -d "$1/nvidia_cuda_nvrtc_cu12-$NVRTC_VERSION.dist-info" ]] &&
        [[ -d "$1/nvidia_cuda_runtime_cu12-$RUNTIME_VERSION.dist-info" ]]
}

if installed "$DEST"; then
    log "cached: $DEST"
else
    [[ "$(uname -s)" == Linux ]] || die "only Linux is supported (the wheels are manylinux)"
    command -v python3 >/dev/null 2>&1 || die "python3 is required (for pip)"
    python3 -m pip --version >/dev/null 2>&1 || die "python3 -m pip is required"

    mkdir -p "$CACHE_ROOT"
    TMP="$(mktemp -d "$CACHE_ROOT/nvrtc.partial.XXXXXX")" # same filesystem: the final mv is atomic
    trap 'rm -rf "$TMP"' EXIT
    printf '%s' "$REQUIREMENTS" >"$TMP/requirements.txt"

    log "installing nvidia-cuda-nvrtc-cu12==$NVRTC_VERSION and nvidia-cuda-runtime-cu12==$RUNTIME_VERSION from PyPI"
    python3 -m pip install --no-deps --disable-pip-version-check --no-input --quiet \
        --only-binary=:all: --require-hashes --target "$TMP/root" -r "$TMP/requirements.txt" >&2 ||
        die "pip install of the NVRTC wheels failed"
    installed "$TMP/root" || die "the wheels installed, but libnvrtc.so.12 or cuda_fp16.h/cuda_bf16.h is missing"

    rm -rf "$DEST"
    mv "$TMP/root" "$DEST"
    log "installed: $DEST"
fi

echo "$INCLUDE_DIR"
echo "$LIB_DIR"
