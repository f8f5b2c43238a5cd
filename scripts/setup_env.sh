#!/usr/bin/env bash
# Creates or reuses the virtual environment (MISHKIT_VENV, default .venv), installs the pinned CPU
# torch and the dependencies, and builds mishkit._C when its sources changed. Sourced by the other
# scripts; afterwards $PY is the environment's python.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MISHKIT_VENV:-$ROOT/.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
pip_install() { "$PY" -m pip install --quiet --disable-pip-version-check "$@"; }

# torch first and pinned: any unpinned torch (or a build-isolated build) pulls GBs of CUDA wheels.
"$PY" -c "import torch" 2>/dev/null || pip_install "torch==2.13.0"
"$PY" -c "import triton, pytest, pytest_timeout, xdist, hypothesis, ruff, importlinter, ninja, yaml, \
PIL, tqdm, matplotlib, scipy, submitit" 2>/dev/null || pip_install "torch==2.13.0" setuptools wheel \
       ninja triton pytest pytest-timeout pytest-xdist hypothesis ruff import-linter expecttest \
       numpy pyyaml pillow tqdm matplotlib scipy submitit
# transformers (pure Python) for the conversion tests on real model code; torch pinned beside it
"$PY" -c "import transformers" 2>/dev/null || pip_install "torch==2.13.0" transformers

# Rebuild only when the C++/CUDA sources or setup.py changed (a clean build takes minutes on 2 cores).
stamp="$VENV/.mishkit-build-stamp"
digest="$(cd "$ROOT" && cat setup.py pyproject.toml $(find csrc -type f | sort) | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$digest" ] || ! ls "$ROOT"/mishkit/_C*.so >/dev/null 2>&1; then
  echo "building mishkit._C (C++ CPU kernels; CUDA only where torch has CUDA) ..."
  (cd "$ROOT" && MAX_JOBS="${MAX_JOBS:-2}" pip_install --no-build-isolation --no-deps -e .)
  echo "$digest" > "$stamp"
fi
export PY
