#!/usr/bin/env bash
# Set up a venv (.venv) and run the main job. Until the fine-tuning job lands this prints the
# privacy calibration of the paper's reference run (ε = 2, δ = 1e-5, q = 0.0416, T = 1000).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source scripts/setup_env.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
"$(dirname "$PY")/zoprivacy" calibrate --epsilon 2 --delta 1e-5 --sample-rate 0.0416 --steps 1000 "$@"
