#!/usr/bin/env bash
# GPU checks of masa, run by hand (or by CI) on a machine with a CUDA GPU; CPU tests do not need it.
#
#   scripts/gpu_check.sh            # every section
#   scripts/gpu_check.sh infer      # only the named sections
#
# Each section is one function check_<name>, owned by the issue that added it; it writes its results
# under $OUT/<name> (default OUT=runs/gpu_check) and fails the script when its check fails.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}
PY=${PY:-python}
export PYTHONPATH=${PYTHONPATH:-$PWD/src}

# infer (issue 11): `masa bench infer` on CUDA for a synthetic 1B-shape Llama compressed at 40 % by
# svd-llm and masa, both runtime modes; prints the table (resident/peak bytes, prefill and decoding
# speed as ratios to the original). About 5-8 minutes on one H200; capped at 9.
check_infer() {
  local dir="$OUT/infer"
  mkdir -p "$dir"
  timeout 540 "$PY" docs/results/infer/build_models.py "$dir/models" --shape 1b --device cuda \
    --ratios 0.4 --methods svd-llm masa
  timeout 300 "$PY" -m masa.cli bench infer "$dir/models/original" "$dir/models/svd-llm-40" \
    "$dir/models/masa-40" --runtime compact dense --device cuda --batch 8 --prompt-len 256 \
    --new-tokens 32 --rounds 3 --out "$dir/results"
}

sections=("$@")
[ ${#sections[@]} -eq 0 ] && sections=(infer)
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU visible: nothing to check')"
for name in "${sections[@]}"; do
  echo "== gpu_check: $name"
  "check_$name"
done
