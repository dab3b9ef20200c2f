#!/usr/bin/env bash
# Set up a virtual environment in .venv with dsr1 and its test dependencies.
# torch 2.13.0 is installed first so pip keeps the CPU build on this machine's
# disk instead of pulling a multi-GB CUDA build for a plain `torch` requirement.
# On a GPU machine, install the CUDA build of torch you want before this script.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install -q "torch==${DSR1_TORCH_VERSION:-2.13.0}" 2>&1 | grep -v "is ignored" || true
fi
.venv/bin/python -m pip install -q -e '.[test]' 2>&1 | grep -v "is ignored" || true
.venv/bin/python -c "import dsr1, torch, transformers; print('dsr1', dsr1.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
