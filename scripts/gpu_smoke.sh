#!/usr/bin/env bash
# Short teacher + IBMD distillation + evaluation on CUDA, printing throughput and the metrics table.
# Usage: scripts/gpu_smoke.sh [extra args for scripts/gpu_smoke.py]
# Needs torch with CUDA and the animal-mnist data package (pip install --no-deps animal-mnist==0.4).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 KEDRO_DISABLE_TELEMETRY=true
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
exec "$PYTHON" scripts/gpu_smoke.py --device cuda --teacher-steps 1500 --distill-steps 200 \
    --images 10000 --eval-images 1000 "$@"
