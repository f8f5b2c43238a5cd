#!/usr/bin/env bash
# The test suite from a fresh clone: sets up .venv, builds the extension, lints, runs pytest.
# Extra arguments go to pytest (e.g. ./scripts/test.sh -k mish).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
"$PY" -m ruff check .
"$VENV/bin/lint-imports"   # the layer contracts in pyproject.toml
# Triton kernels run on CPU tensors through the interpreter on GPU-less machines.
if ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  export TRITON_INTERPRET=1
fi
"$PY" -m pytest -q "$@"
