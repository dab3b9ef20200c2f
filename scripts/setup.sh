#!/usr/bin/env bash
# Set up a virtual environment in .venv with dsr1 and its test dependencies.
# torch 2.13.0 is installed first so pip keeps the CPU build on this machine's
# disk instead of pulling a multi-GB CUDA build for a plain `torch` requirement.
# On a GPU machine, install the CUDA build of torch you want before this script.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# pip's output without its "is ignored" notices; a failing pip still fails the script
# (pipefail), only grep's "nothing left to print" status is forgiven.
quiet() { "$@" 2>&1 | { grep -v "is ignored" || true; }; }
[ -x .venv/bin/python ] || "$PY" -m venv .venv
quiet .venv/bin/python -m pip install -q --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  quiet .venv/bin/python -m pip install -q "torch==${DSR1_TORCH_VERSION:-2.13.0}"
fi
quiet .venv/bin/python -m pip install -q -e '.[test]'
# Prometheus (promtool too) for the monitoring tests: the Debian package, as root (CI); elsewhere
# the tests that need it say how to install it.
if ! command -v promtool >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  t=$SECONDS
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  echo "setup.sh: installed prometheus $(prometheus --version 2>&1 | head -1 | cut -d' ' -f3) in $((SECONDS - t))s"
fi
.venv/bin/python -c "import dsr1, torch, transformers; print('dsr1', dsr1.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
