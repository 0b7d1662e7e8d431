#!/usr/bin/env bash
# The one-call GPU check (bench/gpu_check.py says what each step measures): bench/gpu_check.sh OUT_DIR [--dry-run]
# On a CUDA machine: under 8 minutes, one JSON per step and OUT_DIR/summary.md. --dry-run: the same steps at tiny size
# on the CPU, in a few minutes. Uses .venv when it is there (carried with the repository or made by `make setup`),
# else makes it from requirements.txt first and records how long that took.
set -euo pipefail
cd "$(dirname "$0")/.."
out="" dry=""
for arg in "$@"; do
  case "$arg" in
    --dry-run) dry="--dry-run" ;;
    -h|--help) sed -n 2,5p "$0"; exit 0 ;;
    *) out="$arg" ;;
  esac
done
[ -n "$out" ] || { echo "usage: bench/gpu_check.sh OUT_DIR [--dry-run]"; exit 2; }
if [ -z "$dry" ] && ! { command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; }; then
  echo "error: no CUDA GPU here (nvidia-smi finds none): run on a GPU machine, or add --dry-run to run the steps on the CPU"
  exit 1
fi
setup="the existing .venv"
if [ ! -x .venv/bin/python ]; then
  started=$(date +%s)
  python3 -m venv .venv
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
  setup="made .venv from requirements.txt in $(( $(date +%s) - started )) s"
fi
export PATH="$PWD/.venv/bin:$PATH" DVC_NO_ANALYTICS=1 HF_HUB_DISABLE_TELEMETRY=1 HF_HUB_OFFLINE=1
exec .venv/bin/python bench/gpu_check.py "$out" $dry --setup "$setup"
