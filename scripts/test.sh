#!/usr/bin/env bash
# The test command (README, .ci/run): set up .venv, then run the whole suite with pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
