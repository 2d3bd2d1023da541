#!/usr/bin/env bash
# The GPU check, one step on a lent GPU machine (under 8 minutes on one H100): the suite's
# GPU tests with CUDA really present (pytest -m gpu), then benchmarks/gpu_check.py (the
# 224 px default-vs-paper row, the profile/forward ratio at 224 px and an assembly, all on
# CUDA). Writes benchmarks/results/gpu-check.json, copied to $OUT when that is set.
# Uses the machine's own python3 with torch, torchvision and pytest; the package from src/.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD/src:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 2)" || {
    echo "gpu-check: no CUDA device here"; exit 2; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
tests=$(timeout 240 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests 2>&1 | tee /dev/stderr \
        | grep -E '^[0-9]+ (passed|failed)|passed|failed|error' | tail -1)
timeout 300 "$PY" benchmarks/gpu_check.py --tests-summary "${tests:-no summary}"
rc=$?
if [ -n "${OUT:-}" ] && [ -f benchmarks/results/gpu-check.json ]; then
    cp benchmarks/results/gpu-check.json "$OUT/"
fi
exit $rc
