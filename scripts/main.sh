#!/usr/bin/env bash
# Set up a venv (.venv) and run the main job: a private (ε = 2, δ = 1e-5) DP-AggZO fine-tune of
# the packaged MiniLM on BBC News topics on one CPU thread. Its measured run time and peak memory
# are those of benchmarks/results/finetune_default_report.json ("resources"),
# printed below before the run. Extra arguments go to `zoprivacy finetune` (e.g. --task
# rotten_tomatoes, --method dpadamw, --resume, or your own --model FOLDER --train-file PATH).
# Off a terminal (this script's usual case) the job prints a line per phase and a progress line
# every 10 s (step and ε spent only).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source scripts/setup_env.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
"$PY" - <<'PYEOF' >&2 || true
import json
path = "benchmarks/results/finetune_default_report.json"
r = json.load(open(path))["resources"]
print(f"main.sh: the default run took {r['wall_seconds']:.0f} s and {r['peak_memory_mib']:.0f} MiB "
      f"peak when measured on {r['measured']['date']} ({path}); other machines differ")
PYEOF
"$(dirname "$PY")/zoprivacy" finetune --output "${ZOPRIVACY_OUTPUT:-runs/main}" "$@"
