#!/usr/bin/env bash
# scripts/gpu_check.sh: the one GPU check of masa. Run it when a GPU is at hand, never in CI.
#
#   scripts/gpu_check.sh [--only compress|infer|train] [--device cuda:0]
#
# Runs from a plain checkout (no install, no network) as PYTHONPATH=src python3 -m masa.cli ..., on
# whatever torch and transformers the machine has. Each section is one function below with its own
# time cap (CAPS below: 150 + 120 + 90 s, 6 minutes in all) and writes its
# results as JSON under $OUT/<section>/ ($OUT defaults to ./gpu_check_out). A section that fails or
# runs out of time is reported and the next one still runs; the exit status is 1 if any failed.
#
# Sections:
#   compress  synthetic Llama of the 1B shape (d=2048, 16 blocks, FFN 8192, vocab 32k, random bf16
#             weights) compressed --low-memory with svd-llm and masa (all-linear, 20 %); prints wall
#             time per phase and peak GPU memory (masa bench scale --shapes 1b).
#   infer     the 1B shape compressed at 40 % by svd-llm, then `masa bench infer` on the GPU in both
#             runtime modes: resident and peak bytes, prefill and decode speed as ratios to the original.
#   train     the paper's 110M shape (`--preset full`, bf16 autocast, batch 32 x 512): one optimizer
#             step of dense, lowrank and masa-qkvo in turn, 10 rounds (`masa bench speed`); tokens/s,
#             the masa-qkvo / dense ratio, model TFLOP/s and MFU (989 TFLOP/s peak on H100/H200), peak memory.
set -uo pipefail

cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-$PWD/gpu_check_out}"
DEVICE="cuda"
ONLY=""
declare -A CAPS=([compress]=150 [infer]=120 [train]=90)  # seconds per section; 360 s in all
PY="${PYTHON:-python3}"

while [[ $# -gt 0 ]]; do
    case "$1" in
        --only) ONLY="$2"; shift 2 ;;
        --device) DEVICE="$2"; shift 2 ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
mkdir -p "$OUT"

section_compress() {
    local out="$OUT/compress"
    mkdir -p "$out"
    "$PY" -c "import json, torch, transformers; print(json.dumps({'torch': torch.__version__, 'transformers': transformers.__version__, 'gpu': torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}))" \
        2>/dev/null > "$out/versions.json" || true
    "$PY" -m masa.cli bench scale --shapes 1b --methods svd-llm masa --ratio 0.2 --targets all-linear \
        --device "$DEVICE" --dtype bfloat16 --calib-samples 32 --calib-len 256 --work "${TMPDIR:-/tmp}" --out "$out"
}

section_infer() {
    local out="$OUT/infer"
    mkdir -p "$out"
    "$PY" docs/results/infer/build_models.py "$out/models" --shape 1b --device "$DEVICE" --ratios 0.4 \
        --methods svd-llm
    "$PY" -m masa.cli bench infer "$out/models/original" "$out/models/svd-llm-40" --runtime compact dense \
        --device "$DEVICE" --batch 8 --prompt-len 256 --new-tokens 32 --rounds 3 --out "$out/results"
}

section_train() {
    local out="$OUT/train" peak=""
    mkdir -p "$out"
    case "$("$PY" -c 'import torch; print(torch.cuda.get_device_name(0))' 2>/dev/null)" in
        *H100*|*H200*) peak="--peak-tflops 989" ;;
        *A100*) peak="--peak-tflops 312" ;;
    esac
    # shellcheck disable=SC2086
    "$PY" -m masa.cli bench speed --suite table1 --preset full --methods lowrank masa-qkvo-S4 --rounds 10 \
        --device "$DEVICE" --set 'train.dtype="bfloat16"' $peak --out "$out"
    cat "$out/speed.md"
}

FAILED=0
run_section() {
    local name="$1"
    [[ -n "$ONLY" && "$ONLY" != "$name" ]] && return 0
    if ! declare -F "section_$name" > /dev/null; then
        echo "== $name: no such section in this checkout" >&2
        return 0
    fi
    local cap="${CAPS[$name]:-80}"
    echo "== $name (cap ${cap}s)"
    local start=$SECONDS
    # `timeout` cannot run a shell function: run the section in a child bash that has the functions
    export -f "section_$name"
    export OUT DEVICE PY
    timeout --kill-after=10 "$cap" bash -c "section_$name"
    local rc=$?
    echo "{\"section\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - start))}" > "$OUT/$name.status.json"
    if [[ $rc -ne 0 ]]; then
        echo "== $name failed (rc $rc$([[ $rc -eq 124 ]] && echo ', time cap reached'))" >&2
        FAILED=1
    fi
}

for section in compress infer train; do
    run_section "$section"
done
exit $FAILED
