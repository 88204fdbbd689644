#!/usr/bin/env bash
# Run every benchmark on a GPU machine in one go and print all tables last, for bench/RESULTS.md.
#
#   bash bench/gpu_suite.sh                 # from the repository root, on a machine with a CUDA GPU
#   OUT=/tmp/bench bash bench/gpu_suite.sh  # keep the logs somewhere else
#
# Installs nothing: run `pip install -c constraints.txt -e .` first (and
# scripts/install_fast_transformers.sh, or `pip install flash-linear-attention`, for those backends).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench/out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1

python3 - <<'PY' | tee "$out/device.txt"
import torch
name = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device (CPU run)"
print(f"device: {name}; torch {torch.__version__}")
PY

status=0
run() {  # name, command...
  local name=$1; shift
  echo "== $name: $*"
  if ! "$@" 2>&1 | tee "$out/$name.log"; then
    echo "!! $name failed (see $out/$name.log)"; status=1
  fi
}
run attention   python3 bench/attention.py --device cuda --dtype bf16
run train_speed python3 bench/train_speed.py --device cuda
run sample      python3 bench/sample_speed.py --device cuda --full
run prep        python3 bench/prep_speed.py

echo
echo "================ tables ($(cat "$out/device.txt"), $(date -u +%Y-%m-%d)) ================"
for name in attention train_speed sample prep; do
  echo; echo "### $name"
  grep -E '^\|' "$out/$name.log" || echo "(no table: see $out/$name.log)"
done
exit $status
