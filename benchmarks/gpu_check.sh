#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py): runs as it is on a machine with one GPU after the README's setup
# (`make setup` with a CUDA build of torch). Under 8 minutes on one H100; writes benchmarks/results/gpu_check.{json,md}.
# Extra arguments go to the driver: --only STEP,... --timeout-scale X --out DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
[ -x "$PY" ] || { echo "gpu_check.sh: $PY is missing: run the README's setup (make setup) first" >&2; exit 2; }
exec "$PY" benchmarks/gpu_check.py "$@"
