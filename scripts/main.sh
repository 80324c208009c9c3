#!/usr/bin/env bash
# Set up a venv (.venv) and run the main job: a private (ε = 2, δ = 1e-5) DP-AggZO fine-tune of
# the packaged MiniLM on BBC News topics (about 4-5 minutes on one CPU thread). Extra arguments
# go to `zoprivacy finetune` (e.g. --task rotten_tomatoes, --method dpadamw, --resume).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source scripts/setup_env.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
"$(dirname "$PY")/zoprivacy" finetune --output "${ZOPRIVACY_OUTPUT:-runs/main}" "$@"
