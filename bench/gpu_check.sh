#!/usr/bin/env bash
# The one-call GPU check (bench/gpu_check.py says what each step measures): bench/gpu_check.sh OUT_DIR [--dry-run]
# On a CUDA machine: under 8 minutes, one JSON per step and OUT_DIR/summary.md, with the machine's own python3 (PYTHON=
# names another) and gpu-wheels/ (`make gpu-wheels` where PyPI is reachable; carried with the repository) installed
# into a temporary folder on PYTHONPATH: no venv, nothing downloaded. --dry-run: the same steps at tiny size on the CPU
# with .venv, in a few minutes; --system-python: the dry run through the GPU machine's set-up (bench/GPU_WHEELS.md).
set -euo pipefail
cd "$(dirname "$0")/.."
out="" dry="" system=""
for arg in "$@"; do
  case "$arg" in
    --dry-run) dry="--dry-run" ;;
    --system-python) system=1 ;;
    -h|--help) sed -n 2,6p "$0"; exit 0 ;;
    *) out="$arg" ;;
  esac
done
[ -n "$out" ] || { echo "usage: bench/gpu_check.sh OUT_DIR [--dry-run [--system-python]]"; exit 2; }
py="${PYTHON:-python3}"
[ -n "$dry" ] && [ -z "$system" ] && py=.venv/bin/python
command -v "$py" >/dev/null || { echo "error: no $py here (\`make setup\` makes the dry run's .venv)"; exit 1; }
# torch.cuda with the interpreter that will run the check: nvidia-smi is missing from some containers that have a GPU
if [ -z "$dry" ] && ! "$py" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' >/dev/null 2>&1; then
  echo "error: no CUDA GPU here (torch.cuda.is_available() is not true for $py): run on a GPU machine, or add --dry-run to run the steps on the CPU"
  exit 1
fi
site=""
if [ "$py" = .venv/bin/python ]; then
  setup="the project's .venv"
  export PATH="$PWD/.venv/bin:$PATH"
else
  [ -d gpu-wheels ] || { echo "error: no gpu-wheels/ here: run \`make gpu-wheels\` where PyPI is reachable and carry the folder (bench/GPU_WHEELS.md)"; exit 1; }
  started=$(date +%s)
  site=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check-site.XXXXXX")
  trap 'rm -rf "$site"' EXIT
  left=$("$py" scripts/gpu_wheels.py --compatible gpu-wheels 2>&1 >"$site.list") || { echo "error: ${left##*$'\n'}"; exit 1; }
  "$py" -m pip install --quiet --no-index --no-deps --no-compile --disable-pip-version-check --target "$site" \
    $(cat "$site.list") >"$site.log" 2>&1 || { echo "error: installing gpu-wheels/ failed: $(tail -1 "$site.log")"; exit 1; }
  # dvc.yaml's `python -m stages...`: a script that runs the interpreter by its own path (a link to a venv's python
  # would start the base interpreter without the venv's packages)
  mkdir -p "$site/bin" && printf '#!/bin/sh\nexec "%s" "$@"\n' "$("$py" -c 'import sys; print(sys.executable)')" \
    >"$site/bin/python" && chmod +x "$site/bin/python"
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" PATH="$site/bin:$PATH"
  if ! unmet=$("$py" scripts/gpu_wheels.py --check-installed 2>&1); then echo "${unmet##*$'\n'}"; exit 1; fi
  setup="$("$py" -c 'import sys; print(sys.executable)') with $(wc -l <"$site.list") wheels of gpu-wheels/ installed \
in $(( $(date +%s) - started )) s${left:+ ($left)}"
  rm -f "$site.list" "$site.log"
fi
export DVC_NO_ANALYTICS=1 HF_HUB_DISABLE_TELEMETRY=1 HF_HUB_OFFLINE=1
"$py" - <<'EOF'
import platform, sys
from importlib import metadata
names = ("torch", "transformers", "huggingface-hub", "accelerate", "diffusers", "dvc", "dvclive", "bitsandbytes",
         "open-clip-torch", "peft", "safetensors", "torchvision", "numpy")
found = {n: v for n in names if (v := next((d.version for d in metadata.distributions(name=n)), None))}
if missing := [n for n in names if n not in found]:
    sys.exit(f"error: {sys.executable} lacks {', '.join(missing)}: install them, or carry them in gpu-wheels/")
print(f"python {platform.python_version()}: " + ", ".join(f"{n} {v}" for n, v in found.items()), flush=True)
EOF
echo "environment: $setup"
"$py" bench/gpu_check.py "$out" $dry --setup "$setup"
