#!/usr/bin/env bash
# Set up a venv (.venv) and run the checks CI runs: ruff, then the test suite (slow tests excluded).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source scripts/setup_env.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
"$PY" -m ruff check .
"$PY" -m ruff format --check .
# pytest exits 5 when no test ran; set -e turns that into a failure.
"$PY" -m pytest "$@"
# The quickstart notebook, executed in its reduced configuration (under 3 minutes).
ZOPRIVACY_NOTEBOOK_QUICK=1 "$PY" -m pytest --nbmake notebooks/ -p no:cacheprovider
